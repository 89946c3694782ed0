"""The feature record every model returns, so methods never index tuples or magic keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch


@dataclass
class Features:
    """What a model exposes to distillers for one batch of B images.

    logits:    (B, num_classes), unnormalised.
    stages:    one (B, C_i, H_i, W_i) map per stage, in depth order, after the stage's final
               activation (the taps FitNet, HSAKD, MSDCRD and StableKD read).
    preact:    the same stages before that final activation (same shapes as ``stages``);
               for families whose blocks end without an activation (pre-activation WRN) the
               two lists hold the same tensors.
    embedding: (B, D), the pooled vector fed to the classifier (CRD's feature).
    stem:      the stem's output map, for models that expose it.
    aux:       segmentation models with an auxiliary head: its (B, num_classes, H, W) logits at
               the input's resolution (trained with a down-weighted cross-entropy); else None.

    For segmentation models ``logits`` is (B, num_classes, H, W), upsampled to the input's H, W;
    ``stages`` are the backbone's stages and ``embedding`` their last map, average-pooled.
    """

    logits: torch.Tensor
    stages: List[torch.Tensor]
    preact: List[torch.Tensor]
    embedding: torch.Tensor
    stem: torch.Tensor | None = field(default=None)
    aux: torch.Tensor | None = field(default=None)

    def detached(self) -> "Features":
        """A copy whose tensors are ordinary (non-inference, no-grad) tensors.

        Teacher taps computed under ``torch.inference_mode`` are cloned here so they can be
        used as constants in the student's autograd graph.
        """
        def plain(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        return Features(
            logits=plain(self.logits),
            stages=[plain(s) for s in self.stages],
            preact=[plain(s) for s in self.preact],
            embedding=plain(self.embedding),
            stem=plain(self.stem),
            aux=plain(self.aux),
        )


@dataclass(frozen=True)
class TapShapes:
    """Per-sample shapes of a model's taps, from one probe forward pass.

    dense: True when the logits are per-pixel maps (segmentation), False for class vectors.
    stem: (C, H, W) of the stem's map; None when the model exposes none.
    stem_is_first_stage: the model has no stem apart from its first stage (VGG:
    ``TappedModel.stem_is_first_stage``).
    """

    num_classes: int
    stages: Tuple[Tuple[int, int, int], ...]
    embedding_dim: int
    dense: bool = False
    stem: Tuple[int, int, int] | None = None
    stem_is_first_stage: bool = False

    @staticmethod
    def of(features: Features, stem_is_first_stage: bool = False) -> "TapShapes":
        return TapShapes(
            num_classes=int(features.logits.shape[1]),
            stages=tuple(tuple(int(d) for d in s.shape[1:]) for s in features.stages),
            embedding_dim=int(features.embedding.shape[1]),
            dense=features.logits.dim() == 4,
            stem=None if features.stem is None else tuple(int(d) for d in features.stem.shape[1:]),
            stem_is_first_stage=stem_is_first_stage,
        )
