"""RepDistiller's CIFAR ShuffleNet V1, registered as ``ShuffleV1``.

1x1 stem to 24 channels (no stride, no pooling), three stages with out_planes (240, 480, 960),
(4, 8, 4) blocks and 3 groups; each stage starts with a stride-2 block that concatenates an
average-pooled shortcut. Parameter names follow RepDistiller's ``models/ShuffleNetv1.py``.

The official file has no init loop, so every layer keeps PyTorch's default init (conv and
Linear weights uniform with std 1 / sqrt(3 * fan_in), BatchNorm 1 / 0).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, register_model
from kdflow.methods.models.blocks import PooledClassifier, StageOutput
from kdflow.methods.models.layers import PreactSequential, channel_shuffle, run_stages

STEM_CHANNELS = 24


class Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, with an added (stride 1) or
    concatenated average-pooled (stride 2) shortcut, then ReLU.

    Input (B, in_planes, H, W); returns ``(out, preact)``, both (B, C, H/s, W/s) with
    C = out_planes (stride 1) or out_planes + in_planes (stride 2).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The stem has 24 channels, not divisible into the stage's groups: no grouping there.
        self.first_groups = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(TappedModel):
    """ShuffleNet V1 for (B, 3, H, W) inputs with H, W divisible by 8.

    At 32x32: stem 24@32, stages (240@16, 480@8, 960@4), embedding (B, 960).
    """

    def __init__(self, out_planes: Sequence[int], num_blocks: Sequence[int], groups: int,
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_planes = [STEM_CHANNELS] + list(out_planes[:-1])
        self.layer1 = self._stage(in_planes[0], out_planes[0], num_blocks[0], groups)
        self.layer2 = self._stage(in_planes[1], out_planes[1], num_blocks[1], groups)
        self.layer3 = self._stage(in_planes[2], out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, blocks: int, groups: int) -> PreactSequential:
        """The first block concatenates its input, so it only adds out_planes - in_planes."""
        return PreactSequential(
            Bottleneck(in_planes, out_planes - in_planes, 2, groups) if i == 0
            else Bottleneck(out_planes, out_planes, 1, groups)
            for i in range(blocks))

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 3 stages (see the class docstring for shapes)."""
        stem = F.relu(self.bn1(self.conv1(x)))
        out, stages, preact = run_stages(stem, (self.layer1, self.layer2, self.layer3))
        embedding = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(self.linear(embedding), stages, preact, embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2)

    def hsakd_transitions(self) -> List[nn.Module]:
        """layer2 (tap 0 -> tap 1) and layer3 (tap 1 -> tap 2)."""
        return [self.layer2, self.layer3]

    def hsakd_last_stage(self) -> nn.Module:
        """A new layer3 of stride-1 (additive) blocks only, reading layer3's width."""
        width = self.linear.in_features
        groups = self.layer3[-1].conv3.groups
        return PreactSequential(Bottleneck(width, width, 1, groups) for _ in self.layer3)

    def hsakd_pre_pool(self) -> nn.Module:
        return nn.Identity()

    def stablekd_stages(self) -> List[nn.Module]:
        """[stem + layer1, layer2, layer3 + pooling + linear] (methods/models/blocks.py)."""
        stem = nn.Sequential(self.conv1, self.bn1, nn.ReLU())
        return [nn.Sequential(stem, StageOutput(self.layer1)), StageOutput(self.layer2),
                nn.Sequential(StageOutput(self.layer3),
                              PooledClassifier(nn.Identity(), self.linear))]


@register_model("ShuffleV1", family="shufflenet", default_lr=0.01)
def shuffle_v1(num_classes: int) -> TappedModel:
    """out_planes (240, 480, 960), num_blocks (4, 8, 4), 3 groups."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)
