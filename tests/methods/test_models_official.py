"""The zoo against the official definitions (issue 17 rows 4, 5, 7).

Facts come from the official files (the issue names RepDistiller b84f547, mdistiller a08d46f,
HSAKD 28c8dc2): RepDistiller's models/resnetv2.py (= mdistiller's models/cifar/resnetv2.py),
resnet.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py and HSAKD's
models/mobilenetv2.py and resnetv2.py: parameter counts, layer shapes, and each file's
weight-init rule, checked statistically.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple, Union

import pytest
import torch
from torch import nn

from kdflow.methods.models import MODELS, build_model, count_parameters
from kdflow.methods.models.aux_heads import AuxiliaryHeads

# ---- row 4: the CIFAR ResNet50 of RepDistiller / mdistiller ---------------------------------

# RepDistiller's ResNet(Bottleneck, [3, 4, 6, 3], num_classes=100).
RESNET50_PARAMS_100 = 23_705_252
# torchvision's ImageNet resnet50 at 100 classes: 25,557,032 - 1000 * 2049 + 100 * 2049.
TORCHVISION_RESNET50_PARAMS_100 = 23_712_932
# forward(x, is_feat=True) at 32x32: f0 = stem, f1..f4 = layer1..layer4, f5 = pooled.
RESNET50_STEM = (64, 32, 32)
RESNET50_STAGES = ((256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4))
# Official parameter shapes (models/resnetv2.py names) at 100 classes.
RESNET50_SHAPES: Dict[str, Tuple[int, ...]] = {
    "conv1.weight": (64, 3, 3, 3),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.shortcut.0.weight": (512, 256, 1, 1),
    "layer3.5.conv3.weight": (1024, 256, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.0.shortcut.1.weight": (2048,),
    "linear.weight": (100, 2048),
}
RESNET50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


def test_cifar_resnet50_parameter_count_and_names() -> None:
    model = build_model("ResNet50", 100)
    assert count_parameters(model) == RESNET50_PARAMS_100
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in RESNET50_SHAPES.items():
        assert shapes[key] == shape, key
    for layer, blocks in RESNET50_BLOCKS.items():
        assert len(getattr(model, layer)) == blocks
    # Only each stage's first block has a projection shortcut.
    assert sorted(k for k in shapes if "shortcut.0.weight" in k) == [
        f"layer{i}.0.shortcut.0.weight" for i in range(1, 5)]


def test_cifar_resnet50_taps() -> None:
    model = build_model("ResNet50", 100).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tuple(feats.stem.shape[1:]) == RESNET50_STEM
    assert tuple(tuple(s.shape[1:]) for s in feats.stages) == RESNET50_STAGES
    for stage, pre in zip(feats.stages, feats.preact):
        assert torch.equal(stage, torch.relu(pre)) and (pre < 0).any()
    assert feats.embedding.shape == (2, 2048) and feats.logits.shape == (2, 100)
    assert torch.allclose(feats.embedding, feats.stages[-1].mean((2, 3)), atol=1e-6)


def test_cifar_resnet50_is_not_torchvision_resnet50() -> None:
    assert MODELS.get("ResNet50").input_size == 32
    assert MODELS.get("resnet50").input_size == 224
    assert count_parameters(build_model("resnet50", 100)) == TORCHVISION_RESNET50_PARAMS_100


def test_cifar_resnet50_hsakd_heads_follow_the_official_branches() -> None:
    """HSAKD's ResNet50_aux: 4 branches; branch l copies layer l+1..4, the last one is layer4
    at stride 1 without a projection shortcut; every branch ends at 2048@4x4."""
    model = build_model("ResNet50", 10).eval()
    heads = AuxiliaryHeads(model, 10).eval()
    assert len(heads.branches) == 4
    assert [len(b.body) - 1 for b in heads.branches] == [3, 2, 1, 1]
    last = heads.branches[3].body[0]
    assert len(last) == 3 and all(len(block.shortcut) == 0 for block in last)
    with torch.no_grad():
        logits = heads(model.forward_features(torch.randn(2, 3, 32, 32)).stages)
    assert [tuple(t.shape) for t in logits] == [(2, 40)] * 4


# ---- row 7: HSAKD's MobileNetV2 (stride-1 stem) beside RepDistiller's mobile_half ------------

# Width 0.5, T = 6, 100 classes; summed from the official settings table
# (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1),
# stem conv_bn(3, 16), conv_1x1_bn(160, 1280), Linear(1280, 100); the stem stride adds nothing.
MOBILENETV2_PARAMS_100 = 812_836
MOBILENETV2_STAGE_CHANNELS = (12, 16, 48, 160)


@pytest.mark.parametrize("name, stem_stride, sides, classifier_key", [
    ("MobileNetV2", 2, (16, 8, 4, 2), "classifier.0.weight"),
    ("MobileNetV2_hsakd", 1, (32, 16, 8, 4), "classifier.weight"),
])
def test_mobilenetv2_variants(name: str, stem_stride: int, sides: Tuple[int, ...],
                              classifier_key: str) -> None:
    model = build_model(name, 100).eval()
    assert count_parameters(model) == MOBILENETV2_PARAMS_100
    assert model.conv1[0].stride == (stem_stride, stem_stride)
    assert tuple(model.state_dict()[classifier_key].shape) == (100, 1280)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tuple(feats.stem.shape[1:]) == (16, 32 // stem_stride, 32 // stem_stride)
    assert [tuple(s.shape[1:]) for s in feats.stages] == [
        (c, h, h) for c, h in zip(MOBILENETV2_STAGE_CHANNELS, sides)]
    assert feats.embedding.shape == (2, 1280)
    assert MODELS.get(name).default_lr == 0.01


def test_hsakd_mobilenetv2_heads_match_the_official_auxiliary_classifier() -> None:
    """HSAKD's Auxiliary_Classifier for mobilenetV2: 4 branches reading 12, 16, 48 and 160
    channels, each ending in conv_1x1_bn(160, 1280) at the last stage's 4x4 resolution."""
    model = build_model("MobileNetV2_hsakd", 100).eval()
    heads = AuxiliaryHeads(model, 100).eval()
    with torch.no_grad():
        stages = model.forward_features(torch.randn(2, 3, 32, 32)).stages
        for branch, tap in zip(heads.branches, stages):
            x = tap
            for module in branch.body:
                x = module(x)
            assert tuple(x.shape[1:]) == (1280, 4, 4)
    first_convs = [next(m for m in b.body.modules() if isinstance(m, nn.Conv2d))
                   for b in heads.branches]
    assert [conv.in_channels for conv in first_convs] == [12, 16, 48, 160]
    assert all(b.fc.out_features == 400 for b in heads.branches)


