"""Hierarchical Self-supervised Augmented Knowledge Distillation (Yang et al., IJCAI 2021).

Follows methods.md 3 and the official ``winycg/HSAKD``: every batch is expanded to its four
rotations (the self-supervised augmented task, joint label ``4 * y + j``), the teacher carries
auxiliary classifiers on its stage taps (trained first by ``hsakd_teacher``), and the student
(with its own auxiliary classifiers, whose gradients reach its backbone) matches the teacher's
auxiliary and main-head distributions on all rotations at temperature T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_positive
from kdflow.methods.distillers.base import (DataInfo, Distiller, LossTerms, TeacherRequest,
                                            register_distiller)
from kdflow.methods.distillers.kd import check_same_classes, kd_loss
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.aux_heads import AuxiliaryHeads, HSAKDNet, hsakd_tap_indices
from kdflow.methods.models.base import build_model

NUM_ROTATIONS = 4
"""M: the transforms of the SA task are rotations by 0, 90, 180 and 270 degrees."""

TEACHER_MODES = ("joint", "frozen")


def rotate_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) square images -> (4B, C, H, W); row ``4b + j`` is image b rotated by
    ``torch.rot90(., j, dims=(2, 3))`` (j * 90 degrees counter-clockwise), so rows 0::4 are x."""
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"HSAKD rotates square images only, got {x.shape[2]}x{x.shape[3]}")
    rotated = [torch.rot90(x, j, dims=(2, 3)) for j in range(NUM_ROTATIONS)]
    return torch.stack(rotated, dim=1).flatten(0, 1)


def joint_labels(y: torch.Tensor) -> torch.Tensor:
    """(B,) class labels -> (4B,) joint labels ``4 * y[b] + j`` in the row order of rotate_batch."""
    offsets = torch.arange(NUM_ROTATIONS, device=y.device, dtype=y.dtype)
    return (y.unsqueeze(1) * NUM_ROTATIONS + offsets).flatten()


def _check_rows(logits: torch.Tensor, y: torch.Tensor) -> None:
    if logits.shape[0] != NUM_ROTATIONS * y.shape[0]:
        raise ValueError(f"expected {NUM_ROTATIONS} * {y.shape[0]} logit rows, "
                         f"got {logits.shape[0]}")


def hsakd_teacher_loss(logits: torch.Tensor, aux_logits: List[torch.Tensor],
                       y: torch.Tensor) -> LossTerms:
    """Stage-1 loss of the teacher with its auxiliary heads (methods.md 3.3, POSTER Eq. 1).

    logits: (4B, N) main-head logits on ``rotate_batch(x)``; aux_logits: L (4B, 4N) logits;
    y: (B,) labels. Returns ``loss_ce = CE(logits[0::4], y)`` (unrotated rows only) and
    ``loss_aux = sum_l CE(aux_l, joint_labels(y))`` (mean over 4B rows = the 1/M average).
    """
    _check_rows(logits, y)
    joint = joint_labels(y)
    return {
        "loss_ce": F.cross_entropy(logits[0::NUM_ROTATIONS], y),
        "loss_aux": sum(F.cross_entropy(a, joint) for a in aux_logits),
    }


def hsakd_student_loss(logits_s: torch.Tensor, aux_s: List[torch.Tensor],
                       logits_t: torch.Tensor, aux_t: List[torch.Tensor], y: torch.Tensor,
                       temperature: float) -> LossTerms:
    """Student loss of methods.md 3.3 (POSTER Eqs. 2-5), unweighted.

    logits_s / logits_t: (4B, N) main-head logits on ``rotate_batch(x)``; aux_s / aux_t: L
    (4B, 4N) auxiliary logits each, paired one to one; y: (B,) labels; temperature: T.
    Returns ``loss_ce = CE(logits_s[0::4], y)``,
    ``loss_kl_aux = sum_l T^2 KL(q_t,l || q_s,l)`` and ``loss_kl_main = T^2 KL(p_t || p_s)``,
    each KL averaged over the 4B rows (= the 1/M sum over rotations of batch means).
    """
    _check_rows(logits_s, y)
    if len(aux_s) != len(aux_t):
        raise ValueError(f"the student has {len(aux_s)} auxiliary heads, "
                         f"the teacher {len(aux_t)}")
    return {
        "loss_ce": F.cross_entropy(logits_s[0::NUM_ROTATIONS], y),
        "loss_kl_aux": sum(kd_loss(s, t, temperature) for s, t in zip(aux_s, aux_t)),
        "loss_kl_main": kd_loss(logits_s, logits_t, temperature),
    }


@dataclass
class HSAKDTeacherConfig:
    """freeze_backbone: True trains only the heads on the plain teacher's frozen backbone (the
    paper's "Teacher"); False trains backbone and heads jointly from scratch ("Teacher*")."""

    freeze_backbone: bool = False

    def validate(self) -> None:
        if not isinstance(self.freeze_backbone, bool):
            raise ConfigError("freeze_backbone", f"must be true or false, got "
                              f"{self.freeze_backbone!r}", allowed=[True, False])


