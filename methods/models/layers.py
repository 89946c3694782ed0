"""Pieces shared by several CIFAR families: weight init, channel shuffle, preact stages."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias, BatchNorm weight 1 and bias 0,
    Linear bias 0 (Linear weights keep PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
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
