"""Model registry and the base class every zoo model derives from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from kdflow.methods.errors import ConfigError
from kdflow.methods.features import Features, TapShapes
from kdflow.methods.registry import Registry
from kdflow.methods.tasks import CLASSIFICATION


class TappedModel(nn.Module):
    """A classifier (or segmenter) whose ``forward_features`` returns a :class:`Features` record.

    ``forward(x)`` returns only the logits, so a trained student is a plain classifier.
    ``stem_is_first_stage``: the model has no stem apart from its first stage (VGG), so the
    feature lists of RepDistiller-style code start at ``stages[0]`` instead of at the stem.
    """

    stem_is_first_stage: ClassVar[bool] = False

    def forward_features(self, x: torch.Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits


@dataclass(frozen=True)
class ModelEntry:
    """How to build one named model, and the recipe facts that belong to the architecture.

    builder:    ``builder(num_classes) -> TappedModel``; segmentation models also take
                ``in_channels`` (3 for images; 4 for LAD's label-assisted teacher).
    family:     architecture family (resnet, wrn, vgg, mobilenetv2, shufflenet, imagenet_resnet...).
    default_lr: the per-student learning rate of the standard CIFAR recipe (0.01 for the
                MobileNetV2 and ShuffleNet students, 0.05 otherwise).
    input_size: the native input side in pixels (32 for the CIFAR zoo, 224 for ImageNet).
    task:       the task its logits serve (``methods.tasks``): classification or segmentation.
    """

    builder: Callable[..., TappedModel]
    family: str
    default_lr: float = 0.05
    input_size: int = 32
    task: str = CLASSIFICATION


MODELS: Registry[ModelEntry] = Registry("model", "model")


def register_model(name: str, family: str, default_lr: float = 0.05, input_size: int = 32,
                   task: str = CLASSIFICATION) -> Callable[[Callable[..., TappedModel]],
                                                           Callable[..., TappedModel]]:
    """Decorator: register ``builder(num_classes)`` under ``name``."""

    def add(builder: Callable[..., TappedModel]) -> Callable[..., TappedModel]:
        MODELS.register(name)(ModelEntry(builder, family, default_lr, input_size, task))
        return builder

    return add


def build_model(name: str, num_classes: int, field: str = "model",
                in_channels: int = 3) -> TappedModel:
    """Build the registered model ``name`` with a ``num_classes``-way classifier (or per-pixel
    head) reading ``in_channels`` input channels; only segmentation models take other than 3."""
    entry = MODELS.get(name, field)
    if in_channels == 3:
        return entry.builder(num_classes)
    if entry.task == CLASSIFICATION:
        raise ConfigError(field, f"model {name!r} reads 3 input channels, not {in_channels}",
                          fix="use a segmentation model (they take extra input channels)")
    return entry.builder(num_classes, in_channels=in_channels)


def probe_taps(model: TappedModel, input_shape: tuple[int, int, int]) -> TapShapes:
    """Tap shapes of ``model`` for inputs of shape (C, H, W), from one forward pass of 2 images."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shapes = TapShapes.of(model.forward_features(torch.zeros(2, *input_shape)),
                              stem_is_first_stage=model.stem_is_first_stage)
    model.train(was_training)
    return shapes


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
