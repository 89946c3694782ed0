"""ImageNet models from torchvision (random init, never downloaded), with feature taps.

The torchvision submodules are adopted under their own names, so torchvision's state dicts
load into these models unchanged.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import Bottleneck

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, register_model
from kdflow.methods.models.blocks import PooledClassifier

# Last feature index of each tap stage of torchvision's MobileNetV2 (24, 32, 96, 320 channels),
# the same grouping as the CIFAR MobileNetV2.
MOBILENET_STAGE_ENDS = (3, 6, 13, 17)


def _adopt(target: nn.Module, source: nn.Module) -> None:
    """Register ``source``'s children on ``target`` under the same names."""
    for name, child in source.named_children():
        target.add_module(name, child)


def _residual_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock/Bottleneck's residual sum before its final ReLU."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(out))
    shortcut = x if block.downsample is None else block.downsample(x)
    return out + shortcut


class TorchvisionResNet(TappedModel):
    """torchvision ResNet with taps.

    At 224x224: stem (after conv1-BN-ReLU, before the max-pool) 64@112; stages
    (64e@56, 128e@28, 256e@14, 512e@7) with e = 1 (BasicBlock) or 4 (Bottleneck);
    embedding (B, 512e).
    """

    def __init__(self, net: tvm.ResNet) -> None:
        super().__init__()
        _adopt(self, net)

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 4 stages (see the class docstring for shapes)."""
        stem = self.relu(self.bn1(self.conv1(x)))
        out, stages, preact = self.maxpool(stem), [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer[:-1](out)
            pre = _residual_preact(layer[-1], out)
            out = F.relu(pre)
            stages.append(out)
            preact.append(pre)
        embedding = torch.flatten(self.avgpool(out), 1)
        return Features(self.fc(embedding), stages, preact, embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2, 3)

    def hsakd_transitions(self) -> List[nn.Module]:
        """layer2, layer3 and layer4."""
        return [self.layer2, self.layer3, self.layer4]

    def hsakd_last_stage(self) -> nn.Module:
        """A new layer4 at stride 1 reading layer4's width (so without a downsample branch)."""
        block = type(self.layer4[0])
        width = self.fc.in_features
        return nn.Sequential(*(block(width, width // block.expansion) for _ in self.layer4))

    def hsakd_pre_pool(self) -> nn.Module:
        return nn.Identity()

    def stablekd_stages(self) -> List[nn.Module]:
        """[stem (conv1-BN-ReLU-maxpool) + layer1, layer2, layer3, layer4 + pooling + fc]
        (methods/models/blocks.py)."""
        return [nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1),
                self.layer2, self.layer3,
                nn.Sequential(self.layer4, PooledClassifier(nn.Identity(), self.fc))]


class TorchvisionMobileNetV2(TappedModel):
    """torchvision MobileNetV2 (width 1) with taps.

    At 224x224: stem 32@112; stages (24@56, 32@28, 96@14, 320@7), linear bottlenecks so
    ``preact`` is ``stages``; embedding (B, 1280) after the last 1x1 conv and pooling.
    """

    def __init__(self, net: tvm.MobileNetV2) -> None:
        super().__init__()
        _adopt(self, net)

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 4 stages (see the class docstring for shapes)."""
        stem = self.features[0](x)
        out, stages = stem, []
        for i in range(1, len(self.features) - 1):
            out = self.features[i](out)
            if i in MOBILENET_STAGE_ENDS:
                stages.append(out)
        head = self.features[-1](out)
        embedding = torch.flatten(F.adaptive_avg_pool2d(head, 1), 1)
        return Features(self.classifier(embedding), stages, list(stages), embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2, 3)

    def hsakd_transitions(self) -> List[nn.Module]:
        """The feature blocks between consecutive tap stages."""
        ends = MOBILENET_STAGE_ENDS
        return [self.features[a + 1:b + 1] for a, b in zip(ends, ends[1:])]

    def hsakd_last_stage(self) -> nn.Module:
        """New copies of the last stage's blocks, all at stride 1, reading its width (320)."""
        channels = self.features[-1][0].in_channels
        layers = []
        for block in self.features[MOBILENET_STAGE_ENDS[-2] + 1:MOBILENET_STAGE_ENDS[-1] + 1]:
            expand_conv = block.conv[0][0]
            expand = expand_conv.out_channels // expand_conv.in_channels
            layers.append(InvertedResidual(channels, block.out_channels, 1, expand))
            channels = block.out_channels
        return nn.Sequential(*layers)

    def hsakd_pre_pool(self) -> nn.Module:
        """The final 1x1 conv-BN-ReLU6 to 1280 channels."""
        return self.features[-1]

    def stablekd_stages(self) -> List[nn.Module]:
        """[features 0-3, 4-6, 7-13, 14-17 + the last 1x1 conv + pooling + classifier]
        (methods/models/blocks.py); the stem (features[0]) is in the first stage."""
        starts = (0,) + tuple(end + 1 for end in MOBILENET_STAGE_ENDS[:-1])
        stages: List[nn.Module] = [self.features[a:b + 1]
                                   for a, b in zip(starts, MOBILENET_STAGE_ENDS)]
        stages[-1] = nn.Sequential(stages[-1],
                                   PooledClassifier(self.features[-1], self.classifier))
        return stages


def _register_resnet(name: str, factory: Callable[..., tvm.ResNet]) -> None:
    @register_model(name, family="imagenet_resnet", default_lr=0.05, input_size=224)
    def build(num_classes: int) -> TappedModel:
        return TorchvisionResNet(factory(weights=None, num_classes=num_classes))


_register_resnet("resnet18", tvm.resnet18)
_register_resnet("resnet34", tvm.resnet34)
_register_resnet("resnet50", tvm.resnet50)


@register_model("mobilenet_v2", family="imagenet_mobilenetv2", default_lr=0.01, input_size=224)
def mobilenet_v2(num_classes: int) -> TappedModel:
    """torchvision ``mobilenet_v2`` (width 1, stride-2 stem), random init."""
    return TorchvisionMobileNetV2(tvm.mobilenet_v2(weights=None, num_classes=num_classes))
