"""Segmentation heads kdflow writes itself (torchvision has no PSPNet): PSPNet's pyramid pooling.

Every head maps the backbone's last stage (B, C, h, w) to logits (B, num_classes, h, w) at the
same resolution; the segmentation model upsamples them to the input's size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: PSPNet's pyramid: average pooling to 1x1, 2x2, 3x3 and 6x6 bins.
PSP_BINS = (1, 2, 3, 6)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., 2017): (B, C, h, w) -> (B, out_channels, h, w).

    Per bin size b: adaptive average pooling to b x b, a 1x1 conv to C / len(bins) channels,
    BN, ReLU, and bilinear upsampling back to (h, w); the branches are concatenated with the
    input, so ``out_channels`` = C + len(bins) * (C // len(bins)) (2C when C divides evenly).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        width = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, width, 1, bias=False),
                          nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for b in bins)
        self.out_channels = in_channels + len(bins) * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                  for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Sequential):
    """PSPNet's head: pyramid pooling, conv3x3-BN-ReLU to ``channels`` (512 as in the paper),
    dropout 0.1 and a 1x1 classifier: (B, C, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, bins: Sequence[int] = PSP_BINS,
                 channels: int = 512) -> None:
        ppm = PyramidPooling(in_channels, bins)
        super().__init__(
            ppm,
            nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )
