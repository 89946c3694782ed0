"""DataLoader-based loaders for image trees decoded on the fly (``imagefolder``).

Every training sample is transformed under ``torch.manual_seed(derive_seed(seed, epoch,
index))`` (inside a forked RNG, so the caller's global RNG is untouched), which makes
torchvision's random transforms the same in any worker and after a resume. The epoch's order
is a permutation seeded from ``(seed, epoch)``; resuming at ``start_step`` skips the first
``start_step * batch_size`` entries of it without decoding them. A file that cannot be
decoded stops the loader with a :class:`~orchestrator.data.errors.DataError` naming it.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from kdflow.orchestrator.data.errors import DataError, collate_or_error, raise_errors, read_file
from kdflow.orchestrator.data.loaders import (Batch, Shard, check_start_step, derive_seed,
                                              generator, local_rows)

Sample = tuple[torch.Tensor, int, int]


class SeededSamples(Dataset[Sample]):
    """``(path, label)`` samples read with ``load`` and transformed under a per-sample seed.

    Keys are ``(epoch, index)``; an item is ``(image (C, H, W) float, label, index)``, or
    the :class:`DataError` of a file that cannot be read (a value, so that it leaves a
    DataLoader worker intact).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], load: Callable[[str], object],
                 transform: Callable[[object], torch.Tensor], seed: int) -> None:
        self.samples = samples
        self.load = load
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Sample | DataError:
        epoch, index = key
        path, label = self.samples[index]
        try:
            loaded = read_file(self.load, path)
        except DataError as err:
            return err
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            image = self.transform(loaded)
        return image, label, index


class _Loading:
    """Runs a DataLoader over explicit batches of keys and moves them to ``device``."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def run(self, batches: list[list[tuple[int, int]]]) -> Iterator[Batch]:
        loader = DataLoader(self.samples, batch_sampler=batches, num_workers=self.workers,
                            collate_fn=partial(collate_or_error, default_collate),
                            pin_memory=self.device.type == "cuda")
        for x, y, index in raise_errors(iter(loader)):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield Batch(x, y.to(self.device, non_blocking=True),
                        index.to(self.device, non_blocking=True))


class FolderTrainLoader:
    """Shuffled, randomly transformed batches; the last partial batch is kept."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool = False) -> None:
        self.loading = _Loading(samples, batch_size, workers, device, channels_last)
        self.steps_per_epoch = math.ceil(len(samples) / batch_size)

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; each depends on (seed, epoch, step).

        A shard's rows are the only ones decoded.
        """
        check_start_step(start_step, self.steps_per_epoch)
        samples, size = self.loading.samples, self.loading.batch_size
        order = torch.randperm(len(samples), generator=generator(samples.seed, epoch)).tolist()
        steps = [order[s * size:(s + 1) * size] for s in range(start_step, self.steps_per_epoch)]
        yield from self.loading.run([[(epoch, i) for i in step[local_rows(len(step), *shard)]]
                                     for step in steps])


class FolderEvalLoader:
    """The split once, in order, with its deterministic transform."""

    def __init__(self, samples: SeededSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool = False) -> None:
        self.loading = _Loading(samples, batch_size, workers, device, channels_last)

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """Every sample once, in split order; ``index`` is the position in the split.

        With ``shard=(r, w)``, only the batches ``i`` with ``i % w == r``."""
        rank, world = shard
        count, size = len(self.loading.samples), self.loading.batch_size
        yield from self.loading.run([[(0, i) for i in range(s, min(s + size, count))]
                                     for s in range(rank * size, count, world * size)])
