"""Losses on per-pixel logits (methods.md 5.3): supervised cross-entropy with an auxiliary
head, pixel-wise KD and channel-wise distillation (CWD)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdflow.methods.features import Features
from kdflow.methods.tasks import IGNORE_INDEX

#: Distillation losses on logit maps a segmentation method can use.
MAP_LOSSES = ("cwd", "pixel")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy. Class logits (B, K) take labels (B,); logit maps (B, K, H, W) take
    label maps (B, H, W), whose ``IGNORE_INDEX`` pixels count in neither the sum nor the mean."""
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX if logits.dim() == 4 else -100)


def supervised_loss(feats: Features, y: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """:func:`cross_entropy` of the logits, plus ``aux_weight`` x that of the auxiliary head
    (segmentation models' ``Features.aux``) when the model has one."""
    loss = cross_entropy(feats.logits, y)
    if feats.aux is not None and aux_weight > 0:
        loss = loss + aux_weight * cross_entropy(feats.aux, y)
    return loss


def pixel_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Pixel-wise KD: ``T^2 * mean over the B*H*W pixels of KL(softmax_K(t/T) || softmax_K(s/T))``.

    logits_s, logits_t: (B, K, H, W); the teacher's map is bilinearly resized to the student's.
    """
    logits_t = _match_size(logits_t, logits_s)
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B, H, W)
    return kl.mean() * temperature ** 2


def cwd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al. 2021), as LAD uses it (methods.md 5.3).

    Each channel's map is turned into a distribution over its H*W positions,
    ``phi(P)_{n,c} = softmax_{HW}(P_{n,c} / T)``, and
    ``CWD = T^2 * (1 / (N * C)) * sum_{n,c} KL(phi(t)_{n,c} || phi(s)_{n,c})``.
    logits_s, logits_t: (N, C, H, W); the teacher's map is resized to the student's. Only
    ``logits_s`` receives gradients.
    """
    logits_t = _match_size(logits_t.detach(), logits_s)
    n, c = logits_s.shape[:2]
    log_p_s = F.log_softmax(logits_s.float().reshape(n * c, -1) / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t.float().reshape(n * c, -1) / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (N*C,)
    return kl.mean() * temperature ** 2


def map_distillation_loss(kind: str, logits_s: torch.Tensor, logits_t: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """``cwd_loss`` or ``pixel_kd_loss`` by name (one of ``MAP_LOSSES``)."""
    loss = cwd_loss if kind == "cwd" else pixel_kd_loss
    return loss(logits_s, logits_t.detach(), temperature)


def _match_size(logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
    if logits_t.shape[-2:] == logits_s.shape[-2:]:
        return logits_t
    return F.interpolate(logits_t, size=logits_s.shape[-2:], mode="bilinear", align_corners=False)
