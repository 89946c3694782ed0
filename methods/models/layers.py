"""Pieces shared by several CIFAR families: weight init, channel shuffle, preact stages."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn


def init_kaiming(module: nn.Module, linear_std: float | None = None,
                 zero_linear_bias: bool = False) -> None:
    """In place, the weight init of RepDistiller's CIFAR zoo (each family passes its file's
    Linear rule; ShuffleNet V1 / V2 call nothing and keep PyTorch's defaults, as the official
    files do).

    Conv2d weights (C_out, C_in / groups, k_h, k_w): N(0, 2 / (k_h * k_w * C_out)), which is
    both ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (resnet.py, resnetv2.py) and
    ``normal_(0, sqrt(2 / n))`` with n = k * k * out_channels (vgg.py, mobilenetv2.py, wrn.py);
    conv biases 0. BatchNorm2d weight 1, bias 0.
    Linear weights (out, in): N(0, linear_std) when ``linear_std`` is given, else PyTorch's
    default (uniform, std 1 / sqrt(3 * in)); Linear biases 0 when ``zero_linear_bias``, else
    PyTorch's default (uniform on +-1 / sqrt(in)).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias and m.bias is not None:
                nn.init.zeros_(m.bias)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of (B, C, H, W) across ``groups`` groups; same shape out."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class PreactSequential(nn.Sequential):
    """Blocks that each return ``(out, preact)``; the stage returns the last block's pair.

    Input (B, C_in, H, W); both outputs (B, C_out, H', W'), ``preact`` being the tensor the
    last block applied its final activation to.
    """

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__(*blocks)

    def forward(  # type: ignore[override]
            self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


def run_stages(x: torch.Tensor, stages: Sequence[nn.Module]
               ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Run ``x`` through stages whose blocks return ``(out, preact)`` (``PreactSequential``).

    Returns the last output and, per stage, the post- and pre-activation maps.
    """
    out, posts, pres = x, [], []
    for stage in stages:
        out, pre = stage(out)
        posts.append(out)
        pres.append(pre)
    return out, posts, pres
