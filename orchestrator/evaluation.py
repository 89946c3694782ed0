"""Evaluating a job's network: the held-out metrics, a segmentation job's sample predictions
and the BatchNorm statistics of a network that was never trained."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from kdflow.methods.distillers import Distiller
from kdflow.orchestrator.atomic import atomic_write
from kdflow.orchestrator.data import Data
from kdflow.orchestrator.distributed import ALONE, Ranks
from kdflow.orchestrator.fast_path import FastPath, autocast
from kdflow.orchestrator.metrics import TASK_METRICS


@torch.no_grad()
def evaluate(distiller: Distiller, data: Data, device: torch.device, fast: FastPath,
             ranks: Ranks = ALONE) -> Dict[str, float]:
    """The task's metrics (:mod:`orchestrator.metrics`, in percent) of ``distiller.predict``
    over the whole held-out split: top1/top5, or miou/pixel_acc.

    Over several ``ranks`` (which must hold the same network), rank r evaluates the batches
    ``i`` with ``i % world_size == r`` and the counts are summed: every rank returns the same.
    """
    distiller.eval()
    metrics = TASK_METRICS.get(data.info.task)(data.info.num_classes, device)
    for batch in data.val.batches(shard=ranks.part):
        x, y = batch.x.to(device), batch.y.to(device)
        with autocast(device, fast):
            logits = distiller.predict(x, y).float()
        metrics.update(logits, y)
    return metrics.result(ranks.sum(metrics.counts))


#: The file of a segmentation job's validation samples (:func:`save_val_samples`).
VAL_SAMPLES = "val_samples.pt"
#: Validation images a segmentation job keeps with their predictions (for the report's figure).
SAMPLE_IMAGES = 4


@torch.no_grad()
def save_val_samples(distiller: Distiller, data: Data, device: torch.device, fast: FastPath,
                     path: Path) -> None:
    """Write the first ``SAMPLE_IMAGES`` validation images of a segmentation job to ``path``:
    ``x`` (K, 3, H, W) float16 normalised images, ``y`` and ``pred`` (K, H, W) uint8 label maps
    (255 = ignore), ``index`` (K,) their positions in the split."""
    distiller.eval()
    batch = next(iter(data.val.batches()))
    x, y = batch.x[:SAMPLE_IMAGES].to(device), batch.y[:SAMPLE_IMAGES].to(device)
    with autocast(device, fast):
        pred = distiller.predict(x, y).float().argmax(dim=1)
    samples = {"x": x.half().cpu(), "y": y.to(torch.uint8).cpu(),
               "pred": pred.to(torch.uint8).cpu(), "index": batch.index[:SAMPLE_IMAGES].cpu()}
    atomic_write(path, lambda f: torch.save(samples, f))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, data: Data, device: torch.device) -> None:
    """Set BatchNorm running statistics to their averages over one pass of the training split.

    Only the statistics change, never a weight: an untrained (randomly initialised) network
    then behaves in eval mode as it does in train mode, instead of passing activations through
    with the default mean 0 / variance 1, which lets them grow without bound with depth.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the pass
    model.train()
    for batch in data.train.batches(0):
        model(batch.x.to(device))
    model.eval()

