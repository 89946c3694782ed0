"""Hinton knowledge distillation (RepDistiller ``distiller_zoo/KD.py``, methods.md 1.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import Distiller, LossTerms, register_distiller
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL divergence of the student from the teacher.

    logits_s, logits_t: (B, num_classes) unnormalised logits; temperature: T > 0.
    Returns the scalar ``T^2 * (1/B) * sum_i KL(softmax(z_t,i/T) || softmax(z_s,i/T))``
    (KL in nats, summed over classes, averaged over the batch).
    """
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def check_same_classes(teacher: TapShapes | None, student: TapShapes) -> None:
    """Raise ConfigError("teacher", ...) when the two classifiers' class counts differ."""
    if teacher is not None and teacher.num_classes != student.num_classes:
        raise ConfigError(
            "teacher",
            f"the teacher predicts {teacher.num_classes} classes but the student "
            f"{student.num_classes}, so their logits cannot be matched",
            fix="use a teacher trained on the student's dataset")


@dataclass
class KDConfig:
    """temperature: T > 0; ce_weight: gamma >= 0; kd_weight: alpha > 0 (methods.md 1.3)."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self) -> None:
        require_positive("temperature", self.temperature)
        require_non_negative("ce_weight", self.ce_weight)
        require_positive("kd_weight", self.kd_weight)


@register_distiller("kd")
class KD(Distiller):
    """Student trained with ``ce_weight * CE + kd_weight * kd_loss``."""

    display_name = "KD"

    Config = KDConfig

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        check_same_classes(teacher, student)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        logits_t = self.teacher_features(x).logits
        logits = self.student.forward_features(x).logits
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(logits, y)
        terms["loss_kd"] = self.cfg.kd_weight * kd_loss(logits, logits_t, self.cfg.temperature)
        return logits, terms
