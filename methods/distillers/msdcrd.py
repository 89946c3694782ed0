"""MSDCRD: contrastive representation distillation via multi-scale feature decoupling.

[KDFLOW] reference design, not paper-verified (methods.md 2.2). The paper (arXiv 2502.05835)
and its code were not obtained; its abstracts only say that global features are decoupled into
multi-scale local features by pooling, that sample-wise and feature-wise contrastive losses are
computed within one batch (no memory bank), and that samples are categorised by class. Every
choice below is configurable and must be swept before any fidelity claim.

Steps, on the last-stage maps ``F_s`` (B, C_s, H_s, W_s) and ``F_t`` (B, C_t, H_t, W_t):

1. width alignment: none when ``C_s == C_t``, else a training-only 1x1 conv + BN on the student;
2. decoupling: adaptive average pooling to ``s x s`` for every scale ``s``, giving ``P_s = s^2``
   local vectors per image;
3. sample-wise loss: symmetric batch InfoNCE per scale and location (positive: the same image
   at the same location; negatives: other images, optionally masked by class);
4. feature-wise loss: the same InfoNCE on the transposed matrices (one B-dim vector per channel);
5. total: ``ce_weight * CE + kd_weight * KD + contrast_weight * (1/S) sum_s w_s *
   (l_sample_s + feature_weight * l_feature_s)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.config import require_non_negative, require_positive
from methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from methods.distillers.kd import check_same_classes, kd_loss
from methods.errors import ConfigError
from methods.features import TapShapes

NEGATIVES = ("same_location", "all_locations")
"""Which other-image vectors an anchor is contrasted with: those at its own location, or all."""

CLASS_MASKS = ("none", "exclude_same_class", "same_class_positive")
"""How labels shape the sample-wise loss: ignored; other images of the anchor's class left out
of the denominator; or those images at the anchor's location counted as positives."""


def decouple(f: torch.Tensor, scales: Sequence[int]) -> List[torch.Tensor]:
    """Multi-scale local vectors of a feature map.

    f: (B, C, H, W). For each ``s`` in ``scales``, adaptive average pooling to (s, s), flattened
    row-major over locations. Returns one (B, s*s, C) tensor per scale, in ``scales`` order.
    """
    return [F.adaptive_avg_pool2d(f, s).flatten(2).transpose(1, 2) for s in scales]


def _as_float32(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """The tensors in at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _info_nce(logits: torch.Tensor, allowed: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of ``-mean_{k in pos} log softmax_{allowed}(logits)_k``.

    logits: (..., N) one row of candidate scores per anchor; allowed, positive: bool masks
    broadcastable to ``logits`` (every positive is allowed, every row has a positive).
    Returns a scalar.
    """
    positive = positive.expand_as(logits)
    log_prob = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=-1)
    return -(pos_sum / positive.sum(dim=-1)).mean()


def _pair_masks(labels: torch.Tensor | None, batch: int, class_mask: str,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image-pair masks of the sample-wise loss.

    Returns ``(positive, excluded)``, both (B, B) bool: ``positive[i, j]`` when image j is a
    positive of anchor i at the anchor's location (i itself, plus its class under
    ``same_class_positive``); ``excluded[i, j]`` when j != i shares i's class and
    ``class_mask`` is not ``none`` (such images are never negatives).
    """
    if class_mask not in CLASS_MASKS:
        raise ValueError(f"class_mask must be one of {CLASS_MASKS}, got {class_mask!r}")
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    if class_mask == "none":
        return eye, torch.zeros_like(eye)
    if labels is None:
        raise ValueError(f"class_mask={class_mask!r} needs labels")
    excluded = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye
    positive = eye | excluded if class_mask == "same_class_positive" else eye
    return positive, excluded


def sample_contrast(u: torch.Tensor, v: torch.Tensor, tau: float,
                    labels: torch.Tensor | None = None, class_mask: str = "none",
                    negatives: str = "same_location") -> torch.Tensor:
    """Symmetric sample-wise InfoNCE between student and teacher local vectors of one scale.

    u, v: (B, P, C) student / teacher vectors (L2-normalised here along C); tau: temperature;
    labels: (B,) classes, needed unless ``class_mask == "none"``.
    Anchor (i, p) scores candidate (j, q) by ``<u_ip, v_jq> / tau``. Its positives are
    (j, p) for j in ``positive[i]`` (see ``_pair_masks``); its denominator holds the positives
    and, as negatives, every other image j not excluded by ``class_mask``, at location p only
    (``same_location``) or at every location q (``all_locations``; the anchor's own image at
    other locations is neither positive nor negative). The per-anchor loss is the negative
    mean log-probability of its positives; the result averages it over the B*P anchors and over
    the student-anchored and teacher-anchored (transposed scores) directions. Scores and
    log-softmax are computed in at least float32, outside autocast. Returns a scalar.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    b, p, _ = u.shape
    positive, excluded = _pair_masks(labels, b, class_mask, u.device)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, v = _as_float32(u, v)
        u_loc = F.normalize(u, dim=2).transpose(0, 1)                  # (P, B, C)
        v_loc = F.normalize(v, dim=2).transpose(0, 1)
        if negatives == "same_location":
            logits = torch.bmm(u_loc, v_loc.transpose(1, 2)) / tau    # (P, B, B)
            allowed = positive | ~excluded
            return 0.5 * (_info_nce(logits, allowed, positive)
                          + _info_nce(logits.transpose(1, 2), allowed, positive))
        logits = u_loc.reshape(p * b, -1) @ v_loc.reshape(p * b, -1).T / tau  # (P*B, P*B)
        same_loc = torch.eye(p, dtype=torch.bool, device=u.device)[:, None, :, None]
        pos4 = same_loc & positive[None, :, None, :]                    # (P, B, P, B)
        other_img = ~torch.eye(b, dtype=torch.bool, device=u.device)[None, :, None, :]
        allowed4 = pos4 | (other_img & ~excluded[None, :, None, :])
        allowed = allowed4.reshape(p * b, p * b)
        pos_flat = pos4.reshape(p * b, p * b)
        return 0.5 * (_info_nce(logits, allowed, pos_flat)
                      + _info_nce(logits.T, allowed, pos_flat))


