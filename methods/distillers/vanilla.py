"""Vanilla: the student trained alone with cross-entropy (the no-distillation baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from methods.config import require_positive
from methods.distillers.base import Distiller, LossTerms, register_distiller


@dataclass
class VanillaConfig:
    """ce_weight: weight of the cross-entropy term (> 0)."""

    ce_weight: float = 1.0

    def validate(self) -> None:
        require_positive("ce_weight", self.ce_weight)


@register_distiller("vanilla")
class Vanilla(Distiller):
    """Cross-entropy only; any teacher passed in is ignored."""

    display_name = "Student (alone)"

    Config = VanillaConfig

    @classmethod
    def teacher_request(cls, cfg: VanillaConfig) -> None:
        return None

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        logits = self.student.forward_features(x).logits
        return logits, {"loss_ce": self.cfg.ce_weight * F.cross_entropy(logits, y)}
