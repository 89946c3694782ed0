"""LAD: Label Assisted Distillation for semantic segmentation (methods.md 5).

Qiu et al., "Make a Strong Teacher with Label Assistance", arXiv 2407.13254; behaviour follows
the released ``train_baseline.py`` as recorded in methods.md 5.2-5.5.

* ``lad_teacher`` (stage A) trains a lightweight teacher whose first conv reads the image plus
  a noised label map as a 4th channel (LAD's input adapter). Two independently noised maps give
  two forward passes; the loss is both paths' cross-entropy (plus the auxiliary head's) and a
  dual-path consistency ``CWD(o1, o2) + CWD(o2, o1)`` (each call detaches its second argument):
  ``L_T = L_task + 5 * L_cons``.
* ``lad`` (stage B) trains an ordinary 3-channel student with
  ``CE + 0.02 * CE_aux + 3 * CWD(student, teacher)``, the teacher reading the image and the
  label map noised with the fixed codes. The student never reads labels at test time.

The released code feeds images as BGR minus the mean pixel on the 0-255 scale (no std division)
and scales the label channel by 100. kdflow's images are standardised (divided by a pixel std of
about 57.6 on that scale), so the label channel is scaled by ``label_scale = 100 / 57.6``: its
size relative to the image channels is the released code's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import (DataInfo, Distiller, LossTerms, TeacherRequest,
                                            register_distiller)
from kdflow.methods.distillers.kd import check_same_classes
from kdflow.methods.distillers.label_noise import (fixed_code_map, random_code_map,
                                                   with_label_channel)
from kdflow.methods.distillers.segmentation_losses import (MAP_LOSSES, cross_entropy, cwd_loss,
                                                           map_distillation_loss, supervised_loss)
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.base import build_model
from kdflow.methods.tasks import SEGMENTATION

#: The released code's label-channel factor (100) over the mean ImageNet pixel std on the
#: 0-255 scale ((58.395 + 57.12 + 57.375) / 3 = 57.63): see the module docstring.
LABEL_SCALE = round(100 / 57.63, 3)
#: Input channels of the label-assisted teacher: RGB plus the label map.
TEACHER_CHANNELS = 4


@dataclass
class LADTeacherConfig:
    """Stage A (methods.md 5.3). aux_weight: weight of the auxiliary head's CE (0.4);
    consistency_weight: weight of the dual-path CWD consistency (5); temperature: CWD's tau (4);
    noise_std: per-pixel noise on the N(0, 1) class codes (0.03); label_scale: factor on the
    label channel (see the module docstring)."""

    aux_weight: float = 0.4
    consistency_weight: float = 5.0
    temperature: float = 4.0
    noise_std: float = 0.03
    label_scale: float = LABEL_SCALE

    def validate(self) -> None:
        require_non_negative("aux_weight", self.aux_weight)
        require_non_negative("consistency_weight", self.consistency_weight)
        require_positive("temperature", self.temperature)
        require_non_negative("noise_std", self.noise_std)
        require_positive("label_scale", self.label_scale)


def _check_dense(student: TapShapes) -> None:
    if not student.dense:
        raise ConfigError("student", "LAD trains segmentation models, and this one classifies",
                          fix="use a segmentation model such as deeplabv3_resnet18")


@register_distiller("lad_teacher")
class LADTeacher(Distiller):
    """Trains LAD's label-assisted teacher (stage A); needs no teacher of its own.

    The trained network reads 4 channels; a job evaluates it on the label-assisted path with the
    noise-free fixed codes, the input it gets when it teaches (the released code evaluates the
    label channel at zero instead, a path its loss never trains: methods.md 5.7 pitfall 6).
    """

    display_name = "LAD teacher"
    tasks = (SEGMENTATION,)

    Config = LADTeacherConfig

    @classmethod
    def teacher_request(cls, cfg: LADTeacherConfig) -> None:
        return None

    @classmethod
    def build_student(cls, cfg: Any, name: str, num_classes: int) -> nn.Module:
        return build_model(name, num_classes, in_channels=TEACHER_CHANNELS)

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        _check_dense(student)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: LADTeacherConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        self.num_classes = data.num_classes

    def predict(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = fixed_code_map(y, self.num_classes, pixel_std=0.0)
        return self.student(with_label_channel(x, m, self.cfg.label_scale))

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, 3, H, W) images, y: (B, H, W) label maps (255 = ignore), index unused."""
        paths = [self.student.forward_features(with_label_channel(
            x, random_code_map(y, self.num_classes, self.cfg.noise_std), self.cfg.label_scale))
            for _ in range(2)]
        terms: LossTerms = {
            "loss_ce": sum(supervised_loss(f, y, self.cfg.aux_weight) for f in paths)}
        if self.cfg.consistency_weight > 0:
            o1, o2 = paths[0].logits, paths[1].logits
            terms["loss_consistency"] = self.cfg.consistency_weight * (
                cwd_loss(o1, o2, self.cfg.temperature) + cwd_loss(o2, o1, self.cfg.temperature))
        return paths[0].logits, terms


