"""FitNet hint learning (Romero et al. 2015; RepDistiller ``distiller_zoo/FitNet.py``).

A regressor maps the student's stage ``hint_stage`` output onto the teacher's output of the
same stage, and the hint loss is the mean squared error between the two maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.config import require_non_negative, require_positive
from methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from methods.errors import ConfigError
from methods.features import TapShapes


def hint_loss(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of two (B, C, H, W) maps (a scalar)."""
    return F.mse_loss(regressed, target)


class HintRegressor(nn.Module):
    """conv3x3 + BN + ReLU from ``in_channels`` to ``out_channels``, then resize to ``out_size``.

    The output is average-pooled (adaptive) when the student map is larger than the teacher's
    and bilinearly upsampled otherwise; equal sizes are left alone.
    """

    def __init__(self, in_channels: int, out_channels: int, out_size: Tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)."""
        x = F.relu(self.bn(self.conv(x)))
        h, w = x.shape[-2:]
        th, tw = self.out_size
        if (h, w) == (th, tw):
            return x
        if h >= th and w >= tw:
            return F.adaptive_avg_pool2d(x, self.out_size)
        return F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)


@dataclass
class FitNetConfig:
    """hint_stage: 0-based index into ``Features.stages`` (1 = RepDistiller's middle hint);
    ce_weight: weight of CE (>= 0); hint_weight: weight of the hint MSE (> 0)."""

    hint_stage: int = 1
    ce_weight: float = 1.0
    hint_weight: float = 100.0

    def validate(self) -> None:
        if not isinstance(self.hint_stage, int) or isinstance(self.hint_stage, bool) \
                or self.hint_stage < 0:
            raise ConfigError("hint_stage", f"must be an integer >= 0, got {self.hint_stage!r}",
                              fix="set hint_stage to a 0-based stage index")
        require_non_negative("ce_weight", self.ce_weight)
        require_positive("hint_weight", self.hint_weight)


@register_distiller("fitnet")
class FitNet(Distiller):
    """Student trained with ``ce_weight * CE + hint_weight * MSE(regressor(f_s), f_t)``."""

    display_name = "FitNet"

    Config = FitNetConfig

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: FitNetConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        c_s = s_shapes.stages[cfg.hint_stage][0]
        c_t, h_t, w_t = t_shapes.stages[cfg.hint_stage]
        self.regressor = HintRegressor(c_s, c_t, (h_t, w_t))

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        n_t = len(teacher.stages) if teacher is not None else 0
        n_s = len(student.stages)
        if cfg.hint_stage >= min(n_t, n_s):
            raise ConfigError(
                "hint_stage",
                f"stage {cfg.hint_stage} does not exist in both models: the teacher has {n_t} "
                f"stages and the student {n_s}",
                fix=f"set hint_stage between 0 and {min(n_t, n_s) - 1}")

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        target = self.teacher_features(x).stages[self.cfg.hint_stage]
        feats = self.student.forward_features(x)
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(feats.logits, y)
        regressed = self.regressor(feats.stages[self.cfg.hint_stage])
        terms["loss_hint"] = self.cfg.hint_weight * hint_loss(regressed, target)
        return feats.logits, terms
