"""RepDistiller's CIFAR ResNet50 (``models/resnetv2.py``), registered as ``ResNet50``.

The teacher of CRD's ResNet50 -> MobileNetV2 / vgg8 rows and of HSAKD's ResNet50 ->
MobileNetV2 row. Bottleneck blocks (expansion 4), [3, 4, 6, 3] blocks per stage at strides
(1, 2, 2, 2), a 3x3 stride-1 stem to 64 channels and no max-pool, so 32x32 inputs keep their
resolution in stage 1; 23,705,252 parameters at 100 classes.

The name is RepDistiller's and mdistiller's ``model_dict`` key, spelt as kdflow spells the
other models taken from them (``ShuffleV1``, ``MobileNetV2``). Registry names are
case-sensitive: ``resnet50`` (lower case) is torchvision's ImageNet ResNet-50
(``methods/models/imagenet.py``: 7x7 stride-2 stem and a max-pool, 224 px inputs), a different
network with 23,712,932 parameters at 100 classes.

Parameter names follow ``models/resnetv2.py`` (``shortcut``, ``linear``), so CRD's released
ResNet50 checkpoint loads with ``load_state_dict``. Init as there: kaiming-normal (fan_out)
convs, BatchNorm 1 / 0, the classifier at PyTorch's default.
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

EXPANSION = 4
STEM_CHANNELS = 64
PLANES = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)


class Bottleneck(nn.Module):
    """1x1 conv-BN-ReLU, 3x3 conv (stride s)-BN-ReLU, 1x1 conv-BN, plus the shortcut, then ReLU.

    Input (B, in_planes, H, W); returns ``(out, preact)``, both (B, 4 * planes, H/s, W/s), where
    ``preact`` is the residual sum before the final ReLU. The shortcut is a 1x1 conv-BN when the
    stride or the width changes, else the identity (an empty ``nn.Sequential``).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = EXPANSION * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


class BottleneckResNet(TappedModel):
    """CIFAR bottleneck ResNet with ``num_blocks[i]`` blocks in stage i, for (B, 3, H, W) inputs
    with H, W divisible by 8.

    At 32x32: stem 64@32, stages (256@32, 512@16, 1024@8, 2048@4), embedding (B, 2048).
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_planes = [STEM_CHANNELS] + [EXPANSION * p for p in PLANES[:-1]]
        self.layer1 = self._stage(in_planes[0], PLANES[0], num_blocks[0], STRIDES[0])
        self.layer2 = self._stage(in_planes[1], PLANES[1], num_blocks[1], STRIDES[1])
        self.layer3 = self._stage(in_planes[2], PLANES[2], num_blocks[2], STRIDES[2])
        self.layer4 = self._stage(in_planes[3], PLANES[3], num_blocks[3], STRIDES[3])
        self.linear = nn.Linear(EXPANSION * PLANES[3], num_classes)
        init_kaiming(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> PreactSequential:
        return PreactSequential(
            Bottleneck(in_planes if i == 0 else EXPANSION * planes, planes,
                       stride if i == 0 else 1)
            for i in range(blocks))

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 4 stages (see the class docstring for shapes)."""
        stem = F.relu(self.bn1(self.conv1(x)))
        out, stages, preact = run_stages(stem, (self.layer1, self.layer2, self.layer3,
                                                self.layer4))
        embedding = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(self.linear(embedding), stages, preact, embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2, 3)

    def hsakd_transitions(self) -> List[nn.Module]:
        """layer2, layer3 and layer4."""
        return [self.layer2, self.layer3, self.layer4]

    def hsakd_last_stage(self) -> nn.Module:
        """A new layer4 at stride 1 reading layer4's width (so its shortcuts are identities)."""
        width = self.linear.in_features
        return self._stage(width, width // EXPANSION, len(self.layer4), 1)

    def hsakd_pre_pool(self) -> nn.Module:
        return nn.Identity()

    def stablekd_stages(self) -> List[nn.Module]:
        """[stem + layer1, layer2, layer3, layer4 + pooling + linear] (methods/models/blocks.py)."""
        stem = nn.Sequential(self.conv1, self.bn1, nn.ReLU())
        return [nn.Sequential(stem, StageOutput(self.layer1)), StageOutput(self.layer2),
                StageOutput(self.layer3),
                nn.Sequential(StageOutput(self.layer4),
                              PooledClassifier(nn.Identity(), self.linear))]


@register_model("ResNet50", family="resnet_bottleneck", default_lr=0.05)
def resnet50_cifar(num_classes: int) -> TappedModel:
    """RepDistiller's ``ResNet50``: bottleneck blocks [3, 4, 6, 3], 3x3 stride-1 stem."""
    return BottleneckResNet((3, 4, 6, 3), num_classes)
