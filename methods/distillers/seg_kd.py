"""Standard logit distillation for semantic segmentation: pixel-wise KD or CWD (methods.md 5.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.kd import check_same_classes
from kdflow.methods.distillers.segmentation_losses import (MAP_LOSSES, map_distillation_loss,
                                                           supervised_loss)
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.tasks import SEGMENTATION


@dataclass
class SegKDConfig:
    """loss: pixel (per-pixel KL over classes) | cwd (per-channel KL over positions);
    temperature: tau > 0; kd_weight > 0; ce_weight >= 0; aux_weight: the student's auxiliary CE
    (0.4, CIRKD's). Defaults [KDFLOW]: pixel KD at tau = 4, LAD file's ``kl_kd`` alternative."""

    loss: str = "pixel"
    temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    aux_weight: float = 0.4

    def validate(self) -> None:
        if self.loss not in MAP_LOSSES:
            raise ConfigError("loss", f"unknown loss {self.loss!r}", allowed=MAP_LOSSES)
        require_positive("temperature", self.temperature)
        require_positive("kd_weight", self.kd_weight)
        require_non_negative("ce_weight", self.ce_weight)
        require_non_negative("aux_weight", self.aux_weight)


@register_distiller("seg_kd")
class SegKD(Distiller):
    """Student trained with ``ce_weight * (CE + aux_weight * CE_aux) + kd_weight * loss``
    against a plain segmentation teacher of the same classes."""

    display_name = "KD (pixel)"
    tasks = (SEGMENTATION,)

    Config = SegKDConfig

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        for role, taps in (("teacher", teacher), ("student", student)):
            if taps is not None and not taps.dense:
                raise ConfigError(role, "seg_kd distils per-pixel logits, and this model classifies",
                                  fix="pair two segmentation models, or use inverted_projection "
                                      "for a classifier teacher")
        check_same_classes(teacher, student)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, 3, H, W) images, y: (B, H, W) label maps (255 = ignore), index unused."""
        logits_t = self.teacher_features(x).logits
        feats = self.student.forward_features(x)
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * supervised_loss(feats, y, self.cfg.aux_weight)
        terms["loss_kd"] = self.cfg.kd_weight * map_distillation_loss(
            self.cfg.loss, feats.logits, logits_t, self.cfg.temperature)
        return feats.logits, terms
