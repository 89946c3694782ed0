"""Hinton KD trained by the torchdistill framework, as a peer to kdflow's own ``kd`` step.

torchdistill (PyPI ``torchdistill``, 1.1.x) is driven the way its example training script
(``examples/torchvision/image_classification.py``) drives it: a ``DistillationBox`` is built by
``torchdistill.core.distillation.get_distillation_box`` from a train config dict (what its YAML
files hold under ``train:``), and each step is the example's ``train_one_epoch`` body: move the
batch to the device, ``loss = box.forward_process(sample_batch, targets, supp_dict)``,
``box.post_forward_process(loss=loss)`` (backward, SGD step, zero_grad), then ``loss.item()`` and
the learning rate go into torchdistill's ``MetricLogger``, and a NaN/inf loss stops the run.

The loss is

    ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with CE averaged over the batch and KL summed over classes and averaged over the batch
("batchmean"). torchdistill's ``KDLoss`` computes
``alpha * CE + beta * T^2 * KLDivLoss(reduction='batchmean')`` when ``alpha`` is non-zero, so
``alpha = ce_weight``, ``beta = kd_weight`` and a ``WeightedSumLoss`` sub-term weight of 1 give
exactly the formula. When ``alpha`` is 0 it returns the bare KL term (no ``beta``, no ``T^2``),
so for ``ce_weight == 0`` the sub-term weight carries ``kd_weight * T^2`` instead.

The teacher is frozen the torchdistill way (``teacher: {requires_grad: False}``: its parameters
get ``requires_grad = False`` and its forward runs under ``torch.no_grad()``). torchdistill never
switches the teacher to eval mode itself (its pre-epoch hook only calls ``student.train()``), so
``build_kd_box`` calls ``teacher.eval()``: BatchNorm uses running statistics and they do not
change.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.utils.data
from torch import nn

import torchdistill.losses  # noqa: F401  (registers KDLoss and WeightedSumLoss)
from torchdistill.core.distillation import get_distillation_box
from torchdistill.misc.log import MetricLogger, SmoothedValue

# The example's ``log_freq`` (``train.log_freq`` in torchdistill's configs): MetricLogger.log_every
# formats a progress line at every log_freq-th batch of an epoch (and at its first), and hands
# it to torchdistill's logger (a child of the root logger: silent unless logging is set to INFO).
LOG_FREQ = 1000


def train_config(*, batch_size: int, num_workers: int, device: torch.device,
                 temperature: float, ce_weight: float, kd_weight: float,
                 lr: float, momentum: float, weight_decay: float) -> Dict[str, Any]:
    """torchdistill's ``train:`` config for Hinton KD on dataset id ``'train'`` (a fresh dict:
    torchdistill edits the one it is given). Shuffled batches (RandomSampler) of ``batch_size``,
    the last partial batch kept, as in torchdistill's sample configs; pinned memory on CUDA."""
    if ce_weight == 0:
        # KDLoss returns KL alone (without beta * T^2) when alpha is 0.
        alpha, beta, term_weight = 0.0, kd_weight, kd_weight * temperature ** 2
    else:
        alpha, beta, term_weight = ce_weight, kd_weight, 1.0
    return {
        'num_epochs': 1,
        'train_data_loader': {
            'dataset_id': 'train',
            'sampler': {'class_or_func': torch.utils.data.RandomSampler, 'kwargs': None},
            'kwargs': {'batch_size': batch_size, 'num_workers': num_workers,
                       'pin_memory': device.type == 'cuda', 'drop_last': False},
        },
        'teacher': {'forward_proc': 'forward_batch_only', 'sequential': [], 'requires_grad': False},
        'student': {'forward_proc': 'forward_batch_only', 'adaptations': None, 'sequential': [],
                    'requires_grad': True, 'frozen_modules': []},
        'optimizer': {'key': 'SGD',
                      'kwargs': {'lr': lr, 'momentum': momentum, 'weight_decay': weight_decay}},
        'criterion': {
            'key': 'WeightedSumLoss',
            'kwargs': {'sub_terms': {'kd': {
                'criterion': {'key': 'KDLoss', 'kwargs': {
                    'student_module_path': '.', 'student_module_io': 'output',
                    'teacher_module_path': '.', 'teacher_module_io': 'output',
                    'temperature': temperature, 'alpha': alpha, 'beta': beta,
                    'reduction': 'batchmean'}},
                'weight': term_weight,
            }}},
        },
    }


