"""RepDistiller's CIFAR ShuffleNet V2 (net_size 1), registered as ``ShuffleV2``.

1x1 stem to 24 channels (no stride, no pooling), three stages with out_channels
(116, 232, 464) of one stride-2 down block plus (3, 7, 3) basic blocks, then a 1x1 conv to
1024 channels. Parameter names follow RepDistiller's ``models/ShuffleNetv2.py``. As there, every
layer keeps PyTorch's default init (no init loop in the official file).

``preact`` is channel-shuffled like the stage output, so ``stages[i] == relu(preact[i])``
elementwise (RepDistiller returns it unshuffled; the values are the same, in another order).
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


class BasicBlock(nn.Module):
    """Channel split; one half passes, the other goes 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU;
    concat and shuffle.

    Input (B, C, H, W); returns ``(out, preact)``, both (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        passed, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        out = channel_shuffle(torch.cat([passed, F.relu(branch)], 1), 2)
        preact = channel_shuffle(torch.cat([passed, branch], 1), 2)
        return out, preact


class DownBlock(nn.Module):
    """Stride-2 block: left dw3x3-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU;
    concat and shuffle.

    Input (B, C_in, H, W); returns ``(out, preact)``, both (B, C_out, H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn5(self.conv5(self.bn4(self.conv4(right))))
        preact = channel_shuffle(torch.cat([left, right], 1), 2)
        return F.relu(preact), preact


class ShuffleNetV2(TappedModel):
    """ShuffleNet V2 for (B, 3, H, W) inputs with H, W divisible by 8.

    At 32x32 with net_size 1: stem 24@32, stages (116@16, 232@8, 464@4), then a 1x1 conv to
    1024 channels whose pooled output is the (B, 1024) embedding.
    """

    def __init__(self, out_channels: Sequence[int], num_blocks: Sequence[int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = [STEM_CHANNELS] + list(out_channels[:2])
        self.layer1 = self._stage(in_channels[0], out_channels[0], num_blocks[0])
        self.layer2 = self._stage(in_channels[1], out_channels[1], num_blocks[1])
        self.layer3 = self._stage(in_channels[2], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int) -> PreactSequential:
        return PreactSequential([DownBlock(in_channels, out_channels)]
                                + [BasicBlock(out_channels) for _ in range(blocks)])

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 3 stages (see the class docstring for shapes)."""
        stem = F.relu(self.bn1(self.conv1(x)))
        out, stages, preact = run_stages(stem, (self.layer1, self.layer2, self.layer3))
        head = F.relu(self.bn2(self.conv2(out)))
        embedding = torch.flatten(F.adaptive_avg_pool2d(head, 1), 1)
        return Features(self.linear(embedding), stages, preact, embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2)

    def hsakd_transitions(self) -> List[nn.Module]:
        """layer2 (tap 0 -> tap 1) and layer3 (tap 1 -> tap 2)."""
        return [self.layer2, self.layer3]

    def hsakd_last_stage(self) -> nn.Module:
        """A new layer3 reading layer3's width, its down block's depthwise convs at stride 1."""
        width = self.conv2.in_channels
        stage = self._stage(width, width, len(self.layer3) - 1)
        stage[0].conv1.stride = (1, 1)
        stage[0].conv4.stride = (1, 1)
        return stage

    def hsakd_pre_pool(self) -> nn.Module:
        """The 1x1 conv-BN-ReLU to 1024 channels."""
        return nn.Sequential(self.conv2, self.bn2, nn.ReLU(inplace=True))

    def stablekd_stages(self) -> List[nn.Module]:
        """[stem + layer1, layer2, layer3 + conv2-BN-ReLU + pooling + linear]
        (methods/models/blocks.py)."""
        stem = nn.Sequential(self.conv1, self.bn1, nn.ReLU())
        head = PooledClassifier(nn.Sequential(self.conv2, self.bn2, nn.ReLU()), self.linear)
        return [nn.Sequential(stem, StageOutput(self.layer1)), StageOutput(self.layer2),
                nn.Sequential(StageOutput(self.layer3), head)]


@register_model("ShuffleV2", family="shufflenet", default_lr=0.01)
def shuffle_v2(num_classes: int) -> TappedModel:
    """net_size 1: out_channels (116, 232, 464, 1024), num_blocks (3, 7, 3)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
