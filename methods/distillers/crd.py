"""Contrastive Representation Distillation with a memory bank (Tian et al., ICLR 2020).

Follows methods.md 1.3 and RepDistiller ``crd/``: both pooled embeddings go through a trainable
``Linear + L2-norm`` head, each side is contrasted against the other side's memory bank at its
own index (positive, column 0) and at ``K`` indices of samples from other classes (negatives,
distinct per anchor as RepDistiller's CIFAR-100 loader draws them), and the NCE loss of Eq. 18
is applied with a normaliser ``Z`` fixed at the first training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.kd import check_same_classes, kd_loss
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes

NCE_EPS = 1e-7
"""Added to the NCE denominators, as RepDistiller's ``ContrastLoss`` does."""

NEGATIVE_SAMPLING = ("without_replacement", "with_replacement")
"""How the K negatives of an anchor are drawn from its pool: distinct when the pool allows
(RepDistiller's CIFAR loader), or with replacement (RepDistiller's ImageNet loader)."""


def contrast_scores(memory: torch.Tensor, idx: torch.Tensor, v: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Unnormalised scores ``exp(<memory[idx[i, k]], v[i]> / temperature)``.

    memory: (N, D) bank; idx: (B, K+1) int64 rows of ``memory``; v: (B, D) embeddings.
    Returns (B, K+1) scores in at least float32, computed outside autocast (fp16 would
    overflow at ``exp(1/0.07)``). Gradients flow into ``v`` only.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(device_type=v.device.type, enabled=False):
        weights = memory[idx].detach().to(dtype)
        dots = torch.bmm(weights, v.to(dtype).unsqueeze(2)).squeeze(2)
        return torch.exp(dots / temperature)


def crd_nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of CRD's Eq. 18 with a uniform noise distribution ``Pn = 1/N``.

    scores: (B, K+1) normalised scores ``P`` (already divided by ``Z``), column 0 the positive.
    Returns ``-(1/B) sum_i [log(P_i0/(P_i0 + K/N)) + sum_k log((K/N)/(P_ik + K/N))]``.
    """
    k_pn = (scores.shape[1] - 1) / num_samples
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + k_pn + NCE_EPS))
    log_neg = torch.log(k_pn / (scores[:, 1:] + k_pn + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def other_class_pool(class_count: torch.Tensor) -> torch.Tensor:
    """(num_classes,) class sizes -> (num_classes,) size of each class's negative pool.

    The pool of class c holds the samples of every other class (``N - count[c]``); a class
    that holds all N samples has no other class, and its pool is all N samples.
    """
    n = class_count.sum()
    return torch.where(class_count < n, n - class_count, n)


def _pool_bounds(anchor_labels: torch.Tensor, class_start: torch.Tensor,
                 class_count: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Per anchor (each (B,) int64): its pool's size, where its own class's block starts in
    the class-sorted order (N when the pool is all N samples) and that block's length."""
    pool = other_class_pool(class_count)[anchor_labels]
    skip_from = torch.where(pool < n, class_start[anchor_labels], n)
    return pool, skip_from, class_count[anchor_labels]


def sample_with_replacement(anchor_labels: torch.Tensor, num_negatives: int,
                            order: torch.Tensor, class_start: torch.Tensor,
                            class_count: torch.Tensor) -> torch.Tensor:
    """Draw ``num_negatives`` (K) sample indices per anchor uniformly, with replacement, from
    its negative pool (see :func:`other_class_pool`), as RepDistiller's ImageNet loader does.

    anchor_labels: (B,) class of each anchor; order: (N,) sample indices sorted by class;
    class_start / class_count: (num_classes,) where each class's block starts in ``order``
    and how long it is. Uses the global RNG of ``order``'s device.
    Returns (B, K) int64 sample indices.
    """
    pool, skip_from, count = _pool_bounds(anchor_labels, class_start, class_count,
                                          order.shape[0])
    u = torch.rand(anchor_labels.shape[0], num_negatives, device=order.device,
                   dtype=torch.float64)
    drawn = (u * pool.unsqueeze(1)).long()
    drawn = drawn + (drawn >= skip_from.unsqueeze(1)).long() * count.unsqueeze(1)
    return order[drawn]


def sample_other_class(anchor_labels: torch.Tensor, num_negatives: int, order: torch.Tensor,
                       class_start: torch.Tensor, class_count: torch.Tensor,
                       fallback: bool = True) -> torch.Tensor:
    """Draw ``num_negatives`` (K) sample indices per anchor from its negative pool, as
    RepDistiller's CIFAR loader (``CIFAR100InstanceSample``) does per sample: a uniformly
    random K-subset of the pool (K distinct indices) when K <= the pool's size, else K
    indices drawn with replacement (:func:`sample_with_replacement`).

    The subset is the K smallest of N uniform float64 keys with the anchor's own class keyed
    out of reach: the draw stays on the device, reads nothing back to the host, and is fixed by
    the device's global RNG; it costs O(B * N) per step.
    anchor_labels: (B,) class of each anchor; order: (N,) sample indices sorted by class;
    class_start / class_count: (num_classes,) where each class's block starts in ``order``
    and how long it is. ``fallback=False`` skips the with-replacement draw; pass it only when
    every pool holds at least K samples (CRD decides that once from the training labels).
    Returns (B, K) int64 sample indices.
    """
    n = order.shape[0]
    if num_negatives > n:
        return sample_with_replacement(anchor_labels, num_negatives, order, class_start,
                                       class_count)
    pool, skip_from, count = _pool_bounds(anchor_labels, class_start, class_count, n)
    keys = torch.rand(anchor_labels.shape[0], n, device=order.device, dtype=torch.float64)
    position = torch.arange(n, device=order.device)
    keys.masked_fill_((position >= skip_from.unsqueeze(1))
                      & (position < (skip_from + count).unsqueeze(1)), 2.0)
    picked = order[keys.topk(num_negatives, dim=1, largest=False, sorted=False).indices]
    if not fallback:
        return picked
    drawn = sample_with_replacement(anchor_labels, num_negatives, order, class_start,
                                    class_count)
    return torch.where((pool < num_negatives).unsqueeze(1), drawn, picked)


@torch.no_grad()
def momentum_update(memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor,
                    momentum: float) -> None:
    """In place: ``memory[index] = normalize(momentum * memory[index] + (1 - momentum) * v)``.

    memory: (N, D); index: (B,) distinct rows; v: (B, D) embeddings (detached here).
    """
    mixed = momentum * memory[index] + (1.0 - momentum) * v.detach().to(memory.dtype)
    memory.index_copy_(0, index, F.normalize(mixed, dim=1))


class Embed(nn.Module):
    """``Linear(dim_in, dim_out)`` followed by L2 normalisation: (B, dim_in) -> (B, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


@dataclass
class CRDConfig:
    """feat_dim: embedding size; num_negatives: K per sample; nce_temperature: score
    temperature; momentum: memory momentum in [0, 1); ce_weight / kd_weight / crd_weight:
    term weights (gamma, alpha, beta of methods.md 1.3); kd_temperature: T of the KD term;
    negative_sampling: ``without_replacement`` (K distinct negatives per anchor when its pool
    holds K, as RepDistiller's CIFAR-100 loader; O(B * N) per step) or ``with_replacement``
    (as RepDistiller's ImageNet loader; O(B * K) per step)."""

    feat_dim: int = 128
    num_negatives: int = 16384
    nce_temperature: float = 0.07
    momentum: float = 0.5
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    crd_weight: float = 0.8
    kd_temperature: float = 4.0
    negative_sampling: str = "without_replacement"
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("negative_sampling",)

    def validate(self) -> None:
        for name in ("feat_dim", "num_negatives"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}",
                                  fix=f"set {name} to a positive integer")
        require_positive("nce_temperature", self.nce_temperature)
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum!r}",
                              fix="set momentum to a value in [0, 1), e.g. 0.5")
        require_non_negative("ce_weight", self.ce_weight)
        require_non_negative("kd_weight", self.kd_weight)
        require_positive("crd_weight", self.crd_weight)
        require_positive("kd_temperature", self.kd_temperature)
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ConfigError("negative_sampling", f"unknown value {self.negative_sampling!r}",
                              allowed=NEGATIVE_SAMPLING)


