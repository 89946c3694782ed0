"""LAD's Label Noising Module (methods.md 5.2): label maps turned into a noised input channel.

Every class index k of a label map, and the ignore index as class ``C``, is replaced by a
scalar code; Gaussian noise is added per pixel. Teacher training draws the codes per image and
class from N(0, 1) (two independent draws give LAD's two paths); distillation uses fixed codes
spread evenly over the released code's range [-1.1, 1.0]: ``-1.1 + 2.1 k / C``, which is the
released ``(k - 11) / 10`` for VOC (C = 21). Spreading them over that range for any C keeps the
jumps between regions about as large as those of the N(0, 1) codes the teacher was trained on;
the literal ``(k - (C + 1) // 2) / 10`` would squeeze 5 classes into [-0.3, 0.2] and leave the
teacher an almost flat label channel.
"""
from __future__ import annotations

import torch

from kdflow.methods.tasks import IGNORE_INDEX


def code_indices(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) label map -> (B, H, W) int64 code index: the class, or ``num_classes`` for
    ``IGNORE_INDEX`` pixels."""
    return torch.where(y == IGNORE_INDEX, torch.full_like(y, num_classes), y).long()


#: The released code's fixed codes span (0 - 11) / 10 .. (21 - 11) / 10.
FIXED_CODE_RANGE = (-1.1, 1.0)


def fixed_codes(num_classes: int) -> torch.Tensor:
    """(num_classes + 1,) float32 codes for k = 0..C (C = the ignore index's code), evenly
    spaced over :data:`FIXED_CODE_RANGE`: ``-1.1 + 2.1 k / C`` (= (k - 11) / 10 for C = 21)."""
    low, high = FIXED_CODE_RANGE
    k = torch.arange(num_classes + 1, dtype=torch.float64)
    return (low + (high - low) * k / num_classes).float()


def random_code_map(y: torch.Tensor, num_classes: int, pixel_std: float) -> torch.Tensor:
    """Teacher-training noising: a fresh N(0, 1) code per image and class, plus N(0, pixel_std^2)
    per pixel. y: (B, H, W) labels; returns (B, H, W) float32. Draws from torch's global RNG
    (so a job's checkpointed RNG state makes a resumed run draw the same noise)."""
    index = code_indices(y, num_classes)
    b = y.shape[0]
    codes = torch.randn(b, num_classes + 1, device=y.device)
    m = codes.gather(1, index.reshape(b, -1)).reshape(y.shape)
    return m + pixel_std * torch.randn(y.shape, device=y.device)


def fixed_code_map(y: torch.Tensor, num_classes: int, pixel_std: float) -> torch.Tensor:
    """Distillation-time noising: the fixed codes of :func:`fixed_codes` plus N(0, pixel_std^2)
    per pixel (``pixel_std = 0`` gives the noise-free map). y: (B, H, W); returns (B, H, W)."""
    m = fixed_codes(num_classes).to(y.device)[code_indices(y, num_classes)]
    if pixel_std > 0:
        m = m + pixel_std * torch.randn(y.shape, device=y.device)
    return m


def with_label_channel(x: torch.Tensor, m: torch.Tensor, scale: float) -> torch.Tensor:
    """The label-assisted input: images (B, 3, H, W) and ``scale * m`` (B, H, W) as a 4th channel."""
    return torch.cat([x, (scale * m).unsqueeze(1).to(x.dtype)], dim=1)
