"""Projection KD with a standard or an inverted projector (cross-task KD).

Reference: Auty, Miles, Kolbeinsson, Mikolajczyk, "Learning to Project for Cross-Task Knowledge
Distillation", arXiv 2403.14494 (methods.md section 4). The paper's code and exact equations
were NOT obtained; this module implements the kdflow formulation of methods.md 4.2
[KDFLOW: not paper-verified; every knob is a setting]:

* standard: ``L = d(P_{s->t}(Z_s), Z_t)``, the projector maps student channels to teacher channels;
* inverted: ``L = d(Z_s, P_{t->s}(Z_t))``, the projector maps teacher channels to student channels.

In both directions the teacher features are constants: gradients reach the student and the
projector ``P`` (a training-only module), never the teacher. ``Z`` is either a dense stage map
(the projector is a 1x1 conv, and maps are bilinearly resized so both sides share one H x W)
or the pooled embedding (the projector is ``nn.Linear``). Both projectors carry a bias.

The distance ``d`` (:func:`feature_distance`) compares the two sides' ``n x C`` features (n = B*H*W
positions of dense maps, or B vectors; C the compared width, C_t for standard and C_s for inverted):

* ``mse``: the mean over all ``n * C`` elements of the squared difference,
  ``(1/(n C)) ||A - B||_F^2`` (``F.mse_loss``, FitNet's hint loss). The derivation of 4.2 writes
  ``(1/n) ||A - B||_F^2``, summed over channels: that is C times this value, the same loss with a
  C-times smaller lambda. kdflow averages [KDFLOW choice] so lambda neither grows with the width
  (64-2048) nor differs between the two directions, which compare widths C_t and C_s;
* ``l1``: the mean absolute difference over the same ``n * C`` elements;
* ``log_bn_l4``: Simple-Recipe's "BN + log-distance" (methods.md 4.4,
  roymiles/Simple-Recipe-Distillation ``imagenet/torchdistill/losses/single.py``
  ``OurDistillationLoss.forward_loss``): each side is standardised per channel with its batch
  statistics (BatchNorm without affine parameters, biased variance, eps 1e-4; over B, or over
  B*H*W for maps), then ``log(sum |A' - B'|^4)`` over all ``n * C`` elements. Simple-Recipe's
  ``L_rep`` is twice this (``weight: 2.0``). Inside the log, sum and mean differ by the constant
  ``log(n C)``, so the reduction does not change the gradient.

:func:`linear_projection_decomposition` is the closed form of 4.2 for a linear inverted
projector with a ridge penalty: its optimal weight and the split of the loss into a
"transfer" term and a residual "spectral" term [KDFLOW derivation, not the paper's equation].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import (DataInfo, Distiller, LossTerms, TeacherRequest,
                                            register_distiller)
from kdflow.methods.distillers.segmentation_losses import supervised_loss
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import Features, TapShapes
from kdflow.methods.tasks import CLASSIFICATION, SEGMENTATION

DIRECTIONS = ("standard", "inverted")
FEATURES = ("stage", "embedding")
DISTANCES = ("mse", "l1", "log_bn_l4")
# eps of Simple-Recipe's BatchNorm1d(affine=False) standardisation (methods.md 4.4).
BN_EPS = 1e-4
TEACHER_INITS = ("trained", "random")


def resize_map(z: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a (B, C, H, W) map to (B, C, *size); equal sizes are returned as is."""
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def batch_standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """BatchNorm without affine parameters, always with the batch's own statistics.

    z: (B, C) vectors or (B, C, H, W) maps; each channel is centred and divided by
    ``sqrt(var + eps)``, with the biased variance over B (vectors) or B*H*W (maps) values.
    Returns a tensor of z's shape.
    """
    return F.batch_norm(z, None, None, training=True, eps=eps)


