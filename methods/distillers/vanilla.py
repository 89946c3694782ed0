"""Vanilla: the student trained alone with cross-entropy (the no-distillation baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch
from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.segmentation_losses import supervised_loss
from kdflow.methods.tasks import CLASSIFICATION, SEGMENTATION


@dataclass
class VanillaConfig:
    """ce_weight: weight of the cross-entropy term (> 0); aux_weight: weight of the auxiliary
    head's cross-entropy relative to the main one, for models with one (segmentation; 0.4 as
    CIRKD's recipe and LAD's teacher, methods.md 5.3)."""

    ce_weight: float = 1.0
    aux_weight: float = 0.4
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("aux_weight",)

    def validate(self) -> None:
        require_positive("ce_weight", self.ce_weight)
        require_non_negative("aux_weight", self.aux_weight)


@register_distiller("vanilla")
class Vanilla(Distiller):
    """Cross-entropy only; any teacher passed in is ignored."""

    display_name = "Student (alone)"
    tasks = (CLASSIFICATION, SEGMENTATION)

    Config = VanillaConfig

    @classmethod
    def teacher_request(cls, cfg: VanillaConfig) -> None:
        return None

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels or (B, H, W) label maps, index unused."""
        feats = self.student.forward_features(x)
        return feats.logits, {"loss_ce": self.cfg.ce_weight
                              * supervised_loss(feats, y, self.cfg.aux_weight)}