# ---- row 5: each family's init follows its official file ------------------------------------

DEFAULT = "default"  # PyTorch's reset_parameters: kaiming_uniform_(a=sqrt(5)) / uniform bias
FAN_OUT = "fan_out"  # kaiming_normal_(fan_out, relu) = normal_(0, sqrt(2 / (k * k * C_out)))
ZERO = "zero"

# name -> (conv weights, Linear weights (a std, or DEFAULT), Linear bias)
Rule = Union[str, float]
OFFICIAL_INIT: Dict[str, Tuple[str, Rule, str]] = {
    # resnet.py / resnetv2.py: kaiming convs, BN 1/0, the Linear untouched.
    **{f"resnet{d}": (FAN_OUT, DEFAULT, DEFAULT) for d in (8, 20, 110)},
    "resnet32x4": (FAN_OUT, DEFAULT, DEFAULT),
    "ResNet50": (FAN_OUT, DEFAULT, DEFAULT),
    # wrn.py: normal(0, sqrt(2/n)) convs, Linear bias zeroed, weight untouched.
    "wrn_40_2": (FAN_OUT, DEFAULT, ZERO),
    # RepDistiller's vgg.py / mobilenetv2.py and HSAKD's mobilenetv2.py _initialize_weights:
    # Linear N(0, 0.01), bias 0.
    "vgg8": (FAN_OUT, 0.01, ZERO),
    "vgg13": (FAN_OUT, 0.01, ZERO),
    "MobileNetV2": (FAN_OUT, 0.01, ZERO),
    "MobileNetV2_hsakd": (FAN_OUT, 0.01, ZERO),
    # ShuffleNetv1.py / ShuffleNetv2.py: no init loop at all.
    "ShuffleV1": (DEFAULT, DEFAULT, DEFAULT),
    "ShuffleV2": (DEFAULT, DEFAULT, DEFAULT),
}
MIN_ELEMENTS = 2048  # at this size 5 % is > 3 standard errors of a sample std (normal or uniform)
REL_TOL = 0.05


def _fans(weight: torch.Tensor) -> Tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them for a (out, in / groups, *kernel) weight:
    (in / groups) x kernel size and out x kernel size."""
    receptive = weight[0][0].numel()
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _check(tensor: torch.Tensor, rule: Rule, fan_in: int, fan_out: int, what: str) -> None:
    values = tensor.detach().flatten()
    if rule == ZERO:
        assert torch.count_nonzero(values) == 0, what
        return
    if rule == DEFAULT:
        bound = 1 / math.sqrt(fan_in)  # both weight and bias defaults are U(-bound, bound)
        assert values.abs().max() <= bound, what
        expected = bound / math.sqrt(3)
    elif rule == FAN_OUT:
        expected = math.sqrt(2 / fan_out)
    else:
        expected = float(rule)
    if values.numel() >= MIN_ELEMENTS:
        assert abs(values.std().item() / expected - 1) < REL_TOL, (what, values.std(), expected)
        assert abs(values.mean().item()) < 5 * expected / math.sqrt(values.numel()), what


@pytest.mark.parametrize("name", sorted(OFFICIAL_INIT))
def test_init_follows_the_official_file(name: str) -> None:
    torch.manual_seed(0)
    conv_rule, linear_rule, bias_rule = OFFICIAL_INIT[name]
    # 4096 classes: the classifier's bias has enough entries for a std estimate.
    model = build_model(name, 4096)
    checked = 0
    for module_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in, fan_out = _fans(m.weight)
            _check(m.weight, conv_rule, fan_in, fan_out, module_name)
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0, module_name
            checked += m.weight.numel() >= MIN_ELEMENTS
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), module_name
        elif isinstance(m, nn.Linear):
            fan_in, fan_out = _fans(m.weight)
            _check(m.weight, linear_rule, fan_in, fan_out, module_name)
            _check(m.bias, bias_rule, fan_in, fan_out, module_name + ".bias")
    assert checked > 0
