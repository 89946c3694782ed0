"""Joint image/mask transforms of the segmentation datasets (the CIRKD/LAD training recipe).

Training: a random scale ``f`` in ``[scale_min, scale_max]`` (image bilinear with
antialiasing, mask ``nearest-exact``: the mask's pixel is always one of those the image's
bilinear sample is drawn from), a random crop of the crop size, padded at the bottom/right
where the scaled image is smaller than the crop, and a random horizontal flip. Image and
mask always get the same geometry. Padding is the dataset's mean pixel, i.e. 0 after
normalisation (images are normalised before they are padded), and 255 (ignore) in the mask.

Every random number of one sample comes from ``generator(seed, epoch, index)``: a sample's
augmentation does not depend on its batch, rank or world size, and a resume is exact. The
draws, in order: ``f`` (one ``torch.rand``), the crop's top then left offset (``randint``
each), the flip (one ``torch.rand`` < 0.5). Only the crop's window of the mask is resized
(by index, exactly as ``nearest-exact`` would).

Evaluation: no augmentation; :func:`pad_collate` pads the images of a batch to its largest
height and width (0 / 255), so mIoU counts each image's own pixels only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import IGNORE_INDEX


def validate_scale(scale_min: object, scale_max: object) -> None:
    """Raise ConfigError unless ``0 < scale_min <= scale_max`` (numbers, not bools)."""
    for name, value in (("scale_min", scale_min), ("scale_max", scale_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(name, f"must be a number > 0, got {value!r}",
                              fix=f"set {name} to a scale factor such as 0.5 or 2.0")
    if scale_min > scale_max:  # type: ignore[operator]
        raise ConfigError("scale_max", f"is {scale_max}, below scale_min {scale_min}",
                          fix="set scale_min <= scale_max (equal values give a fixed scale)")


class Normalise:
    """``(image - mean) / std`` per channel; uint8 images are first scaled to [0, 1].

    mean, std: per-channel statistics of the [0, 1] images; None leaves float images as they
    are (images already stored normalised, as the in-memory synthetic set does).
    """

    def __init__(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def into(self, out: torch.Tensor, image: torch.Tensor) -> None:
        """Write ``image`` ((C, h, w) uint8 or float) normalised into ``out`` ((C, h, w)
        float32, possibly a view)."""
        out.copy_(image)
        unit = 255.0 if image.dtype == torch.uint8 else 1.0
        if self.mean is not None:
            out.sub_(self.mean * unit).div_(self.std * unit)
        elif unit != 1.0:
            out.div_(unit)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: (C, H, W) uint8 or float -> (C, H, W) float32 normalised."""
        out = torch.empty(image.shape, dtype=torch.float32)
        self.into(out, image)
        return out


def _nearest(size: int, scaled: int, start: int, stop: int) -> torch.Tensor:
    """Source pixels of the scaled pixels ``start..stop-1`` when ``size`` pixels are resized to
    ``scaled`` (``nearest-exact``: each pixel centre maps to the source pixel it falls in)."""
    centres = (torch.arange(start, stop, dtype=torch.float64) + 0.5) * (size / scaled)
    return centres.floor().long().clamp_(max=size - 1)


def train_transform(image: torch.Tensor, mask: torch.Tensor, crop: Tuple[int, int],
                    scale: Tuple[float, float], gen: torch.Generator,
                    normalise: Normalise) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random scale, crop (padded to ``crop``) and flip of one sample.

    image: (3, H, W) uint8 or float (resized in its own dtype); mask: (H, W) uint8 label map.
    crop: (height, width) of the output; scale: (min, max) of the scale factor; gen: the
    sample's CPU generator. Returns ``(image (3, ch, cw) float32 normalised, mask (ch, cw)
    uint8)``. Only the part of the scaled image (and mask) the crop covers is normalised
    (resized).
    """
    _, h, w = image.shape
    ch, cw = crop
    lo, hi = scale
    f = lo + (hi - lo) * torch.rand((), generator=gen).item()
    sh, sw = max(1, round(h * f)), max(1, round(w * f))
    # Crop from the image padded (bottom/right) to at least the crop: the window's rows
    # [top, top + ch) are scaled rows [top, min(top + ch, sh)) followed by padding.
    top = int(torch.randint(0, max(sh, ch) - ch + 1, (), generator=gen))
    left = int(torch.randint(0, max(sw, cw) - cw + 1, (), generator=gen))
    flip = torch.rand((), generator=gen).item() < 0.5
    vh, vw = min(sh, top + ch) - top, min(sw, left + cw) - left
    if (sh, sw) != (h, w):
        image = F.interpolate(image[None], size=(sh, sw), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    rows, cols = _nearest(h, sh, top, top + vh), _nearest(w, sw, left, left + vw)
    valid_image = image[:, top:top + vh, left:left + vw]
    valid_mask = mask.index_select(0, rows).index_select(1, cols)
    # The flip mirrors the padded crop: the valid part moves to the right.
    place = slice(cw - vw, cw) if flip else slice(0, vw)
    if flip:
        valid_image, valid_mask = valid_image.flip(-1), valid_mask.flip(-1)
    out = torch.zeros(3, ch, cw, dtype=torch.float32)
    out_mask = torch.full((ch, cw), IGNORE_INDEX, dtype=torch.uint8)
    normalise.into(out[:, :vh, place], valid_image)
    out_mask[:vh, place] = valid_mask
    return out, out_mask


def pad_collate(samples: Sequence[Tuple[torch.Tensor, torch.Tensor, int]],
                empty: Tuple[int, int] = (0, 0)
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ``(image (3, h, w) float, mask (h, w) uint8, index)`` samples into
    ``(x (B, 3, H, W), y (B, H, W) uint8, index (B,) int64)``, padding each sample at the
    bottom/right to the batch's largest H and W (images with 0, masks with 255).

    No samples (a rank's share of a batch smaller than the world) give B = 0 batches of
    H, W = ``empty``."""
    if not samples:
        return (torch.zeros(0, 3, *empty), torch.zeros(0, *empty, dtype=torch.uint8),
                torch.zeros(0, dtype=torch.int64))
    index = torch.tensor([int(s[2]) for s in samples], dtype=torch.int64)
    if len({tuple(s[0].shape) for s in samples}) == 1:
        return (torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]),
                index)
    height = max(int(s[0].shape[1]) for s in samples)
    width = max(int(s[0].shape[2]) for s in samples)
    x = torch.zeros(len(samples), samples[0][0].shape[0], height, width, dtype=torch.float32)
    y = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=torch.uint8)
    for row, (image, mask, _) in enumerate(samples):
        x[row, :, :image.shape[1], :image.shape[2]] = image
        y[row, :mask.shape[0], :mask.shape[1]] = mask
    return x, y, index
