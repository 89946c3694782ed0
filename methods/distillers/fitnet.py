"""FitNet hint learning (Romero et al. 2015) as RepDistiller and mdistiller run it.

Read (not copied) from RepDistiller ``train_student.py`` (``--distill hint``, default
``--hint_layer 2``), ``models/util.py::ConvReg`` and ``distiller_zoo/FitNet.py``, and mdistiller
``mdistiller/distillers/FitNet.py`` / ``_common.py::ConvReg``:

* The hint is ``feats[hint_layer]`` of ``model(x, is_feat=True, preact=False)``: a stage output
  after its ReLU (ResNet, VGG, ShuffleNet), or the block output for families whose blocks end
  without one (WRN, MobileNetV2), which is what kdflow's ``Features.stages`` (or
  ``Features.stem``) holds. RepDistiller's list is ``[stem, stage 1, stage 2, ...]`` for the
  ResNets, WRNs, ShuffleNet V1/V2, MobileNetV2 and ResNet50, but ``[block0, block1, ...]`` for
  VGG, whose first block kdflow counts as a stage: :func:`hint_index` maps the one onto the
  other, so ``hint_layer: 2`` is stage 1 of a ResNet and stage 2 (block2, 256@8x8 at 32 px) of
  a VGG.
* ``direction: standard`` (the official FitNet): :class:`HintRegressor`, RepDistiller's ConvReg,
  maps the student's hint into the teacher's space, and the loss is the per-element MSE against
  the teacher's hint.
* ``direction: inverted`` [KDFLOW: methods.md 4.2, not an official FitNet setting]: the
  inverted projector of cross-task KD. A 1x1 conv with bias maps the teacher's hint, bilinearly
  resized to the student's H x W, into the student's channels, and the loss is the per-element
  MSE against the student's hint (``projection.py``'s projector and loss). The teacher's
  features stay constants; gradients reach the student and the projector.

The plan-time check (:meth:`FitNet.check_taps`) decides everything from the tap shapes
(``TapShapes.stem_is_first_stage`` marks VGG), so a pair without the hint map, or with maps
ConvReg has no layer for, is refused before any job starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.projection import (DIRECTIONS, make_projector, projection_loss,
                                                  require_choice)
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import Features, TapShapes

Shape = Tuple[int, int, int]

# RepDistiller's default --hint_layer, the FitNet rows of its tables.
DEFAULT_HINT_LAYER = 2

def hint_loss(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of two (B, C, H, W) maps (a scalar)."""
    return F.mse_loss(regressed, target)


def hint_index(taps: TapShapes, hint_layer: int) -> int | None:
    """Where RepDistiller's ``feats[hint_layer]`` of a model with these taps is in kdflow's
    Features: an index into ``Features.stages``, or None for ``Features.stem``.

    RepDistiller's list is ``[stem, stage 1, ...]``, except for models whose stem is their first
    stage (VGG, ``TapShapes.stem_is_first_stage``): ``[block0, block1, ...]``.
    """
    if taps.stem_is_first_stage:
        return hint_layer
    return None if hint_layer == 0 else hint_layer - 1


def select_hint(feats: Features, index: int | None) -> torch.Tensor:
    """The (B, C, H, W) hint map: ``feats.stages[index]``, or ``feats.stem`` for None."""
    return feats.stem if index is None else feats.stages[index]


class ConvSpec(NamedTuple):
    """The convolution of RepDistiller's ConvReg: ``nn.ConvTranspose2d`` when ``transpose``."""

    transpose: bool
    kernel: Tuple[int, int]
    stride: int
    padding: int