@dataclass
class LADConfig:
    """Stage B (methods.md 5.3, 5.5) and the stage-A settings of the teacher it needs.

    ce_weight, aux_weight: weights of the student's CE and auxiliary CE (1, 0.02);
    kd_weight: weight of the distillation loss (3); temperature: its tau (4);
    distill_loss: cwd (the released code) | pixel (pixel-wise KD, the file's alternative);
    noise_std: per-pixel noise on the fixed codes of the teacher's label map (0.02);
    label_scale: factor on the label channel; teacher_*: the teacher job's LADTeacherConfig
    (teacher_noise_std is its ``noise_std``).
    """

    ce_weight: float = 1.0
    aux_weight: float = 0.02
    kd_weight: float = 3.0
    temperature: float = 4.0
    distill_loss: str = "cwd"
    noise_std: float = 0.02
    label_scale: float = LABEL_SCALE
    teacher_aux_weight: float = 0.4
    teacher_consistency_weight: float = 5.0
    teacher_noise_std: float = 0.03

    def validate(self) -> None:
        require_positive("ce_weight", self.ce_weight)
        require_non_negative("aux_weight", self.aux_weight)
        require_positive("kd_weight", self.kd_weight)
        require_positive("temperature", self.temperature)
        if self.distill_loss not in MAP_LOSSES:
            raise ConfigError("distill_loss", f"unknown loss {self.distill_loss!r}",
                              allowed=MAP_LOSSES)
        require_non_negative("noise_std", self.noise_std)
        require_positive("label_scale", self.label_scale)
        require_non_negative("teacher_aux_weight", self.teacher_aux_weight)
        require_non_negative("teacher_consistency_weight", self.teacher_consistency_weight)
        require_non_negative("teacher_noise_std", self.teacher_noise_std)


@register_distiller("lad")
class LAD(Distiller):
    """The student distilled from LAD's label-assisted teacher (stage B)."""

    display_name = "LAD"
    tasks = (SEGMENTATION,)

    Config = LADConfig

    @classmethod
    def teacher_request(cls, cfg: LADConfig) -> TeacherRequest:
        return TeacherRequest(trainer="lad_teacher", settings={
            "aux_weight": cfg.teacher_aux_weight,
            "consistency_weight": cfg.teacher_consistency_weight,
            "temperature": cfg.temperature, "noise_std": cfg.teacher_noise_std,
            "label_scale": cfg.label_scale})

    @classmethod
    def build_teacher(cls, cfg: Any, name: str, num_classes: int) -> nn.Module:
        return build_model(name, num_classes, in_channels=TEACHER_CHANNELS)

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        _check_dense(student)
        check_same_classes(teacher, student)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: LADConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        self.num_classes = data.num_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, 3, H, W) images, y: (B, H, W) label maps (255 = ignore), index unused."""
        m = fixed_code_map(y, self.num_classes, self.cfg.noise_std)
        logits_t = self.teacher_features(with_label_channel(x, m, self.cfg.label_scale)).logits
        feats = self.student.forward_features(x)
        terms: LossTerms = {
            "loss_ce": self.cfg.ce_weight * cross_entropy(feats.logits, y),
            "loss_kd": self.cfg.kd_weight * map_distillation_loss(
                self.cfg.distill_loss, feats.logits, logits_t, self.cfg.temperature)}
        if feats.aux is not None and self.cfg.aux_weight > 0:
            terms["loss_aux"] = self.cfg.aux_weight * cross_entropy(feats.aux, y)
        return feats.logits, terms
