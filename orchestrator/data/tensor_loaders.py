"""Loaders for datasets held in memory as one (N, C, H, W) tensor (digits, CIFAR, synthetic).

Augmentation (random crop with zero padding, optional horizontal flip) runs vectorised on a
whole batch, on the device the images live on; its random numbers come from a CPU generator
seeded from ``(seed, epoch, step)``, so the batches are identical wherever the data lives.
Images stay in their source dtype (uint8 for CIFAR) until after augmentation; they are then
moved to the training device, scaled to [0, 1] (uint8 only) and normalised. Every copy to
the device is non-blocking: a batch costs no host synchronisation.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from kdflow.methods.distillers.base import DataInfo
from kdflow.orchestrator.data.loaders import Batch, Data, Shard, check_start_step, generator, local_rows


def augment(x: torch.Tensor, gen: torch.Generator, pad: int, hflip: bool) -> torch.Tensor:
    """Randomly crop (after ``pad`` pixels of zero padding) and optionally flip a batch.

    x: (B, C, H, W) of any dtype, on any device; returns the same shape, dtype and device.
    The crop offsets are drawn first, then the flips, both from ``gen`` (a CPU generator).
    """
    b, c, h, w = x.shape
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(x.device, non_blocking=True)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class _Normaliser:
    """Moves a batch to ``device``, normalises it with per-channel ``mean``/``std`` and lays it
    out channels_last when asked."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Batch:
        x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        return Batch(x, y.to(self.device, non_blocking=True),
                     index.to(self.device, non_blocking=True))


class TensorTrainLoader:
    """Shuffled, augmented batches of an in-memory train split.

    images: (N, C, H, W) uint8 in [0, 255] (scaled to [0, 1] per batch) or float (used as is);
    labels: (N,) int64.
    mean, std: per-channel statistics of the scaled images, applied after augmentation.
    resident: keep the whole split on ``device`` (augment there); otherwise keep it on the CPU,
    augment there and move each batch. Both give identical batches.
    channels_last: lay batches out channels_last (else contiguous NCHW).
    The last partial batch is kept, so ``steps_per_epoch = ceil(N / batch_size)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, seed: int, device: torch.device,
                 pad: int, hflip: bool, resident: bool, channels_last: bool = False) -> None:
        store = device if resident else torch.device("cpu")
        self.images = images.to(store)
        self.labels = labels.to(store)
        self.batch_size = batch_size
        self.seed = seed
        self.pad = pad
        self.hflip = hflip
        self.normalise = _Normaliser(mean, std, device, channels_last)
        self.steps_per_epoch = math.ceil(len(images) / batch_size)

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; each depends on (seed, epoch, step).

        A shard's rows are augmented exactly as in the whole batch (the random numbers of the
        global batch are drawn, then sliced).
        """
        check_start_step(start_step, self.steps_per_epoch)
        order = torch.randperm(len(self.images), generator=generator(self.seed, epoch))
        for step in range(start_step, self.steps_per_epoch):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            local = index.to(self.images.device, non_blocking=True)
            x = augment(self.images[local], generator(self.seed, epoch, step), self.pad,
                        self.hflip)
            rows = local_rows(len(index), *shard)
            yield self.normalise(x[rows], self.labels[local][rows], index[rows])


class TensorEvalLoader:
    """Un-augmented batches of an in-memory split, in order, covering it once.

    images, labels, mean, std, resident and channels_last as for :class:`TensorTrainLoader`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, device: torch.device,
                 resident: bool, channels_last: bool = False) -> None:
        store = device if resident else torch.device("cpu")
        self.images = images.to(store)
        self.labels = labels.to(store)
        self.batch_size = batch_size
        self.normalise = _Normaliser(mean, std, device, channels_last)

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """Every sample once, in split order; ``index`` is the position in the split.

        With ``shard=(r, w)``, only the batches ``i`` with ``i % w == r``."""
        rank, world = shard
        for start in range(rank * self.batch_size, len(self.images), world * self.batch_size):
            stop = min(start + self.batch_size, len(self.images))
            yield self.normalise(self.images[start:stop], self.labels[start:stop],
                                 torch.arange(start, stop))


def tensor_data(train_images: torch.Tensor, train_labels: torch.Tensor,
                val_images: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                mean: Sequence[float], std: Sequence[float], batch_size: int, seed: int,
                device: torch.device, pad: int, hflip: bool, resident: bool,
                channels_last: bool = False) -> Data:
    """Wrap in-memory train/val splits ((N, C, H, W) images, (N,) int64 labels) as :class:`Data`."""
    train = TensorTrainLoader(train_images, train_labels, mean, std, batch_size, seed, device,
                              pad, hflip, resident, channels_last)
    val = TensorEvalLoader(val_images, val_labels, mean, std, batch_size, device, resident,
                           channels_last)
    c, h, w = train_images.shape[1:]
    info = DataInfo(num_samples=len(train_images), labels=train_labels.clone(),
                    num_classes=num_classes, input_shape=(c, h, w))
    return Data(train=train, val=val, info=info)
