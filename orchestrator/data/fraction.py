"""Training on a fixed, seeded, class-stratified fraction of a training split (data efficiency)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.checks import require_int


@dataclass
class TrainFraction:
    """Settings every dataset has (a base of each dataset's Config).

    train_fraction: the share of the training split used, in (0, 1]; the same subset for every
                    method and run seed, so data efficiency is a study axis.
    fraction_seed:  the seed that picks the subset (independent of the run's seed).
    """

    train_fraction: float = 1.0
    fraction_seed: int = 0

    def validate_fraction(self) -> None:
        if (isinstance(self.train_fraction, bool) or not isinstance(self.train_fraction, (int, float))
                or not 0 < self.train_fraction <= 1):
            raise ConfigError("train_fraction", f"must be in (0, 1], got {self.train_fraction!r}",
                              fix="set train_fraction to e.g. 0.4 for 40% of the training split")
        require_int("fraction_seed", self.fraction_seed, 0)

    def train_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """Sorted (M,) int64 indices of the training samples to keep (all when fraction is 1)."""
        return stratified_subset(labels, float(self.train_fraction), self.fraction_seed)


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of ``round(fraction * n_c)`` samples (at least one) of every class c.

    labels: (N,) int64. The pick depends only on ``labels``, ``fraction`` and ``seed``.
    """
    if fraction >= 1:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values
