"""Semantic segmentation models: a zoo backbone, a per-pixel head and an FCN auxiliary head.

Registered as ``<head>_<backbone>`` (``deeplabv3_resnet18``, ``pspnet_resnet8``,
``lraspp_mobilenetv2``...) with ``task=SEGMENTATION`` and family ``seg_<head>``; random init,
nothing is ever downloaded.

Heads, all reading the backbone's last stage:

- ``deeplabv3``: torchvision's ``DeepLabHead`` (ASPP + conv3x3 + 1x1 classifier, 256 wide); on
                 the CIFAR backbones the same layers around torchvision's ``ASPP`` as wide as
                 the last stage (``Backbone.head_width``).
- ``fcn``:       torchvision's ``FCNHead`` (conv3x3 to C/4 + dropout + 1x1 classifier).
- ``lraspp``:    torchvision's ``LRASPPHead`` (128 wide); it also reads the first stage as its
                 low-level input, one resolution step finer than the last (torchvision pairs
                 strides 8 and 16 on MobileNetV3; here 4 and 8).
- ``pspnet``:    kdflow's own ``PSPHead`` (methods/models/seg_heads.py): pyramid pooling with
                 bins 1/2/3/6, conv3x3 to 512 (twice ``head_width`` on the CIFAR backbones),
                 1x1 classifier.

DeepLabV3, PSPNet and FCN also carry torchvision's auxiliary ``FCNHead`` on the second-to-last
stage (layer3 of the ResNets, CIRKD's c3); its upsampled logits are ``Features.aux``. LRASPP has
none (``aux`` is None).

Backbones are the zoo's classification wrappers with their classifiers dropped, so ``stages``,
``preact`` and ``stem`` come from the same code paths as for classification:

- ``resnet18/34/50/101`` (torchvision, 4 stages): output stride 8; layer3 and layer4 run at
  stride 1 with dilation 2 and 4 (torchvision's ``replace_stride_with_dilation`` for
  Bottleneck nets, :func:`dilate` for the BasicBlock ones). Registered input size 512.
- ``mobilenetv2`` (torchvision, width 1, 4 stages): output stride 8; the blocks of the
  stride-16 and stride-32 groups (features 7-17) run at stride 1 with dilation 2 and 4.
- ``resnet8/20/56/110``, ``resnet8x4``, ``resnet32x4`` (the CIFAR zoo, 3 stages): output stride
  4 as built (stride-1 stem, stages at strides 1, 2, 2); registered input size 64.

``embedding`` is the last stage average-pooled, (B, C_last). With ``in_channels`` = 4 (LAD's
label-assisted teacher) the backbone's first conv reads one more channel (:func:`widen_first_conv`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models.segmentation.lraspp import LRASPPHead

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel, build_model, register_model
from kdflow.methods.models.imagenet import (MOBILENET_STAGE_ENDS, TorchvisionMobileNetV2,
                                            TorchvisionResNet)
from kdflow.methods.models.seg_heads import PSPHead
from kdflow.methods.tasks import SEGMENTATION

#: Std of the first-conv weights that read the label channels of LAD's teacher input.
LABEL_SLICE_STD = 0.1
#: Width of torchvision's LRASPP head.
LRASPP_CHANNELS = 128


# ---- backbones -------------------------------------------------------------------------------

def dilate(blocks: Iterable[nn.Module], dilation: int, previous: int) -> None:
    """Turn a run of blocks that starts with a stride-2 block into one at stride 1, in place.

    Every strided conv (the first block's 3x3 and its 1x1 shortcut) gets stride 1; the strided
    3x3 conv gets dilation ``previous`` (the dilation before this run) and every other 3x3 conv
    ``dilation``, with padding equal to the dilation, as torchvision's
    ``replace_stride_with_dilation`` does for Bottleneck layers. The run then maps
    (B, C, H, W) -> (B, C', H, W) instead of (B, C', H/2, W/2).
    """
    for conv in (m for block in blocks for m in block.modules() if isinstance(m, nn.Conv2d)):
        strided = conv.stride != (1, 1)
        conv.stride = (1, 1)
        if conv.kernel_size == (3, 3):
            d = previous if strided else dilation
            conv.dilation, conv.padding = (d, d), (d, d)


def _headless_resnet(net: tvm.ResNet) -> TappedModel:
    """The zoo's torchvision ResNet wrapper without its classifier (``fc`` is the identity)."""
    model = TorchvisionResNet(net)
    model.fc = nn.Identity()
    return model


def _bottleneck_resnet(factory: Callable[..., tvm.ResNet]) -> TappedModel:
    """A torchvision Bottleneck ResNet (50, 101) at output stride 8."""
    return _headless_resnet(factory(weights=None, replace_stride_with_dilation=[False, True, True]))


def _basic_resnet(factory: Callable[..., tvm.ResNet]) -> TappedModel:
    """A torchvision BasicBlock ResNet (18, 34) at output stride 8 (its blocks refuse
    ``replace_stride_with_dilation``, so layer3 and layer4 are dilated after construction)."""
    net = factory(weights=None)
    dilate(net.layer3, dilation=2, previous=1)
    dilate(net.layer4, dilation=4, previous=2)
    return _headless_resnet(net)


def _mobilenetv2() -> TappedModel:
    """torchvision MobileNetV2 (width 1) at output stride 8, without its last 1x1 conv and its
    classifier, so the embedding is the pooled 320-channel last stage."""
    net = tvm.mobilenet_v2(weights=None)
    _, stride8_end, stride16_end, stride32_end = MOBILENET_STAGE_ENDS
    dilate(net.features[stride8_end + 1:stride16_end + 1], dilation=2, previous=1)
    dilate(net.features[stride16_end + 1:stride32_end + 1], dilation=4, previous=2)
    model = TorchvisionMobileNetV2(net)
    model.features[-1] = nn.Identity()
    model.classifier = nn.Identity()
    return model


def _cifar_resnet(name: str) -> TappedModel:
    """The CIFAR zoo's ``name`` (resnet8 ...) without its classifier, at output stride 4."""
    model = build_model(name, 1)
    model.fc = nn.Identity()
    return model


@dataclass(frozen=True)
class Backbone:
    """How to build one headless backbone, and the facts its heads are sized by.

    build:         () -> TappedModel whose ``forward_features`` gives the stages.
    stages:        channels of each stage.
    output_stride: input side / last stage side.
    atrous_rates:  DeepLabV3's ASPP rates for this backbone's maps at ``input_size``.
    input_size:    registered native input side.
    head_width:    channels of the DeepLabV3 (ASPP) and PSPNet heads: the papers' 256 / 512 on
                   the torchvision backbones; on the CIFAR ones a head as wide as the last
                   stage (a 256-wide ASPP would hold ~95% of a ResNet8's weights and FLOPs),
                   twice that for PSPNet.
    """

    build: Callable[[], TappedModel]
    stages: Tuple[int, ...]
    output_stride: int
    atrous_rates: Tuple[int, int, int]
    input_size: int
    head_width: int = 256


# torchvision's ASPP rates (12, 24, 36) suit 64-pixel maps (512 px at output stride 8); the
# CIFAR backbones at 64 px give 16-pixel maps, so their rates are scaled by 1/4.
_TV_RATES, _CIFAR_RATES = (12, 24, 36), (3, 6, 9)
_NARROW, _WIDE = (16, 32, 64), (64, 128, 256)

BACKBONES: Dict[str, Backbone] = {
    "resnet18": Backbone(partial(_basic_resnet, tvm.resnet18), (64, 128, 256, 512), 8, _TV_RATES,
                         512),
    "resnet34": Backbone(partial(_basic_resnet, tvm.resnet34), (64, 128, 256, 512), 8, _TV_RATES,
                         512),
    "resnet50": Backbone(partial(_bottleneck_resnet, tvm.resnet50), (256, 512, 1024, 2048), 8,
                         _TV_RATES, 512),
    "resnet101": Backbone(partial(_bottleneck_resnet, tvm.resnet101), (256, 512, 1024, 2048), 8,
                          _TV_RATES, 512),
    "mobilenetv2": Backbone(_mobilenetv2, (24, 32, 96, 320), 8, _TV_RATES, 512),
    **{name: Backbone(partial(_cifar_resnet, name), _NARROW, 4, _CIFAR_RATES, 64, _NARROW[-1])
       for name in ("resnet8", "resnet20", "resnet56", "resnet110")},
    **{name: Backbone(partial(_cifar_resnet, name), _WIDE, 4, _CIFAR_RATES, 64, _WIDE[-1])
       for name in ("resnet8x4", "resnet32x4")},
}


def widen_first_conv(model: nn.Module, in_channels: int) -> None:
    """Let ``model``'s first conv (in registration order) read ``in_channels`` >= 3 channels.

    Channels 0-2 keep their initialisation; the weights of each extra channel (the label slice
    of LAD's teacher input) are drawn as ``randn * 0.1``. Nothing else changes, so the state
    dict has the same keys. ``in_channels`` = 3 leaves the model as it is.
    """
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    extra = in_channels - conv.in_channels
    if extra < 0:
        raise ValueError(f"segmentation backbones read at least {conv.in_channels} input "
                         f"channels, not {in_channels}")
    if extra:
        label = torch.randn(conv.out_channels, extra, *conv.kernel_size) * LABEL_SLICE_STD
        conv.weight = nn.Parameter(torch.cat([conv.weight.detach(), label], dim=1))
        conv.in_channels = in_channels


# ---- models ----------------------------------------------------------------------------------

def _upsample(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear with ``align_corners=False``."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationModel(TappedModel):
    """backbone -> head on the last stage, plus an optional auxiliary head on the second-to-last.

    Input (B, C_in, H, W); ``Features.logits`` and ``Features.aux`` are (B, K, H, W); stages,
    preact, stem and embedding are the backbone's (see the module docstring).
    """

    def __init__(self, backbone: TappedModel, head: nn.Module, aux_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def decode(self, stages: List[torch.Tensor]) -> torch.Tensor:
        """The head's logits at the last stage's resolution: (B, K, h, w)."""
        return self.head(stages[-1])

    def forward_features(self, x: torch.Tensor) -> Features:
        """x: (B, C_in, H, W) -> Features with (B, K, H, W) logits (and aux)."""
        feats = self.backbone.forward_features(x)
        size = x.shape[-2:]
        logits = _upsample(self.decode(feats.stages), size)
        aux = None if self.aux_head is None else _upsample(self.aux_head(feats.stages[-2]), size)
        return Features(logits, feats.stages, feats.preact, feats.embedding, feats.stem, aux)


class LRASPPModel(SegmentationModel):
    """LRASPP: the head reads the first stage (low level) and the last (high level)."""

    def decode(self, stages: List[torch.Tensor]) -> torch.Tensor:
        """The head's logits at the first stage's resolution: (B, K, h0, w0)."""
        return self.head({"low": stages[0], "high": stages[-1]})


@dataclass(frozen=True)
class HeadFamily:
    """build: (backbone, num_classes) -> head; model: the class composing backbone and head;
    aux: whether the model carries the auxiliary FCN head on the second-to-last stage."""

    build: Callable[[Backbone, int], nn.Module]
    model: type
    aux: bool


def deeplab_head(in_channels: int, num_classes: int, rates: Tuple[int, int, int],
                 width: int) -> nn.Module:
    """torchvision's DeepLabV3 head (ASPP, conv3x3-BN-ReLU, 1x1 classifier) at ``width``
    channels: ``DeepLabHead`` itself at its fixed 256, the same layers (and state-dict keys)
    around torchvision's ``ASPP`` otherwise."""
    if width == 256:
        return DeepLabHead(in_channels, num_classes, rates)
    return nn.Sequential(ASPP(in_channels, list(rates), width),
                         nn.Conv2d(width, width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, num_classes, 1))


HEADS: Dict[str, HeadFamily] = {
    "deeplabv3": HeadFamily(lambda b, k: deeplab_head(b.stages[-1], k, b.atrous_rates,
                                                      b.head_width),
                            SegmentationModel, aux=True),
    "pspnet": HeadFamily(lambda b, k: PSPHead(b.stages[-1], k, channels=2 * b.head_width),
                         SegmentationModel, aux=True),
    "fcn": HeadFamily(lambda b, k: FCNHead(b.stages[-1], k), SegmentationModel, aux=True),
    "lraspp": HeadFamily(lambda b, k: LRASPPHead(b.stages[0], b.stages[-1], k, LRASPP_CHANNELS),
                         LRASPPModel, aux=False),
}

#: The registered (head, backbone) pairs: every head on every backbone, LRASPP on MobileNetV2.
PAIRS: Tuple[Tuple[str, str], ...] = (
    *((head, backbone) for head in ("deeplabv3", "pspnet", "fcn") for backbone in BACKBONES),
    ("lraspp", "mobilenetv2"),
)


def _register(head_name: str, backbone_name: str) -> None:
    head, backbone = HEADS[head_name], BACKBONES[backbone_name]

    @register_model(f"{head_name}_{backbone_name}", family=f"seg_{head_name}", default_lr=0.01,
                    input_size=backbone.input_size, task=SEGMENTATION)
    def build(num_classes: int, in_channels: int = 3) -> TappedModel:
        net = backbone.build()
        widen_first_conv(net, in_channels)
        aux = FCNHead(backbone.stages[-2], num_classes) if head.aux else None
        return head.model(net, head.build(backbone, num_classes), aux)


for _head, _backbone in PAIRS:
    _register(_head, _backbone)