def build_kd_box(teacher: nn.Module, student: nn.Module, train_set: torch.utils.data.Dataset,
                 *, batch_size: int, num_workers: int, device: torch.device,
                 temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4) -> Any:
    """A torchdistill DistillationBox training `student` from frozen `teacher` with SGD on
    loss = ce_weight * CE(student, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))
    (KL averaged over the batch).

    `teacher` and `student` map images (B, 3, H, W) to logits (B, num_classes); `train_set` yields
    (image (3, H, W) float tensor, int label). `temperature` is T (dimensionless); the SGD `lr`,
    `momentum` and `weight_decay` are constant (no scheduler). Both models are moved to `device`
    (in place), the teacher's parameters get requires_grad=False and it is put in eval mode.
    The box's `train_data_loader` yields (images (B, 3, H, W), labels (B,), supp_dict {}) with
    B = `batch_size` (the last batch of an epoch may be smaller); `optimizer` is the SGD over the
    student's parameters.
    """
    teacher.eval()
    config = train_config(batch_size=batch_size, num_workers=num_workers, device=device,
                          temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                          lr=lr, momentum=momentum, weight_decay=weight_decay)
    device_ids = [device.index] if device.type == 'cuda' and device.index is not None else None
    return get_distillation_box(teacher, student, {'train': train_set}, config, device, device_ids,
                                distributed=False, lr_factor=1)


def iter_steps(box: Any, device: torch.device) -> Iterator[Tuple[int, float]]:
    """torchdistill's training loop over ``box.train_data_loader``, one step per ``next``:
    yields (the batch's images, its loss as a float) after each step, which runs as its
    example's ``train_one_epoch`` runs a batch (``loss.item()`` included). Epoch after epoch:
    each pass starts with ``pre_epoch_process(epoch=n)`` and ends with
    ``post_epoch_process()``; the loader's iterator (and its worker processes) lives for a
    whole pass, as in the example. Raises ValueError if a loss is NaN or infinite, as the
    example does."""
    epoch = 0
    while True:
        box.pre_epoch_process(epoch=epoch)
        metric_logger = MetricLogger(delimiter='  ')
        metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value}'))
        metric_logger.add_meter('img/s', SmoothedValue(window_size=10, fmt='{value}'))
        header = 'Epoch: [{}]'.format(epoch)
        batches = 0
        for sample_batch, targets, supp_dict in metric_logger.log_every(
                box.train_data_loader, LOG_FREQ, header):
            start_time = time.time()
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            batch_size = sample_batch.shape[0]
            value = loss.item()
            metric_logger.update(loss=value, lr=box.optimizer.param_groups[0]['lr'])
            metric_logger.meters['img/s'].update(batch_size / (time.time() - start_time))
            if torch.isnan(loss) or torch.isinf(loss):
                raise ValueError('The training loop was broken due to loss = {}'.format(loss))
            batches += 1
            yield batch_size, value
        if batches == 0:
            raise ValueError('box.train_data_loader yielded no batch')
        box.post_epoch_process()
        epoch += 1


def run_steps(box: Any, steps: int, device: torch.device) -> Tuple[int, float]:
    """Run ``steps`` steps of :func:`iter_steps` from the first epoch; returns (images
    processed, last loss as float). ``steps`` must be positive."""
    if steps <= 0:
        raise ValueError(f'steps must be positive, got {steps}')
    images, last_loss = 0, float('nan')
    for _, (batch_size, last_loss) in zip(range(steps), iter_steps(box, device)):
        images += batch_size
    return images, last_loss
