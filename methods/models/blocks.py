"""Block split of the zoo models for block-wise (StableKD-style) distillation.

Every zoo model exposes ``stablekd_stages()``: its K stages as modules that map one tensor to
the next, the stem folded into the first stage and pooling + classifier into the last, so
``stages[K-1](...stages[0](x))`` equals ``model(x)`` and stage k < K-1 outputs
``model.forward_features(x).stages[k]``. K is the number of tap stages: 3 for the CIFAR
ResNets, WRNs and ShuffleNets, 5 for VGG, 4 for MobileNetV2 and the torchvision models.

``split_blocks(model, n)`` groups the K stages into n contiguous blocks (1 <= n <= K). The
grouping follows ``numpy.array_split``: every block gets ``K // n`` stages and the first
``K % n`` blocks one more, so earlier stages are merged first and the last block (the one
holding the classifier) stays small; e.g. VGG split into 3 is (stages 0-1, 2-3, 4) and into 4 is
(0-1, 2, 3, 4). n = 1 gives the whole model as one block.

The blocks are views onto the model's own submodules (no copies): training them trains the
model, and ``.to()``, ``.train()`` and ``state_dict`` of the model cover them. The wrappers
below own no parameters or buffers.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class StageOutput(nn.Module):
    """Runs a stage whose forward returns ``(out, preact)`` and keeps ``out``.

    (B, C_in, H, W) -> (B, C_out, H', W'), the stage's post-activation output.
    """

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)[0]


class PooledClassifier(nn.Module):
    """``classifier(flatten(global_avg_pool(pre_pool(x))))``: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, pre_pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pre_pool = pre_pool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.pre_pool(x), 1)
        return self.classifier(torch.flatten(pooled, 1))


def stages_of(model: nn.Module) -> List[nn.Module]:
    """The model's K stages (see the module docstring); TypeError for a model without them."""
    stages = getattr(model, "stablekd_stages", None)
    if stages is None:
        raise TypeError(f"{type(model).__name__} does not define stablekd_stages(), "
                        "so it cannot be split into blocks")
    return list(stages())


def default_num_blocks(model: nn.Module) -> int:
    """The family's default block count: its number of stages K, also the most it supports."""
    return len(stages_of(model))


def block_ranges(num_stages: int, num_blocks: int) -> List[range]:
    """The stage indices of each block when ``num_stages`` stages form ``num_blocks`` blocks
    (``numpy.array_split`` rule: the first ``num_stages % num_blocks`` blocks get one extra)."""
    if not 1 <= num_blocks <= num_stages:
        raise ValueError(f"cannot split {num_stages} stages into {num_blocks} blocks "
                         f"(allowed: 1 to {num_stages})")
    size, extra = divmod(num_stages, num_blocks)
    ranges, start = [], 0
    for b in range(num_blocks):
        stop = start + size + (1 if b < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def split_blocks(model: nn.Module, num_blocks: int) -> List[nn.Module]:
    """``num_blocks`` modules whose composition is ``model(x)``; block 1 holds the stem, the
    last block ends with pooling and the classifier and returns (B, num_classes) logits.

    Blocks share the model's submodules. ValueError when ``num_blocks`` is not in 1..K.
    """
    stages = stages_of(model)
    blocks: List[nn.Module] = []
    for r in block_ranges(len(stages), num_blocks):
        group = [stages[k] for k in r]
        blocks.append(group[0] if len(group) == 1 else nn.Sequential(*group))
    return blocks