@register_distiller("hsakd_teacher")
class HSAKDTeacher(Distiller):
    """Stage 1: the teacher backbone (the job's ``student``) and its auxiliary heads.

    With ``freeze_backbone`` the plain teacher's weights are copied into the backbone, which
    then stays frozen in eval mode (taps detached, run without autograd); only ``heads`` train.
    The job saves :meth:`exported_model`, an :class:`HSAKDNet` with the heads.
    """

    display_name = "HSAKD teacher"

    Config = HSAKDTeacherConfig

    @classmethod
    def teacher_request(cls, cfg: HSAKDTeacherConfig) -> TeacherRequest | None:
        return TeacherRequest() if cfg.freeze_backbone else None

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: HSAKDTeacherConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        self.heads = AuxiliaryHeads(student, data.num_classes, NUM_ROTATIONS,
                                    detach=cfg.freeze_backbone)
        if cfg.freeze_backbone:
            student.load_state_dict(teacher.state_dict())
            student.requires_grad_(False)
            student.eval()
            self.teacher = None  # its weights now live in the frozen backbone

    def train(self, mode: bool = True) -> "HSAKDTeacher":
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.student.eval()
        return self

    def learnable_parameters(self) -> List[nn.Parameter]:
        return [p for p in super().learnable_parameters() if p.requires_grad]

    def exported_model(self) -> nn.Module:
        return HSAKDNet(self.student, self.heads)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W), y: (B,), index unused -> ((B, N) unrotated main logits, terms)."""
        rotated = rotate_batch(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            feats = self.student.forward_features(rotated)
        aux = self.heads(feats.stages)
        terms = hsakd_teacher_loss(feats.logits, aux, y)
        return feats.logits[0::NUM_ROTATIONS], terms


@dataclass
class HSAKDConfig:
    """temperature: T > 0 of both KL terms; teacher_mode: "joint" (teacher and heads trained
    together from scratch, HSAKD*) or "frozen" (heads on the plain teacher, HSAKD)."""

    temperature: float = 3.0
    teacher_mode: str = "joint"

    def validate(self) -> None:
        require_positive("temperature", self.temperature)
        if self.teacher_mode not in TEACHER_MODES:
            raise ConfigError("teacher_mode", f"unknown teacher mode {self.teacher_mode!r}",
                              allowed=TEACHER_MODES)


def _aux_count(shapes: TapShapes) -> int:
    return len(hsakd_tap_indices([s[0] for s in shapes.stages]))


@register_distiller("hsakd")
class HSAKD(Distiller):
    """Stage 2: the student, its own auxiliary heads (``heads``) and an :class:`HSAKDNet`
    teacher; the training loss is ``hsakd_student_loss`` on the rotated batch."""

    display_name = "HSAKD"

    Config = HSAKDConfig

    @classmethod
    def teacher_request(cls, cfg: HSAKDConfig) -> TeacherRequest:
        return TeacherRequest("hsakd_teacher", {"freeze_backbone": cfg.teacher_mode == "frozen"})

    @classmethod
    def build_teacher(cls, cfg: HSAKDConfig, name: str, num_classes: int) -> nn.Module:
        backbone = build_model(name, num_classes)
        return HSAKDNet(backbone, AuxiliaryHeads(backbone, num_classes, NUM_ROTATIONS,
                                                 detach=True))

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        check_same_classes(teacher, student)
        if teacher is not None and _aux_count(teacher) != _aux_count(student):
            raise ConfigError(
                "teacher",
                f"HSAKD pairs auxiliary classifiers one to one, but the teacher has "
                f"{_aux_count(teacher)} and the student {_aux_count(student)}",
                fix="pick a pair with as many HSAKD taps on both sides (methods.md 3.2), "
                    "e.g. vgg13->MobileNetV2 or resnet32x4->resnet8x4")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: HSAKDConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        if not isinstance(teacher, HSAKDNet):
            raise TypeError("HSAKD needs an HSAKDNet teacher (see HSAKD.build_teacher), "
                            f"got {type(teacher).__name__}")
        self.heads = AuxiliaryHeads(student, data.num_classes, NUM_ROTATIONS)
        if len(teacher.heads.branches) != len(self.heads.branches):
            raise ConfigError("teacher", f"the teacher has {len(teacher.heads.branches)} "
                              f"auxiliary classifiers and the student "
                              f"{len(self.heads.branches)}")

    def teacher_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The teacher's main and auxiliary logits for x, computed without autograd and cloned
        into ordinary tensors usable as targets: ((R, N), L (R, 4N))."""
        with torch.inference_mode():
            feats, aux = self.teacher.forward_with_aux(x)
        return feats.logits.clone(), [a.clone() for a in aux]

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W), y: (B,), index unused -> ((B, N) unrotated student logits, terms)."""
        rotated = rotate_batch(x)
        logits_t, aux_t = self.shared_teacher("rotated_with_aux", x,
                                              lambda: self.teacher_outputs(rotated))
        feats = self.student.forward_features(rotated)
        aux_s = self.heads(feats.stages)
        terms = hsakd_student_loss(feats.logits, aux_s, logits_t, aux_t, y,
                                   self.cfg.temperature)
        return feats.logits[0::NUM_ROTATIONS], terms
