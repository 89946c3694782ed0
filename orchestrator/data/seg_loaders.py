"""Loaders of the segmentation datasets (in memory or decoded from files on the fly).

A split is a :class:`SegSource`: ``len`` samples, ``load(i) -> (image (3, H, W) uint8 or
float, mask (H, W) uint8)``. Training samples are transformed by
:func:`~orchestrator.data.seg_transforms.train_transform` under ``generator(seed, epoch,
index)``, so batch ``s`` of epoch ``e`` depends only on ``(seed, e, s)``; the epoch's order is
a permutation seeded from ``(seed, epoch)`` and resuming at ``start_step`` skips the first
``start_step * batch_size`` entries of it without loading them. A rank loads only its own
rows of each global batch. With ``workers > 0`` a torch DataLoader decodes and transforms in
that many processes (the same batches as with 0). A file that cannot be decoded stops the
loader with a :class:`~orchestrator.data.errors.DataError` naming it.

Batches: ``x`` (B, 3, H, W) float32 normalised (channels_last when asked), ``y`` (B, H, W)
int64 label maps with 255 = ignore, ``index`` (B,) int64 position in the split.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, List, Protocol, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kdflow.methods.distillers.base import DataInfo
from kdflow.methods.tasks import SEGMENTATION
from kdflow.orchestrator.data.errors import DataError, collate_or_error, raise_errors, read_file
from kdflow.orchestrator.data.loaders import (Batch, Data, Shard, check_start_step, generator,
                                              local_rows)
from kdflow.orchestrator.data.scan import DataFile
from kdflow.orchestrator.data.seg_transforms import Normalise, pad_collate, train_transform

Sample = Tuple[torch.Tensor, torch.Tensor, int]


class SegSource(Protocol):
    """One split of a segmentation dataset."""

    def __len__(self) -> int:
        ...

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``: ``(image (3, H, W) uint8 or float, mask (H, W) uint8)``."""
        ...


class TensorSource:
    """A split held in memory: images (N, 3, H, W) (any dtype), masks (N, H, W) uint8."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index]


def read_rgb(path: str) -> torch.Tensor:
    """The image file at ``path`` as (3, H, W) uint8 RGB."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def read_index_png(path: str) -> np.ndarray:
    """The label map at ``path`` (a palette or greyscale PNG holding class indices) as
    (H, W) uint8; raises ValueError for colour-coded (RGB) masks."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: a label map must be a palette or greyscale PNG of class "
                             f"indices, this one has mode {image.mode}")
        return np.array(image)


class FileSource:
    """A split decoded from files: ``pairs`` of (image path, mask path); ``read_mask(path)``
    returns the (H, W) uint8 label map (255 = ignore). Module-level functions only, so the
    source pickles into DataLoader workers. A file that cannot be read, or a mask whose size
    is not its image's, raises :class:`DataError` naming it."""

    def __init__(self, pairs: Sequence[Tuple[str, str]],
                 read_mask: Callable[[str], np.ndarray] = read_index_png) -> None:
        self.pairs = list(pairs)
        self.read_mask = read_mask

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_file(read_rgb, image_path)
        mask = torch.from_numpy(read_file(self.read_mask, mask_path))
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise DataError(mask_path, f"the label map is {tuple(mask.shape)} (H, W) but its "
                            f"image {image_path} is {tuple(image.shape[1:])}")
        return image, mask


def pair_files(pairs: Sequence[Tuple[str, str]], read_mask: Callable[[str], np.ndarray]
               ) -> List[DataFile]:
    """The images and masks of (image path, mask path) ``pairs``, once each, read as
    :class:`FileSource` reads them (masks with ``read_mask``)."""
    files = {}
    for image, mask in pairs:
        files[image] = DataFile(image, read_rgb)
        files[mask] = DataFile(mask, read_mask)
    return list(files.values())


class Subset:
    """The samples ``keep`` (positions into ``source``) of a split, renumbered 0..len-1."""

    def __init__(self, source: SegSource, keep: Sequence[int]) -> None:
        self.source = source
        self.keep = list(keep)

    def __len__(self) -> int:
        return len(self.keep)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.source.load(self.keep[index])


