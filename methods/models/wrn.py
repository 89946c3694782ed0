"""Pre-activation WideResNets as in RepDistiller: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Blocks are BN-ReLU-conv-BN-ReLU-conv with an additive shortcut and no activation after the
sum, so a stage's output is already its pre-activation: ``stages`` and ``preact`` hold the same
tensors. Parameter names follow RepDistiller's ``models/wrn.py``.

Init as in that file: convs N(0, 2 / (k * k * C_out)), BatchNorm 1 / 0, classifier bias 0 and
its weight at PyTorch's default.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, register_model
from kdflow.methods.models.blocks import PooledClassifier
from kdflow.methods.models.layers import init_kaiming


class WideBlock(nn.Module):
    """Pre-activation basic block.

    Input (B, in_planes, H, W) -> (B, out_planes, H/s, W/s). When the width changes, the
    1x1 projection shortcut reads the activated input, as in the reference implementation.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage of ``blocks`` WideBlocks; the first one carries the stride and width change."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(TappedModel):
    """WRN-depth-widen: widths (16, 16w, 32w, 64w), n = (depth - 4) / 6 blocks per stage.

    At 32x32 the stages are (16w@32, 32w@16, 64w@8); the embedding (B, 64w) is taken after
    the final BN+ReLU and global average pooling.
    """

    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming(self, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 3 stages (B, 16w * 2^i, H/2^i, W/2^i)."""
        stem = self.conv1(x)
        s1 = self.block1(stem)
        s2 = self.block2(s1)
        s3 = self.block3(s2)
        pooled = F.adaptive_avg_pool2d(F.relu(self.bn1(s3)), 1)
        embedding = torch.flatten(pooled, 1)
        stages = [s1, s2, s3]
        return Features(self.fc(embedding), stages, list(stages), embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2)

    def hsakd_transitions(self) -> List[nn.Module]:
        """block2 (tap 0 -> tap 1) and block3 (tap 1 -> tap 2)."""
        return [self.block2, self.block3]

    def hsakd_last_stage(self) -> nn.Module:
        """A new block3 at stride 1 that reads block3's width (so it has no projection shortcut)."""
        width = self.fc.in_features
        return NetworkBlock(len(self.block3.layer), width, width, 1)

    def hsakd_pre_pool(self) -> nn.Module:
        """The final BN + ReLU applied before pooling."""
        return nn.Sequential(self.bn1, nn.ReLU(inplace=True))

    def stablekd_stages(self) -> List[nn.Module]:
        """[conv1 + block1, block2, block3 + BN-ReLU + pooling + fc] (methods/models/blocks.py)."""
        head = PooledClassifier(nn.Sequential(self.bn1, nn.ReLU()), self.fc)
        return [nn.Sequential(self.conv1, self.block1), self.block2,
                nn.Sequential(self.block3, head)]


def _register(depth: int, widen: int) -> None:
    @register_model(f"wrn_{depth}_{widen}", family="wrn", default_lr=0.05)
    def build(num_classes: int) -> TappedModel:
        return WideResNet(depth, widen, num_classes)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
