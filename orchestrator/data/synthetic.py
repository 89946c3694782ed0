"""Generated images for tests: each class a smooth random template plus pixel noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdflow.orchestrator.data.checks import require_int
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loaders import Data, generator
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.tensor_loaders import tensor_data

#: Side of the coarse grid each class template is upsampled from (sets its frequency).
TEMPLATE_GRID = 4
#: Standard deviation of the per-pixel noise, relative to the templates' unit scale.
NOISE_STD = 0.5


@dataclass
class SyntheticConfig(TrainFraction):
    """Settings of the ``synthetic`` dataset (no files; fully determined by ``seed``).

    num_classes, num_train, num_val: class count and split sizes (balanced classes).
    image_size, channels: shape (channels, image_size, image_size) of one image.
    seed: seed of the templates, labels and noise (independent of the run's seed).
    """

    num_classes: int = 4
    num_train: int = 256
    num_val: int = 128
    image_size: int = 16
    channels: int = 3
    seed: int = 0

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.image_size, self.image_size)

    def class_count(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        self.validate_fraction()
        require_int("num_classes", self.num_classes, 2)
        require_int("num_train", self.num_train, 1)
        require_int("num_val", self.num_val, 1)
        require_int("image_size", self.image_size, TEMPLATE_GRID)
        require_int("channels", self.channels, 1)
        require_int("seed", self.seed, 0)


def make_synthetic(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    """(train_x, train_y, val_x, val_y): x (N, C, S, S) float32, y (N,) int64 balanced classes."""
    gen = generator(cfg.seed)
    coarse = torch.randn(cfg.num_classes, cfg.channels, TEMPLATE_GRID, TEMPLATE_GRID,
                         generator=gen)
    templates = F.interpolate(coarse, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                              align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % cfg.num_classes)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
        return templates[labels] + NOISE_STD * noise, labels

    train_x, train_y = split(cfg.num_train)
    val_x, val_y = split(cfg.num_val)
    return train_x, train_y, val_x, val_y


@register_dataset("synthetic", SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig, batch_size: int, seed: int,
                    device: torch.device, channels_last: bool) -> Data:
    """Synthetic splits normalised with the train split's per-channel mean/std; no augmentation."""
    train_x, train_y, val_x, val_y = make_synthetic(cfg)
    mean = train_x.mean(dim=(0, 2, 3)).tolist()
    std = train_x.std(dim=(0, 2, 3)).tolist()
    keep = cfg.train_indices(train_y)
    return tensor_data(train_x[keep], train_y[keep], val_x, val_y, cfg.num_classes, mean, std, batch_size,
                       seed, device, pad=0, hflip=False, resident=True,
                       channels_last=channels_last)
