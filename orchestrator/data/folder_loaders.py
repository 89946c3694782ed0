"""DataLoader-based loaders for image trees decoded on the fly (``imagefolder``).

Every training sample is transformed under ``torch.manual_seed(derive_seed(seed, epoch,
index))`` (inside a forked RNG, so the caller's global RNG is untouched), which makes
torchvision's random transforms the same in any worker and after a resume. The epoch's order
is a permutation seeded from ``(seed, epoch)``; resuming at ``start_step`` skips the first
``start_step * batch_size`` entries of it without decoding them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from orchestrator.data.loaders import Batch, check_start_step, derive_seed, generator

Sample = tuple[torch.Tensor, int, int]


class SeededSamples(Dataset[Sample]):
    """``(path, label)`` samples read with ``load`` and transformed under a per-sample seed.

    Keys are ``(epoch, index)``; an item is ``(image (C, H, W) float, label, index)``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], load: Callable[[str], object],
                 transform: Callable[[object], torch.Tensor], seed: int) -> None:
        self.samples = samples
        self.load = load
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        path, label = self.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            image = self.transform(self.load(path))
        return image, label, index


class _Loading:
    """Runs a DataLoader over explicit keys and moves its batches to ``device``."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.workers = workers
        self.device = device

    def run(self, keys: list[tuple[int, int]]) -> Iterator[Batch]:
        loader = DataLoader(self.samples, batch_size=self.batch_size, sampler=keys,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for x, y, index in loader:
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                        index.to(self.device, non_blocking=True))


class FolderTrainLoader:
    """Shuffled, randomly transformed batches; the last partial batch is kept."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device) -> None:
        self.loading = _Loading(samples, batch_size, workers, device)
        self.steps_per_epoch = math.ceil(len(samples) / batch_size)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; each depends on (seed, epoch, step)."""
        check_start_step(start_step, self.steps_per_epoch)
        samples = self.loading.samples
        order = torch.randperm(len(samples), generator=generator(samples.seed, epoch))
        skip = start_step * self.loading.batch_size
        yield from self.loading.run([(epoch, i) for i in order[skip:].tolist()])


class FolderEvalLoader:
    """The split once, in order, with its deterministic transform."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device) -> None:
        self.loading = _Loading(samples, batch_size, workers, device)

    def batches(self) -> Iterator[Batch]:
        """Every sample once, in split order; ``index`` is the position in the split."""
        yield from self.loading.run([(0, i) for i in range(len(self.loading.samples))])
