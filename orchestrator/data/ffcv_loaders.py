"""Training and evaluation loaders reading FFCV .beton files (``data.loader=ffcv``).

FFCV decodes each batch with numba-compiled code on ``workers`` threads; the decoders of
:mod:`orchestrator.data.ffcv_ops` crop and flip each sample as ``(seed, epoch, sample)`` fix.
kdflow keeps the order: every epoch's order is the same seeded permutation the other loaders
use, handed to FFCV sample by sample, so a resumed epoch skips its first steps without
decoding them. Under torch.distributed a rank
decodes only its own rows of every global batch (its shard). Batches come back as uint8 HWC,
move to the training device as such (a quarter of float32's bytes), and are normalised there;
a (B, H, W, 3) batch permuted to (B, 3, H, W) already is channels_last. For a CPU device the
decoders normalise in FFCV's threads instead (one pass fewer on the cores that also decode).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from kdflow.methods.distillers.base import DataInfo
from kdflow.orchestrator.data.ffcv_import import import_ffcv
from kdflow.orchestrator.data.loaders import Batch, Data, Shard, check_start_step, generator, local_rows

import_ffcv()  # before anything imports ffcv (builders import this module before ffcv_ops)

#: Batches FFCV decodes ahead of the one being trained on.
BATCHES_AHEAD = 3

#: ``make(normalise)``: the FFCV decoder of the image field (a fresh operation per FFCV Loader);
#: ``normalise`` is ``(mean, std)`` when the decoder is to normalise, else None (uint8 out).
DecoderFactory = Callable[[Optional[Tuple[Sequence[float], Sequence[float]]]], object]


class _PlannedOrder:
    """An FFCV traversal order that returns whatever sample ids kdflow planned for the epoch."""

    def __init__(self) -> None:
        self.planned = np.zeros(0, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.planned


class _Reader:
    """FFCV Loaders over one .beton, one per batch size (ranks' shards differ in size).

    The decoder (:class:`orchestrator.data.ffcv_ops.CropDecoder`) is told the epoch before
    each pass.
    """

    def __init__(self, path: str, image_decoder: Callable[[], object], workers: int) -> None:
        self.path = path
        self.image_decoder = image_decoder
        self.workers = workers
        self.loaders: Dict[int, object] = {}
        self.decoders: Dict[int, object] = {}

    def loader(self, batch_size: int, epoch: int) -> object:
        """The FFCV Loader of ``batch_size``-sample chunks (made on first use), set to ``epoch``."""
        if batch_size not in self.loaders:
            from ffcv.fields.basics import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline import PipelineSpec
            from ffcv.transforms import ToTensor

            decoder = self.image_decoder()
            loader = Loader(self.path, batch_size=batch_size, num_workers=max(1, self.workers),
                            order=OrderOption.SEQUENTIAL, drop_last=False, os_cache=True,
                            batches_ahead=BATCHES_AHEAD,
                            pipelines={"image": PipelineSpec("image", decoder, [ToTensor()]),
                                       "label": [IntDecoder(), ToTensor()]})
            loader.traversal_order = _PlannedOrder()
            self.loaders[batch_size], self.decoders[batch_size] = loader, decoder
        self.decoders[batch_size].set_epoch(epoch)
        return self.loaders[batch_size]

    def read(self, ids: np.ndarray, batch_size: int, epoch: int = 0
             ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(images (b, H, W, 3) uint8, labels (b,) int64) for ``ids`` in chunks of ``batch_size``,
        with ``epoch``'s random crops.

        The images share FFCV's buffers: use them before asking for the batch after next.
        """
        if len(ids) == 0:
            return
        loader = self.loader(batch_size, epoch)
        loader.traversal_order.planned = ids.astype(np.uint64)
        passing = iter(loader)
        try:
            for images, labels in passing:
                yield images, labels.view(-1).to(torch.int64, copy=True)
        finally:
            passing.close()


class _ToDevice:
    """FFCV's batch -> (b, 3, H, W) float32 normalised on ``device``, in the layout asked.

    A (b, H, W, 3) uint8 batch (decoders without ``normalise``, used for accelerators) moves as
    uint8 (a quarter of the float bytes), takes its layout, and is normalised on the device in
    one pass: ``x / (255 std) - mean / std``. A (b, 3, H, W) float32 batch (decoders that
    normalise, used on the CPU) is already normalised; it is copied out of FFCV's buffers,
    which FFCV reuses a few batches later.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
        self.scale = (1 / (255 * std_t)).view(1, 3, 1, 1)
        self.shift = (-mean_t / std_t).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> Batch:
        if images.dtype == torch.uint8:
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=self.memory_format)
            x = torch.addcmul(self.shift, x.float(), self.scale)
            x = x.contiguous(memory_format=self.memory_format)
        else:
            x = images.to(self.device, memory_format=self.memory_format, copy=True)
        return Batch(x,
                     labels.to(self.device, non_blocking=True),
                     torch.from_numpy(index.astype(np.int64)).to(self.device))


class FfcvTrainLoader:
    """Shuffled, augmented batches of the samples ``keep`` of a .beton (the training split).

    keep: (M,) sample ids of the .beton in use (a train fraction keeps some); a batch's
    ``index`` is the position in ``keep``. ``steps_per_epoch = ceil(M / batch_size)``.
    """

    def __init__(self, reader: _Reader, keep: np.ndarray, batch_size: int, seed: int,
                 to_device: _ToDevice) -> None:
        self.reader = reader
        self.keep = keep
        self.batch_size = batch_size
        self.seed = seed
        self.to_device = to_device
        self.steps_per_epoch = math.ceil(len(keep) / batch_size)

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """This shard's rows of the batches of ``epoch`` from ``start_step`` on."""
        check_start_step(start_step, self.steps_per_epoch)
        rank, world = shard
        order = torch.randperm(len(self.keep), generator=generator(self.seed, epoch)).numpy()
        rows = []
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            rows.append(batch[local_rows(len(batch), rank, world)])
        if not rows:
            return
        positions = np.concatenate(rows)
        mine = local_rows(self.batch_size, rank, world)  # this rank's rows of a full batch
        full = mine.stop - mine.start
        chunks = iter(rows)
        for images, labels in self.reader.read(self.keep[positions], full, epoch):
            yield self.to_device(images, labels, next(chunks))


class FfcvEvalLoader:
    """The samples of a .beton once, in order; shard (r, w) gets the batches i % w == r."""

    def __init__(self, reader: _Reader, count: int, batch_size: int, to_device: _ToDevice) -> None:
        self.reader = reader
        self.count = count
        self.batch_size = batch_size
        self.to_device = to_device

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        rank, world = shard
        starts = range(rank * self.batch_size, self.count, world * self.batch_size)
        rows = [np.arange(s, min(s + self.batch_size, self.count)) for s in starts]
        if not rows:
            return
        chunks = iter(rows)
        for images, labels in self.reader.read(np.concatenate(rows), self.batch_size):
            yield self.to_device(images, labels, next(chunks))


def beton_labels(path: str) -> torch.Tensor:
    """(N,) int64 labels of a .beton's ``label`` field, read from its metadata (no images)."""
    from ffcv.reader import Reader

    reader = Reader(path)
    column = f"f{reader.field_names.index('label')}"  # FFCV names metadata columns by position
    return torch.from_numpy(np.array(reader.metadata[column], dtype=np.int64))


def ffcv_data(train_path: str, val_path: str, train_decoder: DecoderFactory,
              val_decoder: DecoderFactory, keep: Callable[[torch.Tensor], torch.Tensor],
              num_classes: int, input_shape: Tuple[int, int, int], mean: Sequence[float],
              std: Sequence[float], batch_size: int, seed: int, device: torch.device,
              workers: int, channels_last: bool) -> Data:
    """:class:`Data` over a train and a val .beton.

    train_decoder / val_decoder: make the image field's FFCV decoder given ``normalise``. On a
    CPU device the decoders normalise (float32 CHW out, in FFCV's threads); for an accelerator
    they hand over uint8 HWC, normalised there.
    keep: train labels (N,) -> sorted indices of the training samples used (a train fraction).
    mean, std: per-channel statistics of images scaled to [0, 1].
    """
    labels = beton_labels(train_path)
    kept = keep(labels)
    to_device = _ToDevice(mean, std, device, channels_last)
    normalise = (mean, std) if device.type == "cpu" else None
    train = FfcvTrainLoader(_Reader(train_path, lambda: train_decoder(normalise), workers),
                            kept.numpy(), batch_size, seed, to_device)
    val = FfcvEvalLoader(_Reader(val_path, lambda: val_decoder(normalise), workers),
                         len(beton_labels(val_path)), batch_size, to_device)
    info = DataInfo(num_samples=len(kept), labels=labels[kept], num_classes=num_classes,
                    input_shape=input_shape)
    return Data(train=train, val=val, info=info)
