"""HSAKD's auxiliary classifiers ``c_l`` (methods.md 3.2) and the backbone + heads pair.

Every zoo model supports HSAKD through four members:

* ``hsakd_taps``: the indices into ``Features.stages`` of the L stages that feed a branch
  (the last stage of each width: 3 for CIFAR ResNet / WRN / ShuffleNet, 4 for VGG, whose
  blocks 3 and 4 share a width, 4 for MobileNetV2 and the torchvision ResNets).
* ``hsakd_transitions()``: L - 1 of the model's own modules, the l-th taking tap l-1 to tap l.
  A module may return a ``(out, preact)`` pair; the branch keeps ``out``.
* ``hsakd_last_stage()``: a new module, the last transition with every stride set to 1 and its
  input width set to the last tap's width (the extra stage of the last branch).
* ``hsakd_pre_pool()``: the model's own module between its last stage and pooling (WRN's final
  BN + ReLU, the 1x1 convs of MobileNetV2 and ShuffleNetV2), ``nn.Identity()`` when none.

As in the official ``Auxiliary_Classifier`` modules, branch l < L holds copies of the remaining
transitions (so it reaches the last stage's resolution and width) and branch L holds the
stride-1 last stage; each then applies a copy of the pre-pool module, global average pooling and
``Linear(width, num_transforms * num_classes)``. Every copy is re-initialised, so no weight is
shared with the backbone.
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel
from kdflow.methods.models.layers import init_kaiming


def hsakd_tap_indices(stage_channels: Sequence[int]) -> Tuple[int, ...]:
    """Indices of the stages HSAKD taps: the last stage of each run of equal widths.

    stage_channels: C_i of ``Features.stages`` in depth order. Agrees with every zoo model's
    ``hsakd_taps`` (tested), so a pair can be checked from its probed :class:`TapShapes`.
    """
    last = len(stage_channels) - 1
    return tuple(i for i, c in enumerate(stage_channels)
                 if i == last or c != stage_channels[i + 1])


def classifier_width(model: nn.Module) -> int:
    """Input width of the model's classifier (its last ``nn.Linear``), the pooled width D."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1].in_features


def reinitialise(module: nn.Module) -> None:
    """In place: fresh parameters and BN statistics, trainable, no gradients; then kaiming-normal
    (fan_out) convs, BatchNorm 1 / 0 and zero Linear biases (``layers.init_kaiming``)."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init_kaiming(module, zero_linear_bias=True)
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None


class AuxBranch(nn.Module):
    """One auxiliary classifier: (B, C_l, H_l, W_l) tap -> (B, outputs) logits.

    ``body`` runs in order (a ``(out, preact)`` result keeps ``out``), then global average
    pooling to (B, width) and ``fc``.
    """

    def __init__(self, body: Sequence[nn.Module], width: int, outputs: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.fc = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.body:
            x = module(x)
            if isinstance(x, tuple):
                x = x[0]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class AuxiliaryHeads(nn.Module):
    """The L auxiliary classifiers of ``model`` (a zoo model with the HSAKD members above).

    num_classes: N; each branch predicts ``num_transforms * N`` joint labels.
    detach: detach the taps, so the heads train without touching the backbone (the teacher's
    ``grad=False`` in the official code); False lets the heads' gradients reach the backbone.
    """

    def __init__(self, model: nn.Module, num_classes: int, num_transforms: int = 4,
                 detach: bool = False) -> None:
        super().__init__()
        self.taps: Tuple[int, ...] = tuple(model.hsakd_taps)
        transitions = model.hsakd_transitions()
        if len(transitions) != len(self.taps) - 1:
            raise ValueError(f"{type(model).__name__} gives {len(transitions)} HSAKD "
                             f"transitions for {len(self.taps)} taps")
        width = classifier_width(model)
        pre_pool = model.hsakd_pre_pool()
        branches = []
        for i in range(len(self.taps)):
            later = transitions[i:] if i < len(transitions) else [model.hsakd_last_stage()]
            body = [copy.deepcopy(m) for m in later] + [copy.deepcopy(pre_pool)]
            branch = AuxBranch(body, width, num_transforms * num_classes)
            reinitialise(branch)
            branches.append(branch.train())
        self.branches = nn.ModuleList(branches)
        self.detach = detach

    def forward(self, stages: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """stages: the backbone's ``Features.stages``; returns L (B, num_transforms * N) logits."""
        taps = [stages[i] for i in self.taps]
        if self.detach:
            taps = [t.detach() for t in taps]
        return [branch(t) for branch, t in zip(self.branches, taps)]


class HSAKDNet(TappedModel):
    """A zoo model (``backbone``) and its :class:`AuxiliaryHeads` (``heads``).

    ``forward_features`` / ``forward`` are the backbone's, so the pair evaluates as the plain
    classifier; :meth:`forward_with_aux` adds the auxiliary logits.
    """

    def __init__(self, backbone: TappedModel, heads: AuxiliaryHeads) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward_features(self, x: torch.Tensor) -> Features:
        return self.backbone.forward_features(x)

    def forward_with_aux(self, x: torch.Tensor) -> Tuple[Features, List[torch.Tensor]]:
        """x: (B, C, H, W) -> (backbone Features, L auxiliary (B, 4N) logits)."""
        feats = self.backbone.forward_features(x)
        return feats, self.heads(feats.stages)