@register_distiller("crd")
class CRD(Distiller):
    """Student trained with ``ce_weight * CE + kd_weight * KD + crd_weight * (L_s + L_t)``.

    Buffers: ``memory_s`` / ``memory_t`` (N, feat_dim) banks of student / teacher embeddings;
    ``z_s`` / ``z_t`` the fixed normalisers of the student- / teacher-anchored scores (-1 until
    the first training step); ``order``, ``class_start``, ``class_count`` index the training
    labels by class for negative sampling (rebuilt from ``DataInfo``, not checkpointed);
    ``short_pools`` says whether some class's negative pool holds fewer than K samples (its
    anchors then draw with replacement, as in RepDistiller).
    """

    display_name = "CRD"

    Config = CRDConfig

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: CRDConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        t_shapes, s_shapes = self.checked_taps(data)
        self.num_samples = data.num_samples
        self.embed_s = Embed(s_shapes.embedding_dim, cfg.feat_dim)
        self.embed_t = Embed(t_shapes.embedding_dim, cfg.feat_dim)
        bound = 1.0 / math.sqrt(cfg.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(data.num_samples, cfg.feat_dim) * (2 * bound) - bound
            self.register_buffer(name, bank)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        labels = data.labels.long()
        if labels.shape != (data.num_samples,):
            raise ValueError(f"DataInfo.labels has shape {tuple(labels.shape)}, "
                             f"expected ({data.num_samples},)")
        count = torch.bincount(labels, minlength=data.num_classes)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.short_pools = bool((other_class_pool(count) < cfg.num_negatives).any())

    @classmethod
    def check_train_size(cls, cfg: CRDConfig, num_samples: int) -> None:
        """ConfigError when K exceeds the training split's ``num_samples`` (N), where a study
        knows N before loading data: every anchor would draw its K negatives with replacement,
        each sample ~K/N times, at O(B * K) per step (K=100,000 on 256 images: 30x slower)."""
        if cfg.num_negatives > num_samples:
            raise ConfigError("num_negatives", f"asks for {cfg.num_negatives} negatives per "
                              f"sample, and the training split has {num_samples} samples",
                              fix=f"set num_negatives to at most {num_samples} (CRD's CIFAR "
                                  "setting is 16384 of 50,000)")

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        if cfg.kd_weight > 0:
            check_same_classes(teacher, student)

    def contrast_indices(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) sample ids -> (B, K+1): the sample itself, then K samples of other classes
        drawn as ``negative_sampling`` says."""
        anchors, k = self.labels[index], self.cfg.num_negatives
        if self.cfg.negative_sampling == "with_replacement":
            negatives = sample_with_replacement(anchors, k, self.order, self.class_start,
                                                self.class_count)
        else:
            negatives = sample_other_class(anchors, k, self.order, self.class_start,
                                           self.class_count, self.short_pools)
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def _normalise(self, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Divide (B, K+1) scores by ``z``, fixing ``z = mean(scores) * N`` on first training use."""
        value = torch.where(z > 0, z, scores.detach().mean() * self.num_samples)
        if self.training:
            z.copy_(value)
        return scores / value

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) int64 training-set ids.

        In training mode the memory banks are updated at ``index`` after the scores are taken.
        """
        feats_t = self.teacher_features(x)
        feats = self.student.forward_features(x)
        v_s = self.embed_s(feats.embedding)
        v_t = self.embed_t(feats_t.embedding)
        idx = self.contrast_indices(index)
        t_mem = contrast_scores(self.memory_t, idx, v_s, self.cfg.nce_temperature)
        s_mem = contrast_scores(self.memory_s, idx, v_t, self.cfg.nce_temperature)
        loss_s = crd_nce_loss(self._normalise(t_mem, self.z_s), self.num_samples)
        loss_t = crd_nce_loss(self._normalise(s_mem, self.z_t), self.num_samples)
        if self.training:
            momentum_update(self.memory_s, index, v_s, self.cfg.momentum)
            momentum_update(self.memory_t, index, v_t, self.cfg.momentum)
        terms: LossTerms = {}
        if self.cfg.ce_weight > 0:
            terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(feats.logits, y)
        if self.cfg.kd_weight > 0:
            terms["loss_kd"] = self.cfg.kd_weight * kd_loss(feats.logits, feats_t.logits,
                                                            self.cfg.kd_temperature)
        terms["loss_crd"] = self.cfg.crd_weight * (loss_s + loss_t)
        return feats.logits, terms