def feature_contrast(u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric feature-wise InfoNCE between student and teacher local vectors of one scale.

    u, v: (B, P, C) student / teacher vectors with equal C. At each location p, channel c is the
    B-dim vector ``u[:, p, c]`` (L2-normalised here along the batch); channel c of the student is
    scored against every teacher channel d by ``<u_pc, v_pd> / tau``, the positive being d = c.
    The loss averages over the C*P anchors and over both directions, in at least float32
    outside autocast. Returns a scalar.
    """
    if u.shape != v.shape:
        raise ValueError(f"feature_contrast needs equal shapes, got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    c = u.shape[2]
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, v = _as_float32(u, v)
        u_ch = F.normalize(u.permute(1, 2, 0), dim=2)                   # (P, C, B)
        v_ch = F.normalize(v.permute(1, 2, 0), dim=2)
        logits = torch.bmm(u_ch, v_ch.transpose(1, 2)) / tau          # (P, C, C)
        eye = torch.eye(c, dtype=torch.bool, device=u.device)
        allowed = torch.ones_like(eye)
        return 0.5 * (_info_nce(logits, allowed, eye)
                      + _info_nce(logits.transpose(1, 2), allowed, eye))


@dataclass
class MSDCRDConfig:
    """Settings of the [KDFLOW] reference design (not paper-verified, methods.md 2.2).

    scales: pooled grid sides s (P = s*s locations each); scale_weights: w_s per scale (None:
    all 1); temperature: tau of both contrastive losses; negatives: ``same_location`` or
    ``all_locations``; class_mask: ``none``, ``exclude_same_class`` or ``same_class_positive``;
    ce_weight / kd_weight / contrast_weight / feature_weight: term weights (gamma, alpha, beta,
    lambda_f; a zero CE, KD or feature weight drops that term); kd_temperature: T of the KD term.
    """

    scales: List[int] = field(default_factory=lambda: [1, 2, 4])
    scale_weights: List[float] | None = None
    temperature: float = 0.1
    negatives: str = "same_location"
    class_mask: str = "exclude_same_class"
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    contrast_weight: float = 1.0
    feature_weight: float = 1.0

    def validate(self) -> None:
        if not isinstance(self.scales, (list, tuple)) or not self.scales:
            raise ConfigError("scales",
                              f"must be a non-empty list of integers, got {self.scales!r}",
                              fix="set scales to e.g. [1, 2, 4]")
        for s in self.scales:
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ConfigError("scales", f"every scale must be an integer >= 1, got {s!r}",
                                  fix="set scales to e.g. [1, 2, 4]")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError("scales", f"each scale may appear once, got {list(self.scales)}",
                              fix="remove the repeated scales (use scale_weights to weight one)")
        if self.scale_weights is not None:
            if not isinstance(self.scale_weights, (list, tuple)) \
                    or len(self.scale_weights) != len(self.scales):
                raise ConfigError("scale_weights",
                                  f"must list one weight per scale ({len(self.scales)}), "
                                  f"got {self.scale_weights!r}",
                                  fix="give one weight per entry of scales, or null for all 1")
            for w in self.scale_weights:
                require_non_negative("scale_weights", w)
        require_positive("temperature", self.temperature)
        if self.negatives not in NEGATIVES:
            raise ConfigError("negatives", f"unknown value {self.negatives!r}", allowed=NEGATIVES)
        if self.class_mask not in CLASS_MASKS:
            raise ConfigError("class_mask", f"unknown value {self.class_mask!r}",
                              allowed=CLASS_MASKS)
        require_non_negative("ce_weight", self.ce_weight)
        require_non_negative("kd_weight", self.kd_weight)
        require_positive("kd_temperature", self.kd_temperature)
        require_positive("contrast_weight", self.contrast_weight)
        require_non_negative("feature_weight", self.feature_weight)

    def weights(self) -> List[float]:
        """w_s for every scale, in ``scales`` order."""
        return list(self.scale_weights) if self.scale_weights is not None \
            else [1.0] * len(self.scales)


def msdcrd_terms(cfg: MSDCRDConfig, logits_s: torch.Tensor, logits_t: torch.Tensor,
                 f_s: torch.Tensor, f_t: torch.Tensor, y: torch.Tensor) -> LossTerms:
    """The weighted loss terms of MSDCRD.

    logits_s, logits_t: (B, num_classes); f_s: (B, C, H_s, W_s) student map already aligned to
    the teacher's width; f_t: (B, C, H_t, W_t) teacher map; y: (B,) labels.
    Returns ``loss_ce`` (when ce_weight > 0), ``loss_kd`` (when kd_weight > 0), ``loss_sample``
    = contrast_weight * (1/S) sum_s w_s l_sample_s and ``loss_feature`` (when feature_weight
    > 0) = contrast_weight * feature_weight * (1/S) sum_s w_s l_feature_s, S = len(scales).
    """
    terms: LossTerms = {}
    if cfg.ce_weight > 0:
        terms["loss_ce"] = cfg.ce_weight * F.cross_entropy(logits_s, y)
    if cfg.kd_weight > 0:
        terms["loss_kd"] = cfg.kd_weight * kd_loss(logits_s, logits_t, cfg.kd_temperature)
    weights = cfg.weights()
    scale = cfg.contrast_weight / len(cfg.scales)
    pairs = list(zip(weights, decouple(f_s, cfg.scales), decouple(f_t, cfg.scales)))
    terms["loss_sample"] = scale * sum(
        w * sample_contrast(u, v, cfg.temperature, y, cfg.class_mask, cfg.negatives)
        for w, u, v in pairs)
    if cfg.feature_weight > 0:
        terms["loss_feature"] = scale * cfg.feature_weight * sum(
            w * feature_contrast(u, v, cfg.temperature) for w, u, v in pairs)
    return terms


def check_scales(scales: Sequence[int], shapes: TapShapes, role: str) -> None:
    """Raise ConfigError("scales", ...) when a scale exceeds ``role``'s last-stage map."""
    _, h, w = shapes.stages[-1]
    largest = min(h, w)
    for s in scales:
        if s > largest:
            raise ConfigError(
                "scales",
                f"scale {s} exceeds the {h}x{w} last-stage map of the {role} (every scale must "
                f"be <= the height and width of both last-stage maps)",
                fix=f"use scales <= {largest}, e.g. "
                    f"{[t for t in scales if t <= largest] or [largest]}")


@register_distiller("msdcrd")
class MSDCRD(Distiller):
    """Student trained with CE, optional KD, and the multi-scale sample- and feature-wise
    contrastive losses on the last-stage maps ([KDFLOW] reference design, not paper-verified).

    ``align`` is a 1x1 conv + BN mapping the student's last-stage width to the teacher's, or None
    when they are equal; it is a training-only module (not part of the exported student).
    """

    display_name = "MSDCRD"

    Config = MSDCRDConfig

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MSDCRDConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        c_s, c_t = s_shapes.stages[-1][0], t_shapes.stages[-1][0]
        self.align = None if c_s == c_t else nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        check_scales(cfg.scales, student, "student")
        if teacher is not None:
            check_scales(cfg.scales, teacher, "teacher")
        if cfg.kd_weight > 0:
            check_same_classes(teacher, student)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused)."""
        feats_t = self.teacher_features(x)
        feats = self.student.forward_features(x)
        f_s = feats.stages[-1] if self.align is None else self.align(feats.stages[-1])
        terms = msdcrd_terms(self.cfg, feats.logits, feats_t.logits, f_s, feats_t.stages[-1], y)
        return feats.logits, terms
