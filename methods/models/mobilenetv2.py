"""CIFAR MobileNetV2 at width 0.5, expansion T = 6, in the two variants of the KD literature.

* ``MobileNetV2``: RepDistiller's ``mobile_half`` (``models/mobilenetv2.py``), **stride-2
  stem**: stages 12@16, 16@8, 48@4, 160@2 at 32 px. The student of CRD's table (and of the
  RepDistiller / mdistiller based papers: ResNet50 / vgg13 -> MobileNetV2, vanilla 64.60).
* ``MobileNetV2_hsakd``: HSAKD's ``mobilenetV2`` (winycg/HSAKD ``models/mobilenetv2.py``),
  the same layers with a **stride-1 stem**: stages 12@32, 16@16, 48@8, 160@4 at 32 px, four
  times the FLOPs. The student of HSAKD's Table 1 (vgg13 / ResNet50 -> MobileNetV2, vanilla
  73.51); its numbers are not comparable to the ``MobileNetV2`` ones.

Both have 812,836 parameters at 100 classes. The inverted-residual blocks end in a linear (BN)
projection, so stage outputs carry no final activation and ``stages`` and ``preact`` hold the
same tensors. Parameter names follow each official file: RepDistiller wraps the classifier in
an ``nn.Sequential`` (``classifier.0.*``), HSAKD does not (``classifier.*``). Init as in both
files' ``_initialize_weights``: convs N(0, 2 / (k * k * C_out)), BatchNorm 1 / 0, classifier
weight N(0, 0.01) and bias 0.
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

# (channels at width 1, repeats, first stride) per block group; the first group has
# expansion 1, the others the model's expansion T.
SETTINGS = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
# Index of the last block group of each tap stage (24, 32, 96 and 320 channels at width 1).
STAGE_ENDS = (1, 2, 4, 6)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise (stride s) - 1x1 linear projection, residual when shapes match.

    Input (B, inp, H, W) -> (B, oup, H/s, W/s).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(TappedModel):
    """MobileNetV2(T, width) for (B, 3, H, W) inputs.

    At 32x32 with width 0.5 and a stride-s stem: stem 16@32/s, stages
    (12@32/s, 16@16/s, 48@8/s, 160@4/s), then a 1x1 conv to 1280 channels whose pooled output
    is the (B, 1280) embedding. ``wrap_classifier`` puts the Linear in an ``nn.Sequential``
    (RepDistiller's parameter names) or not (HSAKD's).
    """

    def __init__(self, num_classes: int, expansion: int = 6, width: float = 0.5,
                 stem_stride: int = 2, wrap_classifier: bool = True) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, channels, 3, stem_stride)
        self.blocks = nn.ModuleList()
        for g, (c, n, s) in enumerate(SETTINGS):
            out_channels = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1,
                                               expansion if g else 1))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channel, 1, 1)
        linear = nn.Linear(last_channel, num_classes)
        self.classifier = nn.Sequential(linear) if wrap_classifier else linear
        init_kaiming(self, linear_std=0.01, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 4 stages (see the class docstring for shapes)."""
        stem = self.conv1(x)
        out, stages = stem, []
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in STAGE_ENDS:
                stages.append(out)
        embedding = torch.flatten(F.adaptive_avg_pool2d(self.conv2(out), 1), 1)
        return Features(self.classifier(embedding), stages, list(stages), embedding, stem)

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    hsakd_taps: Tuple[int, ...] = (0, 1, 2, 3)

    def hsakd_transitions(self) -> List[nn.Module]:
        """The block groups between consecutive tap stages (groups 2, 3-4 and 5-6)."""
        return [nn.Sequential(*self.blocks[a + 1:b + 1])
                for a, b in zip(STAGE_ENDS, STAGE_ENDS[1:])]

    def hsakd_last_stage(self) -> nn.Module:
        """New groups 5-6 with every stride 1, the first block reading the last stage's width."""
        channels = self.conv2[0].in_channels
        layers = []
        for group in self.blocks[STAGE_ENDS[-2] + 1:]:
            for block in group:
                expand_conv, project_bn = block.conv[0], block.conv[-1]
                expand = expand_conv.out_channels // expand_conv.in_channels
                layers.append(InvertedResidual(channels, project_bn.num_features, 1, expand))
                channels = project_bn.num_features
        return nn.Sequential(*layers)

    def hsakd_pre_pool(self) -> nn.Module:
        """The 1x1 conv-BN-ReLU to 1280 channels."""
        return self.conv2

    def stablekd_stages(self) -> List[nn.Module]:
        """[conv1 + groups 0-1, group 2, groups 3-4, groups 5-6 + conv2 + pooling + classifier]
        (methods/models/blocks.py)."""
        starts = (0,) + tuple(end + 1 for end in STAGE_ENDS[:-1])
        stages: List[nn.Module] = [nn.Sequential(*self.blocks[a:b + 1])
                                   for a, b in zip(starts, STAGE_ENDS)]
        stages[0] = nn.Sequential(self.conv1, stages[0])
        stages[-1] = nn.Sequential(stages[-1], PooledClassifier(self.conv2, self.classifier))
        return stages


@register_model("MobileNetV2", family="mobilenetv2", default_lr=0.01)
def mobile_half(num_classes: int) -> TappedModel:
    """RepDistiller's ``mobile_half``: T = 6, width 0.5, stride-2 stem."""
    return MobileNetV2(num_classes, expansion=6, width=0.5, stem_stride=2)


@register_model("MobileNetV2_hsakd", family="mobilenetv2", default_lr=0.01)
def mobilenetv2_hsakd(num_classes: int) -> TappedModel:
    """HSAKD's ``mobilenetV2``: T = 6, width 0.5, stride-1 stem, unwrapped Linear classifier."""
    return MobileNetV2(num_classes, expansion=6, width=0.5, stem_stride=1,
                       wrap_classifier=False)
