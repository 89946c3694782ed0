"""MSDCRD: contrastive representation distillation via multi-scale feature decoupling.

[KDFLOW] reference design, not paper-verified (methods.md 2.2). The paper (arXiv 2502.05835)
and its code were not obtained; its abstracts only say that global features are decoupled into
multi-scale local features by sliding-window pooling, that the method is parameter-free (v2),
that sample-wise and feature-wise contrastive losses are computed within one batch (no memory
bank), and that samples are categorised by class. Every choice below is configurable and must be
swept before any fidelity claim.

Steps, on the last-stage maps ``F_s`` (B, C_s, H_s, W_s) and ``F_t`` (B, C_t, H_t, W_t):

1. decoupling (``pooling``): ``grid``, adaptive average pooling of each map to ``s x s`` for
   every scale ``s``, giving ``P_s = s^2`` local vectors per image; or ``sliding``, both maps
   first averaged to their common size ``min(H_s, H_t) x min(W_s, W_t)``, then average pooling
   with a sliding window of kernel ``k`` and stride ``r`` for every window ``(k, r)``, giving
   ``P = (floor((H - k) / r) + 1) * (floor((W - k) / r) + 1)`` local vectors per image;
2. width matching (``width_match``): none when ``C_s == C_t``; else ``pool``, parameter-free,
   the wider side's channels averaged in ``min(C_s, C_t)`` adaptive groups (adaptive average
   pooling along the channels), or ``project``, a training-only 1x1 conv + BN on the student
   (``C_s -> C_t``, trainable parameters). Both losses contrast student with teacher vectors by
   dot products, so they need one width; width-free alternatives such as B x B or C x C
   similarity (Gram) matrices compare each model with itself, not student with teacher, and
   would change what the two InfoNCE losses score;
3. sample-wise loss: symmetric batch InfoNCE per scale and location (positive: the same image
   at the same location; negatives: other images, optionally masked by class);
4. feature-wise loss: the same InfoNCE on the transposed matrices (one B-dim vector per channel);
5. total: ``ce_weight * CE + kd_weight * KD + contrast_weight * (1/S) sum_s w_s *
   (l_sample_s + feature_weight * l_feature_s)`` over the S scales or windows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.kd import check_same_classes, kd_loss
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes

NEGATIVES = ("same_location", "all_locations")
"""Which other-image vectors an anchor is contrasted with: those at its own location, or all."""

CLASS_MASKS = ("none", "exclude_same_class", "same_class_positive")
"""How labels shape the sample-wise loss: ignored; other images of the anchor's class left out
of the denominator; or those images at the anchor's location counted as positives."""

POOLINGS = ("grid", "sliding")
"""How maps are decoupled: adaptive pooling to s x s grids (``scales``), or sliding windows of
kernel k and stride r (``windows``)."""

WIDTH_MATCHES = ("pool", "project")
"""How unequal widths are matched: channel-wise adaptive average pooling of the wider side
(parameter-free), or a trainable 1x1 conv + BN on the student."""


def decouple(f: torch.Tensor, scales: Sequence[int]) -> List[torch.Tensor]:
    """Multi-scale local vectors of a feature map.

    f: (B, C, H, W). For each ``s`` in ``scales``, adaptive average pooling to (s, s), flattened
    row-major over locations. Returns one (B, s*s, C) tensor per scale, in ``scales`` order.
    """
    return [F.adaptive_avg_pool2d(f, s).flatten(2).transpose(1, 2) for s in scales]


def common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both maps averaged to ``min(H_s, H_t) x min(W_s, W_t)`` (adaptive average pooling; a map
    already of that size is returned as is). f_s: (B, C_s, H_s, W_s); f_t: (B, C_t, H_t, W_t).
    Where one size divides the other, a cell of the common grid is the mean of an equal block of
    the larger map, so a window over common cells is a window over the larger map."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    return tuple(f if tuple(f.shape[2:]) == size else F.adaptive_avg_pool2d(f, size)
                 for f in (f_s, f_t))


