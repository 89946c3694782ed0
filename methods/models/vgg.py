"""RepDistiller's CIFAR VGGs with BatchNorm.

vgg8 (cfg S), vgg11 (A), vgg13 (B), vgg16 (D) and vgg19 (E).

Five conv blocks, each conv followed by BN and ReLU. Blocks 0-2 are each followed by a 2x2
max-pool; the pool after block 3 is applied only to inputs of 64 px or more (RepDistiller skips
it at 32 px), then global average pooling and a single ``Linear(512, num_classes)``.
Parameter names follow RepDistiller's ``models/vgg.py``.

Init as in its ``_initialize_weights``: convs N(0, 2 / (k * k * C_out)) with zero bias,
BatchNorm 1 / 0, classifier weight N(0, 0.01) and bias 0.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, register_model
from kdflow.methods.models.blocks import PooledClassifier
from kdflow.methods.models.layers import init_kaiming

CONFIGS: Dict[str, List[List[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
          [512, 512, 512, 512]],
}


def _conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """(conv3x3-BN-ReLU) per width, without the last ReLU, so the block ends pre-activation."""
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


def _widths(block: nn.Sequential) -> List[int]:
    """The output widths of the convs of a block built by ``_conv_block``."""
    return [m.out_channels for m in block if isinstance(m, nn.Conv2d)]


class _MaxPoolFromSide(nn.Module):
    """2x2 max-pool of (B, C, H, W) when ``H >= min_side``, identity otherwise.

    Reproduces, on block3's output, VGG's rule of pooling before block4 only for inputs of
    64 px or more (block3's output side is then at least 8).
    """

    def __init__(self, min_side: int) -> None:
        super().__init__()
        self.min_side = min_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, 2) if x.shape[2] >= self.min_side else x


class VGG(TappedModel):
    """VGG-BN for (B, 3, H, W) inputs.

    At 32x32 the five stages are (64@32, 128@16, 256@8, 512@4, 512@4); the embedding is
    (B, 512). VGG has no separate stem: ``stem`` is the first stage's output.
    """

    stem_is_first_stage = True

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        in_channels = [3] + [block[-1] for block in cfg[:-1]]
        self.block0 = _conv_block(in_channels[0], cfg[0])
        self.block1 = _conv_block(in_channels[1], cfg[1])
        self.block2 = _conv_block(in_channels[2], cfg[2])
        self.block3 = _conv_block(in_channels[3], cfg[3])
        self.block4 = _conv_block(in_channels[4], cfg[4])
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_kaiming(self, linear_std=0.01, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, 3, H, W) -> Features with 5 stages (see the class docstring for shapes)."""
        pooled_before = (False, True, True, True, x.shape[2] >= 64)
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        stages, preact = [], []
        out = x
        for block, pool in zip(blocks, pooled_before):
            if pool:
                out = F.max_pool2d(out, 2, 2)
            pre = block(out)
            out = F.relu(pre)
            preact.append(pre)
            stages.append(out)
        embedding = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(self.classifier(embedding), stages, preact, embedding, stages[0])

    # HSAKD auxiliary-branch parts (the protocol is documented in methods/models/aux_heads.py).
    # HSAKD taps blocks 0, 1, 2 and 4: blocks 3 and 4 share a width and form one stage.
    hsakd_taps: Tuple[int, ...] = (0, 1, 2, 4)

    def hsakd_transitions(self) -> List[nn.Module]:
        """pool-block1-ReLU, pool-block2-ReLU, then pool-block3-ReLU-(pool)-block4-ReLU."""
        return [
            nn.Sequential(nn.MaxPool2d(2, 2), self.block1, nn.ReLU(inplace=True)),
            nn.Sequential(nn.MaxPool2d(2, 2), self.block2, nn.ReLU(inplace=True)),
            nn.Sequential(nn.MaxPool2d(2, 2), self.block3, nn.ReLU(inplace=True),
                          _MaxPoolFromSide(8), self.block4, nn.ReLU(inplace=True)),
        ]

    def hsakd_last_stage(self) -> nn.Module:
        """New block3 and block4 without pooling, block3 reading block4's width (512 -> 512)."""
        widths3, widths4 = _widths(self.block3), _widths(self.block4)
        return nn.Sequential(_conv_block(widths4[-1], widths3), nn.ReLU(inplace=True),
                             _conv_block(widths3[-1], widths4), nn.ReLU(inplace=True))

    def hsakd_pre_pool(self) -> nn.Module:
        return nn.Identity()

    def stablekd_stages(self) -> List[nn.Module]:
        """One stage per conv block (methods/models/blocks.py): block0-ReLU, then
        pool-block-ReLU for blocks 1-3, then (pool when block3's side >= 8, i.e. inputs of
        64 px or more) block4-ReLU + pooling + classifier."""
        return [
            nn.Sequential(self.block0, nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2, 2), self.block1, nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2, 2), self.block2, nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2, 2), self.block3, nn.ReLU()),
            nn.Sequential(_MaxPoolFromSide(8), self.block4, nn.ReLU(),
                          PooledClassifier(nn.Identity(), self.classifier)),
        ]


def _register(name: str, cfg_key: str) -> None:
    @register_model(name, family="vgg", default_lr=0.05)
    def build(num_classes: int) -> TappedModel:
        return VGG(CONFIGS[cfg_key], num_classes)


for _name, _key in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"),
                    ("vgg19", "E")):
    _register(_name, _key)
