"""The loader interface the job runner consumes, and the seeding that makes resumes exact.

A training loader yields an epoch's batches from any step on; the batches of step ``s`` of
epoch ``e`` depend only on ``(seed, e, s)``, never on the global RNG or on earlier steps, so
a job killed mid-epoch and resumed at ``start_step`` sees bit-identical batches.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol

import torch

from methods.distillers.base import DataInfo


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


class TrainLoader(Protocol):
    """Shuffled, augmented training batches; ``steps_per_epoch`` batches per epoch."""

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` (0-based) to the epoch's end."""
        ...


class EvalLoader(Protocol):
    """Un-augmented batches covering the evaluation split once, in order."""

    def batches(self) -> Iterator[Batch]:
        """Every sample of the split exactly once, in split order."""
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