def slide(f: torch.Tensor, windows: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """Multi-scale local vectors of a feature map by sliding-window average pooling.

    f: (B, C, H, W). For each window ``(k, r)``, the mean over every k x k window at stride r
    (no padding), flattened row-major over the ``h x w`` window positions, h = floor((H - k)
    / r) + 1 and likewise w. Returns one (B, h*w, C) tensor per window, in ``windows`` order.
    """
    return [F.avg_pool2d(f, k, r).flatten(2).transpose(1, 2) for k, r in windows]


def match_widths(u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Parameter-free width matching of local vectors: the wider of u (B, P, C_u) and v
    (B, P, C_v) is averaged along its channels to ``C = min(C_u, C_v)`` by adaptive average
    pooling (output channel i is the mean of input channels floor(i*C_in/C) to
    ceil((i+1)*C_in/C) - 1). Returns both as (B, P, C); equal widths are returned as is."""
    c = min(u.shape[2], v.shape[2])
    return tuple(t if t.shape[2] == c else F.adaptive_avg_pool1d(t, c) for t in (u, v))


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

    pooling: ``grid`` (``scales``) or ``sliding`` (``windows``); scales: pooled grid sides s
    (P = s*s locations each); windows: ``[k, r]`` sliding windows of kernel k and stride r over
    the maps' common size (needed by ``sliding``); scale_weights: w per entry of the pooling's
    list, scales or windows (None: all 1); width_match: ``pool`` (parameter-free) or
    ``project`` (trainable 1x1 conv + BN) for unequal widths; temperature: tau of both
    contrastive losses; negatives: ``same_location`` or ``all_locations``; class_mask: ``none``,
    ``exclude_same_class`` or ``same_class_positive``; ce_weight / kd_weight / contrast_weight
    / feature_weight: term weights (gamma, alpha, beta, lambda_f; a zero CE, KD or feature
    weight drops that term); kd_temperature: T of the KD term.
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
    pooling: str = "grid"
    windows: List[List[int]] | None = None
    width_match: str = "pool"
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("pooling", "windows")

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
        if self.pooling not in POOLINGS:
            raise ConfigError("pooling", f"unknown value {self.pooling!r}", allowed=POOLINGS)
        self._validate_windows()
        entries = "scales" if self.pooling == "grid" else "windows"
        if self.scale_weights is not None:
            if not isinstance(self.scale_weights, (list, tuple)) \
                    or len(self.scale_weights) != len(self.entries()):
                raise ConfigError("scale_weights",
                                  f"must list one weight per entry of {entries} "
                                  f"({len(self.entries())}), got {self.scale_weights!r}",
                                  fix=f"give one weight per entry of {entries}, or null for all 1")
            for w in self.scale_weights:
                require_non_negative("scale_weights", w)
        if self.width_match not in WIDTH_MATCHES:
            raise ConfigError("width_match", f"unknown value {self.width_match!r}",
                              allowed=WIDTH_MATCHES)
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

    def _validate_windows(self) -> None:
        """``windows``: null, or distinct ``[k, r]`` integer pairs >= 1; needed by sliding."""
        fix = "set windows to [kernel, stride] pairs, e.g. [[2, 1], [4, 2]]"
        if self.windows is None:
            if self.pooling == "sliding":
                raise ConfigError("windows", "pooling: sliding needs windows", fix=fix)
            return
        if not isinstance(self.windows, (list, tuple)) or not self.windows:
            raise ConfigError("windows", f"must be a non-empty list of [kernel, stride] pairs, "
                              f"got {self.windows!r}", fix=fix)
        for window in self.windows:
            if not isinstance(window, (list, tuple)) or len(window) != 2 or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in window):
                raise ConfigError("windows", f"every window must be a [kernel, stride] pair of "
                                  f"integers >= 1, got {window!r}", fix=fix)
        if len({tuple(w) for w in self.windows}) != len(self.windows):
            raise ConfigError("windows", f"each window may appear once, got {self.windows!r}",
                              fix="remove the repeated windows (use scale_weights to weight one)")

    def entries(self) -> List[Any]:
        """The pooling's list: ``scales`` (grid) or ``windows`` (sliding)."""
        return list(self.scales) if self.pooling == "grid" else [tuple(w) for w in self.windows]

    def weights(self) -> List[float]:
        """w for every entry of :meth:`entries`, in order."""
        return list(self.scale_weights) if self.scale_weights is not None \
            else [1.0] * len(self.entries())


def local_pairs(cfg: MSDCRDConfig, f_s: torch.Tensor,
                f_t: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Student and teacher local vectors per entry of ``cfg.entries()``, widths matched.

    f_s: (B, C_s, H_s, W_s); f_t: (B, C_t, H_t, W_t). Returns one (u, v) pair per scale or
    window, both (B, P, min(C_s, C_t)) (see :func:`decouple`, :func:`slide`,
    :func:`match_widths`).
    """
    if cfg.pooling == "grid":
        us, vs = decouple(f_s, cfg.scales), decouple(f_t, cfg.scales)
    else:
        f_s, f_t = common_size(f_s, f_t)
        us, vs = slide(f_s, cfg.windows), slide(f_t, cfg.windows)
    return [match_widths(u, v) for u, v in zip(us, vs)]


def msdcrd_terms(cfg: MSDCRDConfig, logits_s: torch.Tensor, logits_t: torch.Tensor,
                 f_s: torch.Tensor, f_t: torch.Tensor, y: torch.Tensor) -> LossTerms:
    """The weighted loss terms of MSDCRD.

    logits_s, logits_t: (B, num_classes); f_s: (B, C_s, H_s, W_s) student map (projected to
    the teacher's width under ``width_match: project``); f_t: (B, C_t, H_t, W_t) teacher map;
    y: (B,) labels. Returns ``loss_ce`` (when ce_weight > 0), ``loss_kd`` (when kd_weight > 0),
    ``loss_sample`` = contrast_weight * (1/S) sum_s w_s l_sample_s and ``loss_feature`` (when
    feature_weight > 0) = contrast_weight * feature_weight * (1/S) sum_s w_s l_feature_s, over
    the S entries of ``cfg.entries()`` (see :func:`local_pairs`).
    """
    terms: LossTerms = {}
    if cfg.ce_weight > 0:
        terms["loss_ce"] = cfg.ce_weight * F.cross_entropy(logits_s, y)
    if cfg.kd_weight > 0:
        terms["loss_kd"] = cfg.kd_weight * kd_loss(logits_s, logits_t, cfg.kd_temperature)
    weights = cfg.weights()
    scale = cfg.contrast_weight / len(weights)
    pairs = [(w, u, v) for w, (u, v) in zip(weights, local_pairs(cfg, f_s, f_t))]
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


def check_windows(windows: Sequence[Sequence[int]], shapes: Sequence[TapShapes]) -> None:
    """Raise ConfigError("windows", ...) when a window's kernel exceeds the common size of the
    last-stage maps of ``shapes`` (the teacher's and the student's)."""
    h = min(s.stages[-1][1] for s in shapes)
    w = min(s.stages[-1][2] for s in shapes)
    for k, _ in windows:
        if k > min(h, w):
            raise ConfigError(
                "windows",
                f"window kernel {k} exceeds {h}x{w}, the common size of the last-stage maps "
                f"(the smaller height and width of the teacher's and the student's)",
                fix=f"use kernels <= {min(h, w)}, e.g. windows: [[1, 1], [{min(h, w)}, 1]]")


@register_distiller("msdcrd")
class MSDCRD(Distiller):
    """Student trained with CE, optional KD, and the multi-scale sample- and feature-wise
    contrastive losses on the last-stage maps ([KDFLOW] reference design, not paper-verified).

    ``align`` is a 1x1 conv + BN mapping the student's last-stage width to the teacher's under
    ``width_match: project`` when the widths differ, else None (no parameters beyond the
    student's); it is a training-only module (not part of the exported student).
    """

    display_name = "MSDCRD"

    Config = MSDCRDConfig

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MSDCRDConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        c_s, c_t = s_shapes.stages[-1][0], t_shapes.stages[-1][0]
        self.align = None if c_s == c_t or cfg.width_match == "pool" else nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        if cfg.pooling == "sliding":
            check_windows(cfg.windows, [s for s in (teacher, student) if s is not None])
        else:
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
