"""Segmentation zoo: registry, logits/aux/stage shapes, output strides, the 4-channel
label-assisted teacher input, gradients under an ignore-index loss, torchvision parity."""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models import segmentation as tvseg

from kdflow.methods.errors import ConfigError
from kdflow.methods.models import MODELS, build_model, probe_taps
from kdflow.methods.models.segmentation import dilate
from kdflow.methods.tasks import IGNORE_INDEX, SEGMENTATION

NUM_CLASSES = 5

# backbone -> (stage channels, output stride); the stages of the CIFAR ResNets are at strides
# 1, 2, 4, those of the torchvision backbones at 4, 8, 8, 8.
BACKBONES: Dict[str, Tuple[Tuple[int, ...], int]] = {
    "resnet18": ((64, 128, 256, 512), 8),
    "resnet34": ((64, 128, 256, 512), 8),
    "resnet50": ((256, 512, 1024, 2048), 8),
    "resnet101": ((256, 512, 1024, 2048), 8),
    "mobilenetv2": ((24, 32, 96, 320), 8),
    "resnet8": ((16, 32, 64), 4),
    "resnet20": ((16, 32, 64), 4),
    "resnet56": ((16, 32, 64), 4),
    "resnet110": ((16, 32, 64), 4),
    "resnet8x4": ((64, 128, 256), 4),
    "resnet32x4": ((64, 128, 256), 4),
}
STAGE_STRIDES = {8: (4, 8, 8, 8), 4: (1, 2, 4)}
HEADS_WITH_AUX = ("deeplabv3", "pspnet", "fcn")
EXPECTED = sorted([f"{h}_{b}" for h in HEADS_WITH_AUX for b in BACKBONES]
                  + ["lraspp_mobilenetv2"])


def _split(name: str) -> Tuple[str, str]:
    head, backbone = name.split("_", 1)
    return head, backbone


#: Input side for every model: small inputs keep the file fast, and the stride-8 torchvision
#: backbones still end on a 4x4 map, where each stage's stride shows.
SIDE = 32


def _first_conv_key(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registered_segmentation_models() -> None:
    names = sorted(n for n in MODELS if MODELS.get(n).task == SEGMENTATION)
    assert names == EXPECTED
    for name in names:
        entry = MODELS.get(name)
        assert entry.family == f"seg_{_split(name)[0]}"
        assert entry.default_lr == 0.01
        assert entry.input_size == (64 if BACKBONES[_split(name)[1]][1] == 4 else 512)


@pytest.mark.parametrize("name", EXPECTED)
def test_shapes_aux_and_output_stride(name: str) -> None:
    head, backbone = _split(name)
    channels, stride = BACKBONES[backbone]
    side = SIDE
    model = build_model(name, NUM_CLASSES).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model(x), feats.logits)
    assert feats.logits.shape == (2, NUM_CLASSES, side, side)
    if head in HEADS_WITH_AUX:
        assert feats.aux is not None and feats.aux.shape == (2, NUM_CLASSES, side, side)
    else:
        assert feats.aux is None
    expected = tuple((c, side // s, side // s) for c, s in zip(channels, STAGE_STRIDES[stride]))
    assert tuple(tuple(s.shape[1:]) for s in feats.stages) == expected
    assert feats.stages[-1].shape[-1] == side // stride  # output stride
    assert [p.shape for p in feats.preact] == [s.shape for s in feats.stages]
    assert feats.embedding.shape == (2, channels[-1])
    assert torch.allclose(feats.embedding, feats.stages[-1].mean((2, 3)), atol=1e-5)
    assert feats.stem is not None
    taps = probe_taps(model, (3, side, side))
    assert taps.stages == expected and taps.dense and taps.num_classes == NUM_CLASSES
    assert not model.training  # probe_taps restores the mode


@pytest.mark.parametrize("name", EXPECTED)
def test_label_assisted_input_widens_only_the_first_conv(name: str) -> None:
    torch.manual_seed(1)
    rgb = build_model(name, NUM_CLASSES).state_dict()
    torch.manual_seed(1)
    model = build_model(name, NUM_CLASSES, in_channels=4)
    widened = model.state_dict()
    key = _first_conv_key(model)
    assert list(widened) == list(rgb)
    assert [k for k in rgb if widened[k].shape != rgb[k].shape] == [key]
    assert widened[key].shape[1] == 4
    assert torch.equal(widened[key][:, :3], rgb[key])  # the RGB slice is initialised as usual
    assert 0.05 < widened[key][:, 3].std().item() < 0.15  # the label slice: randn * 0.1
    side = SIDE
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 4, side, side))
    assert logits.shape == (2, NUM_CLASSES, side, side)


@pytest.mark.parametrize("name", EXPECTED)
def test_gradients_reach_every_parameter(name: str) -> None:
    side = SIDE
    model = build_model(name, NUM_CLASSES).train()
    target = torch.randint(0, NUM_CLASSES, (2, side, side))
    target[:, : side // 4] = IGNORE_INDEX
    feats = model.forward_features(torch.randn(2, 3, side, side))
    loss = F.cross_entropy(feats.logits, target, ignore_index=IGNORE_INDEX)
    if feats.aux is not None:
        loss = loss + 0.4 * F.cross_entropy(feats.aux, target, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_classification_model_rejects_extra_input_channels() -> None:
    with pytest.raises(ConfigError, match="3 input channels"):
        build_model("resnet18", NUM_CLASSES, field="study.teacher", in_channels=4)


def test_fewer_than_three_input_channels_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        build_model("fcn_resnet8", NUM_CLASSES, in_channels=1)


def test_dilate_matches_torchvision_replace_stride_with_dilation() -> None:
    net = tvm.resnet50(weights=None)
    dilate(net.layer3, dilation=2, previous=1)
    dilate(net.layer4, dilation=4, previous=2)
    reference = tvm.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    ref_convs = {n: m for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    for n, conv in convs:
        ref = ref_convs[n]
        assert (conv.stride, conv.dilation, conv.padding) == (
            ref.stride, ref.dilation, ref.padding), n


def test_deeplabv3_resnet50_matches_torchvision() -> None:
    reference = tvseg.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                         num_classes=NUM_CLASSES, aux_loss=True).eval()
    model = build_model("deeplabv3_resnet50", NUM_CLASSES).eval()
    renames = {"classifier.": "head.", "aux_classifier.": "aux_head."}
    state = {}
    for key, value in reference.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        state[key if prefix is None else renames[prefix] + key[len(prefix):]] = value
    model.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        feats = model.forward_features(x)
    assert torch.allclose(feats.logits, expected["out"], atol=1e-5)
    assert torch.allclose(feats.aux, expected["aux"], atol=1e-5)
