"""``synthetic_seg``: generated shapes on textured backgrounds (segmentation, no files).

Every image has 1 to :data:`MAX_SHAPES` shapes (later ones drawn over earlier ones), each of
a kind that is its class (1 disc, 2 square, 3 triangle, 4 ring, 5 cross, 6 bar; class 0 is
the background), with a random position, size and rotation, and a colour near its class's
(a hint that backgrounds and the jitter often blur, so the shape matters too). Backgrounds
are a random colour plus smooth noise and stripes of a random frequency and orientation,
and every pixel gets a little noise. Like Pascal VOC's void band, the pixels on a boundary
between two labels (a 2-pixel band) are 255 (ignore), and some images have an ignore blob
(a small disc of 255 over unchanged pixels). Everything is drawn from ``generator(seed)``,
vectorised over the split (the defaults, 640 images of 64 x 64, build in about a second).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Tuple

import torch
import torch.nn.functional as F

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import IGNORE_INDEX, SEGMENTATION
from kdflow.orchestrator.data.checks import require_int
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loaders import Data, generator
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.seg_loaders import Subset, TensorSource, seg_data
from kdflow.orchestrator.data.seg_transforms import Normalise, validate_scale

#: Shape kinds, in class order (class k + 1 is KINDS[k]).
KINDS = ("disc", "square", "triangle", "ring", "cross", "bar")
#: At most this many shapes per image.
MAX_SHAPES = 4
#: A shape's colour is its class's colour (drawn once per dataset) plus up to this much per channel.
COLOUR_JITTER = 0.3
#: Probability that an image gets an ignore blob.
BLOB_PROBABILITY = 0.3
#: Standard deviation of the per-pixel noise (images are in [0, 1] before normalising).
NOISE_STD = 0.03


@dataclass
class SyntheticSegConfig(TrainFraction):
    """Settings of ``synthetic_seg`` (no files; fully determined by ``seed``).

    num_classes: classes including the background (class 0): 2 to 7 (shape kinds 1..6).
    num_train, num_val: split sizes.
    image_size:  side of the square images (train and val).
    crop_size:   side of the square training crops (what models are probed with); 0 means
                 image_size.
    scale_min, scale_max: range of the training random scale (0.75..1.5 by default, narrower
                 than VOC's 0.5..2.0: at 64 pixels a half-size shape is only a few pixels).
    seed:        seed of the images (independent of the run's seed).
    """

    task: ClassVar[str] = SEGMENTATION

    num_classes: int = 5
    num_train: int = 512
    num_val: int = 128
    image_size: int = 64
    crop_size: int = 0
    scale_min: float = 0.75
    scale_max: float = 1.5
    seed: int = 0

    def crop(self) -> Tuple[int, int]:
        """(height, width) of a training crop."""
        side = self.crop_size or self.image_size
        return (side, side)

    def input_shape(self) -> tuple[int, int, int]:
        """(3, crop, crop): the training crop."""
        return (3, *self.crop())

    def class_count(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        self.validate_fraction()
        require_int("num_classes", self.num_classes, 2)
        if self.num_classes > 1 + len(KINDS):
            raise ConfigError("num_classes", f"is {self.num_classes}, but there are only "
                              f"{len(KINDS)} shape kinds (+ the background)",
                              fix=f"set num_classes to at most {1 + len(KINDS)}")
        require_int("num_train", self.num_train, 1)
        require_int("num_val", self.num_val, 1)
        require_int("image_size", self.image_size, 16)
        require_int("crop_size", self.crop_size, 0)
        validate_scale(self.scale_min, self.scale_max)
        require_int("seed", self.seed, 0)


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Equilateral, circumradius 1: three half-planes at distance 0.5 from the centre."""
    inside = torch.ones_like(u, dtype=torch.bool)
    for j in range(3):
        a = math.pi / 2 + j * 2 * math.pi / 3
        inside &= u * math.cos(a) + v * math.sin(a) <= 0.5
    return inside


#: Shape kind -> whether points (u, v) in the shape's coordinates (radius 1) lie inside it.
SHAPES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "disc": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.8,
    "triangle": _triangle,
    "ring": lambda u, v: ((u * u + v * v) <= 1) & ((u * u + v * v) >= 0.55 ** 2),
    "cross": lambda u, v: (torch.minimum(u.abs(), v.abs()) <= 0.3)
    & (torch.maximum(u.abs(), v.abs()) <= 1),
    "bar": lambda u, v: u * u + (v / 0.35) ** 2 <= 1,
}


def _inside(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, S, S) bool: whether (u, v) lie in shape ``kind`` ((N,) int64, 1-based into KINDS;
    0 for no shape). Each kind is evaluated on its own images only."""
    inside = torch.zeros_like(u, dtype=torch.bool)
    for j, name in enumerate(KINDS, 1):
        rows = torch.nonzero(kind == j).flatten()
        if len(rows):
            inside[rows] = SHAPES[name](u[rows], v[rows])
    return inside


def make_split(n: int, size: int, num_classes: int, palette: torch.Tensor,
               gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) float32 in [0, 1] and masks (n, size, size) uint8.

    palette: (1 + len(KINDS), 3) colour of each class's shapes (row 0 unused)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = coords[None, :, None], coords[None, None, :]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    # Background: colour + smooth noise + stripes.
    smooth = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=(size, size),
                           mode="bicubic", align_corners=False)
    angle = uniform(0, math.pi, n)[:, None, None]
    period = uniform(4, 16, n)[:, None, None]
    phase = uniform(0, 2 * math.pi, n)[:, None, None]
    stripes = torch.sin(2 * math.pi * (xs * torch.cos(angle) + ys * torch.sin(angle)) / period
                        + phase)
    image = (uniform(0.2, 0.8, n, 3)[:, :, None, None] + uniform(0, 0.12, n, 1, 1, 1) * smooth
             + uniform(0, 0.15, n, 3)[:, :, None, None] * stripes[:, None])
    label = torch.zeros(n, size, size, dtype=torch.int64)

    # Shapes: slot 0 is in every image (its kinds balanced over the split), the others in some.
    count = torch.randint(1, MAX_SHAPES + 1, (n,), generator=gen)
    kinds = num_classes - 1
    for slot in range(MAX_SHAPES):
        if slot == 0:
            kind = 1 + (torch.arange(n) % kinds)[torch.randperm(n, generator=gen)]
        else:
            kind = torch.randint(1, kinds + 1, (n,), generator=gen)
        cx, cy = uniform(0.1, 0.9, n) * size, uniform(0.1, 0.9, n) * size
        r = uniform(0.12, 0.3, n) * size
        theta = uniform(0, 2 * math.pi, n)
        dx = (xs - cx[:, None, None]) / r[:, None, None]
        dy = (ys - cy[:, None, None]) / r[:, None, None]
        cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        inside = _inside(torch.where(slot < count, kind, 0), cos * dx + sin * dy,
                         cos * dy - sin * dx)
        colour = (palette[kind] + uniform(-COLOUR_JITTER, COLOUR_JITTER, n, 3))
        colour = colour.clamp(0, 1)[:, :, None, None]
        image = torch.where(inside[:, None], colour, image)
        label = torch.where(inside, kind[:, None, None], label)
    image = (image + NOISE_STD * torch.randn(image.shape, generator=gen)).clamp_(0, 1)

    # Ignore: the band where a 3x3 neighbourhood holds two labels, and a blob in some images.
    lab = label[:, None].float()
    band = (F.max_pool2d(lab, 3, 1, 1) != -F.max_pool2d(-lab, 3, 1, 1))[:, 0]
    mask = label.to(torch.uint8)
    mask[band] = IGNORE_INDEX
    blob = torch.rand(n, generator=gen) < BLOB_PROBABILITY
    bx, by = uniform(0, 1, n) * size, uniform(0, 1, n) * size
    br = uniform(0.04, 0.1, n) * size
    in_blob = ((xs - bx[:, None, None]) ** 2 + (ys - by[:, None, None]) ** 2
               <= br[:, None, None] ** 2) & blob[:, None, None]
    mask[in_blob] = IGNORE_INDEX
    return image, mask


def make_synthetic_seg(cfg: SyntheticSegConfig
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_masks, val_images, val_masks): images (N, 3, S, S) float32 in
    [0, 1], masks (N, S, S) uint8 with 255 = ignore."""
    gen = generator(cfg.seed)
    palette = torch.cat([torch.zeros(1, 3), 0.1 + 0.8 * torch.rand(len(KINDS), 3, generator=gen)])
    train_x, train_y = make_split(cfg.num_train, cfg.image_size, cfg.num_classes, palette, gen)
    val_x, val_y = make_split(cfg.num_val, cfg.image_size, cfg.num_classes, palette, gen)
    return train_x, train_y, val_x, val_y


@register_dataset("synthetic_seg", SyntheticSegConfig)
def build_synthetic_seg(cfg: SyntheticSegConfig, batch_size: int, seed: int,
                        device: torch.device, channels_last: bool) -> Data:
    """Generated splits normalised (once, in memory) with the train split's per-channel
    mean/std; training crops by :func:`~orchestrator.data.seg_transforms.train_transform`."""
    train_x, train_y, val_x, val_y = make_synthetic_seg(cfg)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)[0]
    std = train_x.std(dim=(0, 2, 3), keepdim=True)[0]
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    keep = cfg.train_indices(torch.full((cfg.num_train,), -1, dtype=torch.int64))
    train = Subset(TensorSource(train_x, train_y), keep.tolist())
    return seg_data(train, TensorSource(val_x, val_y), cfg.num_classes, Normalise(None, None),
                    cfg.crop(), (cfg.scale_min, cfg.scale_max), batch_size, seed, device,
                    workers=0, channels_last=channels_last)
