"""The plain reference loop of ``bench/step.py``: a training step as the reference
repositories (RepDistiller, CRD, HSAKD's code) write it.

Data: a torchvision-style dataset holding uint8 images in memory that turns each one into a
PIL image in ``__getitem__`` (as ``torchvision.datasets.CIFAR100`` does), augments it with
torchvision transforms (CIFAR: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``;
ImageNet shapes: ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``), then ``ToTensor`` and
``Normalize``, batched by a ``torch.utils.data.DataLoader`` with worker processes and shuffling.

Step: batch to the device, fp32 forward of the distiller (the method's own loss, so only the
loop differs from kdflow's), ``loss.item()`` and a top-1 accuracy read back for the running
averages, ``zero_grad``, ``backward``, a per-tensor SGD step.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision import transforms

from kdflow.methods.distillers import Distiller


class PILArrayDataset(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 images and (N,) labels; items are (image tensor, label, index)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: transforms.Compose) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i]), i


def train_transform(size: int, stored: int, mean: Sequence[float],
                    std: Sequence[float]) -> transforms.Compose:
    """The reference repositories' training augmentation for ``size``-pixel inputs cut from
    ``stored``-pixel images: CIFAR's padded random crop when they are equal, else ImageNet's
    random resized crop."""
    crop = (transforms.RandomCrop(size, padding=4) if size == stored
            else transforms.RandomResizedCrop(size))
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def plain_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                 ) -> torch.utils.data.DataLoader:
    """Shuffled batches, ``workers`` loading processes (kept alive across epochs)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def forever(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


class AverageMeter:
    """The reference repositories' running average (a Python float, fed per step)."""

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int) -> None:
        self.sum += value * n
        self.count += n


def plain_step(distiller: Distiller, optimizer: torch.optim.Optimizer, batch: Tuple,
               device: torch.device, losses: AverageMeter, top1: AverageMeter) -> float:
    """One reference-style step on ``batch`` = (x (B, 3, H, W) float, y (B,), index (B,));
    returns the loss as a float (read back every step, as the reference loops do)."""
    x, y, index = (t.to(device) for t in batch)
    logits, terms = distiller(x, y, index)
    loss = sum(terms.values())
    acc = (logits.argmax(dim=1) == y).float().mean() * 100
    value = loss.item()
    losses.update(value, x.size(0))
    top1.update(acc.item(), x.size(0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return value