def regressor_spec(student: Shape, teacher: Shape) -> ConvSpec | None:
    """ConvReg's convolution from a (C_s, H_s, W_s) student map to a (C_t, H_t, W_t) teacher map.

    H_s = 2 H_t: 3x3, stride 2, padding 1; 2 H_s = H_t: transposed 4x4, stride 2, padding 1;
    H_s >= H_t: ``(1 + H_s - H_t) x (1 + W_s - W_t)``, stride 1, no padding (1x1 for equal
    sizes). None for any other sizes (a student map smaller than the teacher's by other than
    half), where the official code raises. Widths are held to the same rule as heights.
    """
    _, h_s, w_s = student
    _, h_t, w_t = teacher
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        return ConvSpec(False, (3, 3), 2, 1)
    if (2 * h_s, 2 * w_s) == (h_t, w_t):
        return ConvSpec(True, (4, 4), 2, 1)
    if h_s >= h_t and w_s >= w_t:
        return ConvSpec(False, (1 + h_s - h_t, 1 + w_s - w_t), 1, 0)
    return None


def check_regressor(student: Shape, teacher: Shape, field: str) -> ConvSpec:
    """:func:`regressor_spec`, or ConfigError(field, ...) where ConvReg has no layer."""
    spec = regressor_spec(student, teacher)
    if spec is None:
        raise ConfigError(
            field, f"the student's hint map {student} is smaller than the teacher's {teacher} by "
            "other than a factor 2, and RepDistiller's regressor (ConvReg) has no layer for that",
            fix=f"pick a {field} where the student's map is at least half the teacher's side, "
            "or set direction: inverted (its projector resizes the teacher's map)")
    return spec


