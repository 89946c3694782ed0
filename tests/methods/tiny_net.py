"""A tiny conv net honouring the Features contract, for method unit tests (no zoo needed)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.features import Features
from kdflow.methods.models.base import TappedModel


class TinyNet(TappedModel):
    """conv+ReLU stages (no BN, so forwards are deterministic), GAP embedding, linear head.

    ``widths[i]`` channels at stride ``strides[i]`` per stage; inputs (B, in_channels, H, W).
    """

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int = 4,
                 in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=s, padding=1)
                                   for i, s in enumerate(strides))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> Features:
        stages, preact = [], []
        for conv in self.convs:
            x = conv(x)
            preact.append(x)
            x = F.relu(x)
            stages.append(x)
        emb = x.mean(dim=(2, 3))
        return Features(logits=self.fc(emb), stages=stages, preact=preact, embedding=emb)