def feature_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """The scalar distance ``d`` of the module docstring between two feature tensors.

    a, b: (B, C, H, W) maps or (B, C) vectors of equal shape; computed in at least float32.
    ``mse``: ``(1/(n*C)) sum (a - b)^2``, ``l1``: ``(1/(n*C)) sum |a - b|``, with n = B*H*W
    (maps) or B (vectors), i.e. the mean over every element. ``log_bn_l4``:
    ``log(sum |BN(a) - BN(b)|^4)`` with :func:`batch_standardise` (Simple-Recipe's form).
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    if distance == "log_bn_l4":
        return (batch_standardise(a) - batch_standardise(b)).abs().pow(4).sum().log()
    diff = a - b
    return (diff.square() if distance == "mse" else diff.abs()).mean()


def make_projector(in_channels: int, out_channels: int, dense: bool) -> nn.Module:
    """A 1x1 conv (dense maps) or a linear layer (vectors): ``in_channels`` -> ``out_channels``."""
    if dense:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1)
    return nn.Linear(in_channels, out_channels)


def projection_loss(z_s: torch.Tensor, z_t: torch.Tensor, projector: nn.Module, direction: str,
                    distance: str) -> torch.Tensor:
    """The projection KD loss between student and teacher features (methods.md 4.2).

    z_s: (B, C_s, H_s, W_s) or (B, C_s) student features; z_t: (B, C_t, H_t, W_t) or (B, C_t)
    teacher features (detached here). ``projector`` maps C_s -> C_t channels for the
    ``standard`` direction and C_t -> C_s for ``inverted``.

    inverted: the teacher map is resized to (H_s, W_s), projected, and compared with ``z_s``.
    standard: the student map is projected, resized to (H_t, W_t), and compared with ``z_t``.
    (A 1x1 conv with bias and bilinear resizing commute, so the order inside a side is free.)
    Returns the scalar ``feature_distance`` of the two sides.
    """
    z_t = z_t.detach()
    dense = z_s.dim() == 4
    if direction == "inverted":
        if dense:
            z_t = resize_map(z_t, tuple(z_s.shape[-2:]))
        return feature_distance(z_s, projector(z_t), distance)
    projected = projector(z_s)
    if dense:
        projected = resize_map(projected, tuple(z_t.shape[-2:]))
    return feature_distance(projected, z_t, distance)


class ProjectionDecomposition(NamedTuple):
    """Closed form of the ridge-regularised linear inverted projector (methods.md 4.2).

    weight:   (d_t, d_s) optimal ``W*`` of ``min_W (1/n)(||Z_s - Z_t W||_F^2 + ridge ||W||_F^2)``.
    transfer: ``(1/n) sum_i (ridge / (sigma_i^2 + ridge))^2 ||u_i^T Z_s||^2`` over the teacher's
              singular directions ``u_i`` (zero when ridge = 0).
    spectral: ``(1/n) ||(I - U U^T) Z_s||_F^2``, the student energy outside the teacher's span.
    The data term at the optimum, ``(1/n) ||Z_s - Z_t W*||_F^2``, equals ``transfer + spectral``;
    :func:`projection_loss` (inverted, ``mse``) with the linear projector ``W*`` is that term
    divided by d_s, since ``mse`` averages over the d_s channels too.
    """

    weight: torch.Tensor
    transfer: torch.Tensor
    spectral: torch.Tensor


def linear_projection_decomposition(z_s: torch.Tensor, z_t: torch.Tensor,
                                    ridge: float) -> ProjectionDecomposition:
    """Optimal linear projector ``Z_t -> Z_s`` and the transfer / spectral split of its loss.

    z_s: (n, d_s) student features; z_t: (n, d_t) teacher features; ridge: lambda_w >= 0.
    With the thin SVD ``Z_t = U diag(sigma) V^T`` truncated to the numerical rank r,
    ``W* = V diag(sigma / (sigma^2 + ridge)) U^T Z_s`` (the pseudo-inverse solution at ridge 0).
    [KDFLOW derivation, not the paper's equation.]
    """
    n = z_s.shape[0]
    u, sigma, vh = torch.linalg.svd(z_t, full_matrices=False)
    tol = sigma.max() * max(z_t.shape) * torch.finfo(sigma.dtype).eps
    rank = int((sigma > tol).sum())
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    coeff = u.T @ z_s                                                   # (r, d_s)
    weight = vh.T @ ((sigma / (sigma.square() + ridge)).unsqueeze(1) * coeff)
    shrink = ridge / (sigma.square() + ridge)
    transfer = (shrink.square() * coeff.square().sum(dim=1)).sum() / n
    spectral = (z_s - u @ coeff).square().sum() / n
    return ProjectionDecomposition(weight, transfer, spectral)


def require_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    """Raise ConfigError(name, ...) listing ``allowed`` unless ``value`` is one of them."""
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}", allowed=allowed,
                          fix=f"set {name} to one of {', '.join(allowed)}")


@dataclass
class ProjectionConfig:
    """direction: standard | inverted; feature: stage (dense map ``Features.stages[stage]``) |
    embedding (pooled ``Features.embedding``); stage: index into ``Features.stages`` (negative
    counts from the last stage of each model); distance: mse | l1 (means over every element) |
    log_bn_l4 (Simple-Recipe's log of the L4 distance of batch-standardised features), see
    :func:`feature_distance`; weight: lambda > 0 of the projection loss; ce_weight: weight of
    CE (>= 0); teacher_init: trained | random (a randomly initialised teacher job that trains
    zero epochs); aux_weight: the student's auxiliary CE relative to its main CE, for
    segmentation models with an auxiliary head (0.4, CIRKD's); teacher_model, teacher_dataset: a
    cross-task teacher, this architecture trained on this dataset (e.g. a classifier for a
    segmentation student); "" = the study pair's teacher on the student's dataset. Defaults
    are [KDFLOW]."""

    direction: str = "inverted"
    feature: str = "stage"
    stage: int = -1
    distance: str = "mse"
    weight: float = 1.0
    ce_weight: float = 1.0
    teacher_init: str = "trained"
    aux_weight: float = 0.4
    teacher_model: str = ""
    teacher_dataset: str = ""
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("aux_weight", "teacher_model",
                                                     "teacher_dataset")

    def validate(self) -> None:
        require_choice("direction", self.direction, DIRECTIONS)
        require_choice("feature", self.feature, FEATURES)
        if not isinstance(self.stage, int) or isinstance(self.stage, bool):
            raise ConfigError("stage", f"must be an integer, got {self.stage!r}",
                              fix="set stage to a stage index (-1 = the last stage)")
        require_choice("distance", self.distance, DISTANCES)
        require_positive("weight", self.weight)
        require_non_negative("ce_weight", self.ce_weight)
        require_choice("teacher_init", self.teacher_init, TEACHER_INITS)
        require_non_negative("aux_weight", self.aux_weight)


def check_stage(stage: int, counts: dict[str, int]) -> None:
    """Raise ConfigError("stage", ...) unless ``stage`` indexes every model's stage list.

    counts: model role (``teacher``, ``student``) -> number of stages.
    """
    if all(-n <= stage < n for n in counts.values()):
        return
    have = " and the ".join(f"{role} has {n} stages" for role, n in counts.items())
    low = min(counts.values())
    raise ConfigError("stage", f"stage {stage} does not exist in every model: the {have}",
                      fix=f"set stage between {-low} and {low - 1}")


def select_feature(feats: Features, cfg: Any) -> torch.Tensor:
    """The tap ``cfg.feature`` names: ``stages[cfg.stage]`` (B, C, H, W) or ``embedding`` (B, D)."""
    return feats.stages[cfg.stage] if cfg.feature == "stage" else feats.embedding


@register_distiller("inverted_projection")
class ProjectionKD(Distiller):
    """Student trained with ``ce_weight * CE + weight * projection_loss`` [KDFLOW formulation].

    ``projector``: the trainable 1x1 conv / linear map, C_t -> C_s (inverted) or C_s -> C_t
    (standard); it is not part of the exported student.
    """

    display_name = "Projection KD"
    tasks = (CLASSIFICATION, SEGMENTATION)

    Config = ProjectionConfig

    @classmethod
    def teacher_request(cls, cfg: ProjectionConfig) -> TeacherRequest:
        return TeacherRequest(trained=cfg.teacher_init == "trained",
                              model=cfg.teacher_model or None, dataset=cfg.teacher_dataset or None)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: ProjectionConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        if cfg.feature == "stage":
            c_s, c_t = s_shapes.stages[cfg.stage][0], t_shapes.stages[cfg.stage][0]
        else:
            c_s, c_t = s_shapes.embedding_dim, t_shapes.embedding_dim
        c_in, c_out = (c_t, c_s) if cfg.direction == "inverted" else (c_s, c_t)
        self.projector = make_projector(c_in, c_out, dense=cfg.feature == "stage")

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        if cfg.feature == "stage":
            check_stage(cfg.stage, {"teacher": len(teacher.stages) if teacher is not None else 0,
                                    "student": len(student.stages)})

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        z_t = select_feature(self.teacher_features(x), self.cfg)
        feats = self.student.forward_features(x)
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * supervised_loss(feats, y, self.cfg.aux_weight)
        loss = projection_loss(select_feature(feats, self.cfg), z_t, self.projector,
                               self.cfg.direction, self.cfg.distance)
        terms["loss_proj"] = self.cfg.weight * loss
        return feats.logits, terms