class SegSamples(Dataset[Sample]):
    """A split's samples, transformed for training (``crop`` given) or left whole (eval).

    Keys are ``(epoch, index)``; an item is ``(image (3, h, w) float32 normalised, mask
    (h, w) uint8, index)``, or the :class:`DataError` of a sample that cannot be read (a
    value, so that it leaves a DataLoader worker intact).
    """

    def __init__(self, source: SegSource, normalise: Normalise, seed: int,
                 crop: Tuple[int, int] | None = None,
                 scale: Tuple[float, float] = (1.0, 1.0)) -> None:
        self.source = source
        self.normalise = normalise
        self.seed = seed
        self.crop = crop
        self.scale = scale

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]) -> Sample | DataError:
        epoch, index = key
        try:
            image, mask = self.source.load(index)
        except DataError as err:
            return err
        if self.crop is None:
            return self.normalise(image), mask, index
        image, mask = train_transform(image, mask, self.crop, self.scale,
                                      generator(self.seed, epoch, index), self.normalise)
        return image, mask, index


class _Loading:
    """Loads explicit batches of keys (in this process or a DataLoader's workers) and moves
    them to ``device``."""

    def __init__(self, samples: SegSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _collated(self, batches: List[List[Tuple[int, int]]]
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        padded = partial(pad_collate, empty=self.samples.crop or (0, 0))
        collate = partial(collate_or_error, padded)
        if self.workers == 0:
            for keys in batches:
                yield collate([self.samples[key] for key in keys])
            return
        yield from DataLoader(self.samples, batch_sampler=batches, num_workers=self.workers,
                              collate_fn=collate, pin_memory=self.device.type == "cuda")

    def run(self, batches: List[List[Tuple[int, int]]]) -> Iterator[Batch]:
        """One Batch per entry of ``batches`` (an empty entry gives a batch of 0 rows, so
        every rank sees the same number of steps)."""
        for x, y, index in raise_errors(self._collated(batches)):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield Batch(x, y.to(self.device, non_blocking=True).long(),
                        index.to(self.device, non_blocking=True))


class SegTrainLoader:
    """Shuffled, augmented crops; the last partial batch is kept
    (``steps_per_epoch = ceil(N / batch_size)``)."""

    def __init__(self, samples: SegSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool = False) -> None:
        if samples.crop is None:
            raise ValueError("training samples need a crop size")
        self.loading = _Loading(samples, batch_size, workers, device, channels_last)
        self.steps_per_epoch = math.ceil(len(samples) / batch_size)

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; each depends on (seed, epoch, step).

        Only the shard's rows (:func:`local_rows`) are loaded.
        """
        check_start_step(start_step, self.steps_per_epoch)
        samples, size = self.loading.samples, self.loading.batch_size
        order = torch.randperm(len(samples), generator=generator(samples.seed, epoch)).tolist()
        steps = [order[s * size:(s + 1) * size] for s in range(start_step, self.steps_per_epoch)]
        yield from self.loading.run([[(epoch, i) for i in step[local_rows(len(step), *shard)]]
                                     for step in steps])


class SegEvalLoader:
    """The split once, in order, whole images (a batch padded to its largest image)."""

    def __init__(self, samples: SegSamples, batch_size: int, workers: int,
                 device: torch.device, channels_last: bool = False) -> None:
        self.loading = _Loading(samples, batch_size, workers, device, channels_last)

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """Every sample once, in split order; ``index`` is the position in the split.

        With ``shard=(r, w)``, only the batches ``i`` with ``i % w == r``."""
        rank, world = shard
        count, size = len(self.loading.samples), self.loading.batch_size
        yield from self.loading.run([[(0, i) for i in range(s, min(s + size, count))]
                                     for s in range(rank * size, count, world * size)])


def seg_data(train: SegSource, val: SegSource, num_classes: int, normalise: Normalise,
             crop: Tuple[int, int], scale: Tuple[float, float], batch_size: int, seed: int,
             device: torch.device, workers: int, channels_last: bool) -> Data:
    """Wrap a dataset's train and val splits as :class:`Data` of segmentation loaders."""
    train_samples = SegSamples(train, normalise, seed, crop, scale)
    val_samples = SegSamples(val, normalise, seed)
    n = len(train)
    info = DataInfo(num_samples=n, labels=torch.full((n,), -1, dtype=torch.int64),
                    num_classes=num_classes, input_shape=(3, crop[0], crop[1]),
                    task=SEGMENTATION)
    return Data(train=SegTrainLoader(train_samples, batch_size, workers, device, channels_last),
                val=SegEvalLoader(val_samples, batch_size, workers, device, channels_last),
                info=info)
