"""Teacher-free spectral regulariser (kdflow reference).

Reference: the teacher-free loss motivated by "Learning to Project for Cross-Task Knowledge
Distillation" (Auty et al., arXiv 2403.14494; methods.md 4.3). The paper's formula was NOT
obtained; this module implements the [KDFLOW] reference candidate of methods.md 4.3, which
follows from the 4.2 decomposition when the teacher's subspace is replaced by the student's own
dominant subspace. It is not paper-verified.

With the student features ``Z`` (n x d, centred over the batch) and their singular values
``s_1 >= ... >= s_m`` (m = min(n, d)), the penalty is the share of the feature energy outside
the ``keep`` leading directions:

* tail: ``L_sr = sum_{i > keep} s_i^2 / sum_i s_i^2``;
* soft: ``L_sr = sum_i w_i s_i^2 / sum_i s_i^2`` with ``w_i = i / d`` for ``i > keep`` and
  ``w_i = 0`` for ``i <= keep`` (an increasing weight; ``keep`` leading values stay free in
  both modes).

The loss needs no teacher, so the method's job has no teacher dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative
from kdflow.methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes

FEATURES = ("embedding", "stage")
MODES = ("tail", "soft")


def feature_rows(z: torch.Tensor) -> torch.Tensor:
    """(B, D) vectors as they are, or a (B, C, H, W) map as its (B*H*W, C) pixel vectors."""
    if z.dim() == 4:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return z


def spectral_penalty(z: torch.Tensor, keep: int, mode: str) -> torch.Tensor:
    """Share of the batch-centred feature energy outside the ``keep`` leading singular directions.

    z: (B, D) vectors or (B, C, H, W) maps (n = B*H*W rows of d = C channels); keep: k >= 1;
    mode: ``tail`` or ``soft`` (module docstring). Singular values come from
    ``torch.linalg.svdvals`` in at least float32, outside autocast. Returns a scalar in [0, 1].
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        rows = feature_rows(z).to(dtype)
        rows = rows - rows.mean(dim=0, keepdim=True)
        energy = torch.linalg.svdvals(rows).square()                     # (m,), descending
        rank = torch.arange(1, energy.shape[0] + 1, device=z.device, dtype=dtype)
        if mode == "tail":
            weights = (rank > keep).to(dtype)
        else:
            weights = torch.where(rank > keep, rank / rows.shape[1], torch.zeros_like(rank))
        total = energy.sum().clamp_min(torch.finfo(dtype).tiny)
        return (weights * energy).sum() / total


@dataclass
class SpectralConfig:
    """feature: embedding (pooled ``Features.embedding``) | stage (dense map
    ``Features.stages[stage]``); stage: index into ``Features.stages`` (negative counts from
    the end); keep: k >= 1 leading singular values left unpenalised; mode: tail | soft;
    weight: weight of the penalty (>= 0); ce_weight: weight of CE (>= 0). Defaults are [KDFLOW]."""

    feature: str = "embedding"
    stage: int = -1
    keep: int = 8
    mode: str = "tail"
    weight: float = 0.1
    ce_weight: float = 1.0

    def validate(self) -> None:
        if self.feature not in FEATURES:
            raise ConfigError("feature", f"unknown value {self.feature!r}", allowed=FEATURES,
                              fix="set feature to embedding or stage")
        if not isinstance(self.stage, int) or isinstance(self.stage, bool):
            raise ConfigError("stage", f"must be an integer, got {self.stage!r}",
                              fix="set stage to a stage index (-1 = the last stage)")
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 1:
            raise ConfigError("keep", f"must be an integer >= 1, got {self.keep!r}",
                              fix="set keep to the number of leading singular values to leave free")
        if self.mode not in MODES:
            raise ConfigError("mode", f"unknown value {self.mode!r}", allowed=MODES,
                              fix="set mode to tail or soft")
        require_non_negative("weight", self.weight)
        require_non_negative("ce_weight", self.ce_weight)


@register_distiller("spectral_reg")
class SpectralReg(Distiller):
    """Student trained alone with ``ce_weight * CE + weight * spectral_penalty`` [KDFLOW].

    A teacher passed in is ignored; the method adds no trainable module.
    """

    display_name = "Spectral reg."

    Config = SpectralConfig

    @classmethod
    def teacher_request(cls, cfg: SpectralConfig) -> None:
        return None

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: SpectralConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        self.checked_taps(data)

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        if cfg.feature == "stage":
            n = len(student.stages)
            if not -n <= cfg.stage < n:
                raise ConfigError("stage", f"stage {cfg.stage} does not exist: the student has "
                                           f"{n} stages", fix=f"set stage between {-n} and {n - 1}")
            dim = student.stages[cfg.stage][0]
        else:
            dim = student.embedding_dim
        if cfg.keep >= dim:
            raise ConfigError("keep", f"keep {cfg.keep} leaves nothing to penalise: the "
                                      f"feature has {dim} channels",
                              fix=f"set keep below {dim}")

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        feats = self.student.forward_features(x)
        z = feats.stages[self.cfg.stage] if self.cfg.feature == "stage" else feats.embedding
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(feats.logits, y)
        terms["loss_spectral"] = self.cfg.weight * spectral_penalty(z, self.cfg.keep,
                                                                   self.cfg.mode)
        return feats.logits, terms