class HintRegressor(nn.Module):
    """RepDistiller's ConvReg: ``relu(bn(conv(x)))``, conv from :func:`regressor_spec` with bias.

    Maps (B, C_s, H_s, W_s) student hints to (B, C_t, H_t, W_t), the teacher's hint shape.
    """

    def __init__(self, student: Shape, teacher: Shape, field: str = "hint_layer") -> None:
        super().__init__()
        spec = check_regressor(student, teacher, field)
        layer = nn.ConvTranspose2d if spec.transpose else nn.Conv2d
        self.conv = layer(student[0], teacher[0], spec.kernel, stride=spec.stride,
                          padding=spec.padding)
        self.bn = nn.BatchNorm2d(teacher[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)."""
        return F.relu(self.bn(self.conv(x)))


def _require_index(name: str, value: Any, optional: bool) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(name, f"must be an integer >= 0, got {value!r}",
                          fix=f"set {name} to a 0-based index" + (" or null" if optional else ""))


@dataclass
class FitNetConfig:
    """hint_layer: RepDistiller's ``--hint_layer``, an index into its feature list
    (``[stem, stage 1, ...]``; VGG ``[block0, ...]``), 2 by default as in its tables;
    hint_stage: a 0-based index into ``Features.stages`` of both models instead of hint_layer
    (null: use hint_layer); direction: standard (ConvReg, student -> teacher) | inverted
    ([KDFLOW] 1x1 projector, teacher -> student); ce_weight: weight of CE (>= 0);
    hint_weight: weight of the hint MSE (> 0)."""

    hint_layer: int = DEFAULT_HINT_LAYER
    hint_stage: int | None = None
    direction: str = "standard"
    ce_weight: float = 1.0
    hint_weight: float = 100.0
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("hint_stage", "direction")

    def validate(self) -> None:
        _require_index("hint_layer", self.hint_layer, optional=False)
        _require_index("hint_stage", self.hint_stage, optional=True)
        if self.hint_stage is not None and self.hint_layer != DEFAULT_HINT_LAYER:
            raise ConfigError("hint_stage", f"is set ({self.hint_stage}) together with "
                              f"hint_layer ({self.hint_layer}); both choose the hint",
                              fix="keep hint_layer (RepDistiller's index) or hint_stage "
                              "(kdflow's stage index), not both")
        require_choice("direction", self.direction, DIRECTIONS)
        require_non_negative("ce_weight", self.ce_weight)
        require_positive("hint_weight", self.hint_weight)


def _hint_shape(taps: TapShapes, index: int | None, role: str, hint_layer: int) -> Shape:
    """(C, H, W) of the hint map at ``index`` (a stage, or None for the stem) of a model with
    ``taps``; ConfigError(hint_layer, ...) when RepDistiller's ``feats[hint_layer]`` is no map
    of it."""
    if index is None:
        if taps.stem is None:
            raise ConfigError("hint_layer", f"hint_layer 0 is the stem, and the {role} exposes "
                              "no stem map", fix="set hint_layer to 1 or more")
        return taps.stem
    if index < len(taps.stages):
        return taps.stages[index]
    first, maps = ("block0", len(taps.stages)) if taps.stem_is_first_stage else \
        ("the stem", len(taps.stages) + 1)
    raise ConfigError(
        "hint_layer", f"RepDistiller's feats[{hint_layer}] of the {role} is not a feature map: "
        f"its list ({first}, then the stages) holds {maps} maps",
        fix=f"set hint_layer between 0 and {maps - 1}")


def _hint_field(cfg: "FitNetConfig") -> str:
    """The setting that chose the hint: ``hint_stage`` when set, else ``hint_layer``."""
    return "hint_layer" if cfg.hint_stage is None else "hint_stage"


def hint_shapes(cfg: "FitNetConfig", teacher: TapShapes,
                student: TapShapes) -> Tuple[Tuple[int | None, Shape], Tuple[int | None, Shape]]:
    """((teacher index, teacher hint shape), (student index, student hint shape)) that ``cfg``
    selects; an index is into ``Features.stages``, None for the stem. ConfigError naming
    ``hint_stage`` or ``hint_layer`` when a model has no such map."""
    if cfg.hint_stage is not None:
        n_t, n_s = len(teacher.stages), len(student.stages)
        if cfg.hint_stage >= min(n_t, n_s):
            raise ConfigError(
                "hint_stage",
                f"stage {cfg.hint_stage} does not exist in both models: the teacher has {n_t} "
                f"stages and the student {n_s}",
                fix=f"set hint_stage between 0 and {min(n_t, n_s) - 1}")
        return ((cfg.hint_stage, teacher.stages[cfg.hint_stage]),
                (cfg.hint_stage, student.stages[cfg.hint_stage]))
    picked = []
    for role, taps in (("teacher", teacher), ("student", student)):
        index = hint_index(taps, cfg.hint_layer)
        picked.append((index, _hint_shape(taps, index, role, cfg.hint_layer)))
    return picked[0], picked[1]


@register_distiller("fitnet")
class FitNet(Distiller):
    """Student trained with ``ce_weight * CE + hint_weight * MSE`` on the hint maps.

    ``regressor``: the trainable map between the two hints, ConvReg C_s -> C_t (standard) or a
    1x1 conv C_t -> C_s (inverted); it is not part of the exported student.
    """

    display_name = "FitNet"

    Config = FitNetConfig

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: FitNetConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        (self.teacher_index, t_shape), (self.student_index, s_shape) = hint_shapes(
            cfg, t_shapes, s_shapes)
        if cfg.direction == "standard":
            self.regressor = HintRegressor(s_shape, t_shape, _hint_field(cfg))
        else:
            self.regressor = make_projector(t_shape[0], s_shape[0], dense=True)

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        """Both models have the hint map ``cfg`` selects and, for the standard direction,
        ConvReg has a layer for the pair of maps (all decided from the tap shapes, so a study is
        refused at plan time)."""
        if teacher is None:
            raise ConfigError("teacher", "FitNet needs a teacher")
        (_, t_shape), (_, s_shape) = hint_shapes(cfg, teacher, student)
        if cfg.direction == "standard":
            check_regressor(s_shape, t_shape, _hint_field(cfg))

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        target = select_hint(self.teacher_features(x), self.teacher_index)
        feats = self.student.forward_features(x)
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(feats.logits, y)
        hint = select_hint(feats, self.student_index)
        if self.cfg.direction == "standard":
            loss = hint_loss(self.regressor(hint), target)
        else:
            loss = projection_loss(hint, target, self.regressor, "inverted", "mse")
        terms["loss_hint"] = self.cfg.hint_weight * loss
        return feats.logits, terms
