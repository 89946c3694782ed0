"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.checks import require_bool, require_int
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.tensor_loaders import tensor_data


@dataclass
class DigitsConfig(TrainFraction):
    """Settings of the ``digits`` dataset.

    image_size:   side in pixels the 8x8 images are bilinearly upsampled to.
    val_fraction: fraction of the images held out (stratified by class) for validation.
    split_seed:   seed of the train/val split (independent of the run's seed).
    pad:          zero padding in pixels before the random crop back to ``image_size``.
    hflip:        random horizontal flips (off: digits are not flip-invariant).
    """

    image_size: int = 16
    val_fraction: float = 0.2
    split_seed: int = 0
    pad: int = 2
    hflip: bool = False

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (3, self.image_size, self.image_size)

    def class_count(self) -> int:
        return 10

    def validate(self) -> None:
        self.validate_fraction()
        require_int("image_size", self.image_size, 8)
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be between 0 and 1, got {self.val_fraction!r}",
                              fix="set val_fraction to e.g. 0.2")
        require_int("split_seed", self.split_seed, 0)
        require_int("pad", self.pad, 0)
        require_bool("hflip", self.hflip)


def load_digit_splits(cfg: DigitsConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    """(train_x, train_y, val_x, val_y): x (N, 3, S, S) float32 in [0, 1], y (N,) int64.

    The split is stratified and fixed by ``cfg.split_seed``; S is ``cfg.image_size``.
    """
    digits = load_digits()
    train_idx, val_idx = train_test_split(
        range(len(digits.target)), test_size=cfg.val_fraction, random_state=cfg.split_seed,
        stratify=digits.target)
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                           align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


@register_dataset("digits", DigitsConfig)
def build_digits(cfg: DigitsConfig, batch_size: int, seed: int, device: torch.device,
                 channels_last: bool) -> Data:
    """Digits normalised with the train split's mean/std; held on ``device`` (it is tiny)."""
    train_x, train_y, val_x, val_y = load_digit_splits(cfg)
    mean, std = train_x.mean().item(), train_x.std().item()
    keep = cfg.train_indices(train_y)
    return tensor_data(train_x[keep], train_y[keep], val_x, val_y, 10, [mean] * 3, [std] * 3, batch_size,
                       seed, device, cfg.pad, cfg.hflip, resident=True,
                       channels_last=channels_last)
