"""RepDistiller's CIFAR ResNets: resnet8 ... resnet110 and the wide resnet8x4 / resnet32x4.

3x3 stem, three stages of BasicBlocks (strides 1, 2, 2), global average pooling and a linear
classifier. Parameter names follow RepDistiller's ``models/resnet.py`` so CRD's released
teacher checkpoints load with ``load_state_dict``.

Init as in ``models/resnet.py``: kaiming-normal (fan_out) convs, BatchNorm 1 / 0, and the
classifier left at PyTorch's default (weight and bias).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, register_model
from kdflow.methods.models.blocks import PooledClassifier, StageOutput
from kdflow.methods.models.layers import PreactSequential, init_kaiming, run_stages

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) shortcut, then ReLU.

    Input (B, in_planes, H, W); returns ``(out, preact)``, both (B, planes, H/s, W/s), where
    ``preact`` is the residual sum before the final ReLU.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact


class CifarResNet(TappedModel):
    """ResNet(depth, widths) for 3-channel inputs of any side divisible by 4.

    ``widths`` = (stem, stage1, stage2, stage3); n = (depth - 2) / 6 blocks per stage.
    At 32x32 the stages are (w1@32, w2@16, w3@8) and the embedding is (B, w3).
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> PreactSequential:
        return PreactSequential(
            BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
            for i in range(blocks))

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 3 stages (B, w_i, H/2^i, W/2^i), i = 0, 1, 2."""
        stem = F.relu(self.bn1(self.conv1(x)))
        out, stages, preact = run_stages(stem, (self.layer1, self.layer2, self.layer3))
        embedding = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(self.fc(embedding), stages, preact, embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2)

    def hsakd_transitions(self) -> List[nn.Module]:
        """layer2 (tap 0 -> tap 1) and layer3 (tap 1 -> tap 2)."""
        return [self.layer2, self.layer3]

    def hsakd_last_stage(self) -> nn.Module:
        """A new layer3 at stride 1 that reads layer3's width: (B, w3, H, W) -> (B, w3, H, W)."""
        width = self.fc.in_features
        return self._stage(width, width, len(self.layer3), 1)

    def hsakd_pre_pool(self) -> nn.Module:
        return nn.Identity()

    def stablekd_stages(self) -> List[nn.Module]:
        """[stem + layer1, layer2, layer3 + pooling + fc] (methods/models/blocks.py)."""
        stem = nn.Sequential(self.conv1, self.bn1, nn.ReLU())
        return [nn.Sequential(stem, StageOutput(self.layer1)), StageOutput(self.layer2),
                nn.Sequential(StageOutput(self.layer3), PooledClassifier(nn.Identity(), self.fc))]


def _register(name: str, depth: int, widths: Sequence[int]) -> None:
    @register_model(name, family="resnet", default_lr=0.05)
    def build(num_classes: int) -> TappedModel:
        return CifarResNet(depth, widths, num_classes)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, NARROW)
_register("resnet8x4", 8, WIDE)
_register("resnet32x4", 32, WIDE)
