"""Model zoo: parameter counts against the published figures, tap shapes, gradients, registry."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from kdflow.methods.errors import ConfigError
from kdflow.methods.models import MODELS, build_model, count_parameters
from kdflow.methods.tasks import CLASSIFICATION

# Millions of parameters at 100 classes, as published by CRD / RepDistiller, except where noted.
PUBLISHED_PARAMS_M: Dict[str, float] = {
    "resnet8": 0.08,
    # Recalled as 0.17; RepDistiller's resnet14 (n = 2, widths 16/16/32/64) has 181,108.
    "resnet14": 0.18,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_1": 0.18,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    # Recalled as 9.23 (unsure); RepDistiller's vgg11_bn (cfg A) has 9,277,284.
    "vgg11": 9.28,
    "vgg13": 9.46,
    "vgg16": 14.77,
    "vgg19": 20.09,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
    # RepDistiller / mdistiller ResNet50 (models/resnetv2.py): 23,705,252.
    "ResNet50": 23.71,
    # HSAKD's mobilenetV2: mobile_half's layers with a stride-1 stem, 812,836.
    "MobileNetV2_hsakd": 0.81,
}

# name -> (stage channels, stage sides at the native input size, embedding dim); methods.md 1.4.
EXPECTED_TAPS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], int]] = {
    **{f"resnet{d}": ((16, 32, 64), (32, 16, 8), 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ((64, 128, 256), (32, 16, 8), 256),
    "resnet32x4": ((64, 128, 256), (32, 16, 8), 256),
    "wrn_16_1": ((16, 32, 64), (32, 16, 8), 64),
    "wrn_40_1": ((16, 32, 64), (32, 16, 8), 64),
    "wrn_16_2": ((32, 64, 128), (32, 16, 8), 128),
    "wrn_40_2": ((32, 64, 128), (32, 16, 8), 128),
    **{f"vgg{d}": ((64, 128, 256, 512, 512), (32, 16, 8, 4, 4), 512)
       for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ((12, 16, 48, 160), (16, 8, 4, 2), 1280),
    "MobileNetV2_hsakd": ((12, 16, 48, 160), (32, 16, 8, 4), 1280),
    "ResNet50": ((256, 512, 1024, 2048), (32, 16, 8, 4), 2048),
    "ShuffleV1": ((240, 480, 960), (16, 8, 4), 960),
    "ShuffleV2": ((116, 232, 464), (16, 8, 4), 1024),
    "resnet18": ((64, 128, 256, 512), (56, 28, 14, 7), 512),
    "resnet34": ((64, 128, 256, 512), (56, 28, 14, 7), 512),
    "resnet50": ((256, 512, 1024, 2048), (56, 28, 14, 7), 2048),
    "mobilenet_v2": ((24, 32, 96, 320), (56, 28, 14, 7), 1280),
}

CIFAR_MODELS = sorted(PUBLISHED_PARAMS_M)
# the classifiers of the zoo (segmentation models: test_segmentation_models.py)
CLASSIFIERS = sorted(n for n in MODELS if MODELS.get(n).task == CLASSIFICATION)
NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_every_registered_model_has_expected_taps() -> None:
    assert CLASSIFIERS == sorted(EXPECTED_TAPS)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_parameter_count_matches_published(name: str) -> None:
    published = PUBLISHED_PARAMS_M[name] * 1e6
    measured = count_parameters(build_model(name, 100))
    assert abs(measured - published) <= max(0.01 * published, 0.005e6), (name, measured)


@pytest.mark.parametrize("name", sorted(EXPECTED_TAPS))
def test_feature_shapes_and_logits(name: str) -> None:
    channels, sides, dim = EXPECTED_TAPS[name]
    size = MODELS.get(name).input_size
    batch = 1 if size > 32 else 2
    model = build_model(name, NUM_CLASSES).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.logits.shape == (batch, NUM_CLASSES)
    assert torch.equal(logits, feats.logits)
    assert [tuple(s.shape) for s in feats.stages] == [
        (batch, c, h, h) for c, h in zip(channels, sides)]
    assert [p.shape for p in feats.preact] == [s.shape for s in feats.stages]
    for stage, pre in zip(feats.stages, feats.preact):
        assert pre is stage or torch.allclose(F.relu(pre), stage)
    assert feats.embedding.shape == (batch, dim)
    assert feats.stem is not None and feats.stem.shape[0] == batch


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_accept_16px_inputs(name: str) -> None:
    model = build_model(name, NUM_CLASSES).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 16, 16))
    _, sides, dim = EXPECTED_TAPS[name]
    assert feats.logits.shape == (2, NUM_CLASSES)
    assert [s.shape[-1] for s in feats.stages] == [h // 2 for h in sides]
    assert feats.embedding.shape == (2, dim)


@pytest.mark.parametrize("name", sorted(EXPECTED_TAPS))
def test_gradients_reach_every_parameter(name: str) -> None:
    size = 32 if MODELS.get(name).input_size == 32 else 64
    model = build_model(name, NUM_CLASSES).train()
    logits = model(torch.randn(2, 3, size, size))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


#: The ImageNet wrappers, their torchvision models, and the torchvision modules whose outputs
#: are the wrapper's feature stages (MobileNetV2: the last block of each stage).
TORCHVISION: Dict[str, Tuple[Callable[..., nn.Module], Tuple[str, ...]]] = {
    "resnet18": (tvm.resnet18, ("layer1", "layer2", "layer3", "layer4")),
    "resnet34": (tvm.resnet34, ("layer1", "layer2", "layer3", "layer4")),
    "resnet50": (tvm.resnet50, ("layer1", "layer2", "layer3", "layer4")),
    "mobilenet_v2": (tvm.mobilenet_v2, ("features.3", "features.6", "features.13",
                                        "features.17")),
}


def test_every_imagenet_model_is_compared_with_torchvision() -> None:
    assert sorted(n for n in CLASSIFIERS if MODELS.get(n).input_size == 224) == sorted(TORCHVISION)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_imagenet_models_compute_what_torchvision_does(name: str, mode: str) -> None:
    """With torchvision's weights loaded, a wrapper gives torchvision's logits and stage
    outputs bit for bit, in eval mode and in training mode (batch statistics, dropout), at
    64 px, batch 2, float32."""
    factory, stage_modules = TORCHVISION[name]
    reference = factory(weights=None, num_classes=NUM_CLASSES).train(mode == "train")
    model = build_model(name, NUM_CLASSES).train(mode == "train")
    model.load_state_dict(reference.state_dict())
    outputs: Dict[str, torch.Tensor] = {}
    modules = dict(reference.named_modules())
    for key in stage_modules:
        modules[key].register_forward_hook(
            lambda _m, _i, out, key=key: outputs.__setitem__(key, out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout mask for MobileNetV2's classifier in training
        expected = reference(x)
        torch.manual_seed(1)
        feats = model.forward_features(x)
        torch.manual_seed(1)
        logits = model(x)
    assert torch.equal(feats.logits, expected) and torch.equal(logits, expected)
    for stage, key in zip(feats.stages, stage_modules):
        assert torch.equal(stage, outputs[key]), key


def test_default_lr_and_input_size() -> None:
    small_lr = {"MobileNetV2", "MobileNetV2_hsakd", "ShuffleV1", "ShuffleV2", "mobilenet_v2"}
    for name in CLASSIFIERS:
        entry = MODELS.get(name)
        assert entry.default_lr == (0.01 if name in small_lr else 0.05), name
        assert entry.input_size == (224 if name in {"resnet18", "resnet34", "resnet50",
                                                    "mobilenet_v2"} else 32), name


def test_unknown_model_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="resnet9"):
        build_model("resnet9", 10, field="study.student")
