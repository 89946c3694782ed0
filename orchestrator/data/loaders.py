"""The loader interface the job runner consumes, and the seeding that makes resumes exact.

A training loader yields an epoch's batches from any step on; the batches of step ``s`` of
epoch ``e`` depend only on ``(seed, e, s)``, never on the global RNG or on earlier steps, so
a job killed mid-epoch and resumed at ``start_step`` sees bit-identical batches.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, Tuple

import torch

from kdflow.methods.distillers.base import DataInfo


class Batch(NamedTuple):
    """One batch on the training device.

    x:     (B, C, H, W) float32 normalised images.
    y:     (B,) int64 class labels.
    index: (B,) int64 position of each sample in its split (the train split for training
           batches, which is what CRD's memory bank is indexed by).
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


#: ``(rank, world_size)``: which of ``world_size`` processes is asking for batches.
Shard = Tuple[int, int]


def local_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The contiguous rows of a global batch of ``batch_size`` that ``rank`` trains on.

    The first ``batch_size % world_size`` ranks get one row more than the others.
    """
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class TrainLoader(Protocol):
    """Shuffled, augmented training batches; ``steps_per_epoch`` global batches per epoch."""

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` (0-based) to the epoch's end.

        With ``shard=(r, w)`` each is rank r's rows (:func:`local_rows`) of the global batch;
        a loader decodes only those rows when it can.
        """
        ...


class EvalLoader(Protocol):
    """Un-augmented batches covering the evaluation split once, in order."""

    def batches(self, shard: Shard = (0, 1)) -> Iterator[Batch]:
        """Every sample of the split exactly once, in split order; with ``shard=(r, w)`` only
        the batches ``i`` with ``i % w == r``."""
        ...


@dataclass
class Data:
    """A built dataset: its training and validation loaders and facts about the train split."""

    train: TrainLoader
    val: EvalLoader
    info: DataInfo


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed hash of ``parts`` (e.g. ``(seed, epoch, step)``)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def check_start_step(start_step: int, steps_per_epoch: int) -> None:
    """Raise ValueError unless ``0 <= start_step <= steps_per_epoch``."""
    if not 0 <= start_step <= steps_per_epoch:
        raise ValueError(f"start_step {start_step} is outside 0..{steps_per_epoch}")
