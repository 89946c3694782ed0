"""``cityscapes``: Cityscapes fine annotations (19 train classes) from a local folder. Never
downloads.

Layout (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked side by side)::

    cityscapes/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png

``root`` may be the ``cityscapes`` folder (holding ``leftImg8bit``) or its parent. Label maps
are ``*_gtFine_labelTrainIds.png`` where that file exists (written by cityscapesScripts'
``createTrainIdLabelImgs``; used as is), else ``*_gtFine_labelIds.png``, whose 34 label ids
are mapped to the 19 train ids by :data:`LABEL_TO_TRAIN` (every other id -> 255).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import numpy as np
import torch

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import IGNORE_INDEX, SEGMENTATION
from kdflow.orchestrator.data.checks import require_int
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.scan import DataFile
from kdflow.orchestrator.data.seg_loaders import (FileSource, Subset, pair_files, read_index_png,
                                                  seg_data)
from kdflow.orchestrator.data.seg_transforms import Normalise, validate_scale

CITYSCAPES_CLASSES = 19
#: The label ids (cityscapesScripts' ``labels.py``) of the 19 train classes, in train-id order:
#: road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,
#: terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle.
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: label id -> train id, 255 for the ids evaluated in no class (void, ground, caravan...).
LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_TO_TRAIN[list(TRAIN_LABEL_IDS)] = np.arange(CITYSCAPES_CLASSES, dtype=np.uint8)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"

_LAYOUT = ("point root at Cityscapes in its standard layout: "
           "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
           "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png (root may also be the "
           "folder holding cityscapes/); kdflow never downloads: unpack "
           "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip there")


def read_cityscapes_mask(path: str) -> np.ndarray:
    """(H, W) uint8 train ids of a gtFine label map: labelTrainIds as is, labelIds mapped."""
    mask = read_index_png(path)
    return mask if path.endswith(TRAIN_IDS_SUFFIX) else LABEL_TO_TRAIN[mask]


@dataclass
class CityscapesConfig(TrainFraction):
    """Settings of ``cityscapes``.

    root:        folder of the dataset (see the module docstring for the accepted layouts).
    train_split, val_split: split folders under leftImg8bit/ and gtFine/.
    crop_height, crop_width: size of the training crops (what models are probed with).
    scale_min, scale_max: range of the training random scale.
    workers:     DataLoader processes decoding the files; 0 decodes in the main process.
    """

    task: ClassVar[str] = SEGMENTATION

    root: str = "./data"
    train_split: str = "train"
    val_split: str = "val"
    crop_height: int = 512
    crop_width: int = 1024
    scale_min: float = 0.5
    scale_max: float = 2.0
    workers: int = 2

    def crop(self) -> Tuple[int, int]:
        """(height, width) of a training crop."""
        return (self.crop_height, self.crop_width)

    def input_shape(self) -> tuple[int, int, int]:
        """(3, crop_height, crop_width): the training crop."""
        return (3, *self.crop())

    def class_count(self) -> int:
        return CITYSCAPES_CLASSES

    def validate(self) -> None:
        self.validate_fraction()
        require_int("crop_height", self.crop_height, 1)
        require_int("crop_width", self.crop_width, 1)
        validate_scale(self.scale_min, self.scale_max)
        require_int("workers", self.workers, 0)
        for name in ("train_split", "val_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(name, f"must be a non-empty name, got {value!r}")

    def folder(self) -> Optional[str]:
        """The folder holding ``leftImg8bit`` (root or root/cityscapes), or None."""
        if not isinstance(self.root, (str, os.PathLike)):
            return None
        for path in (self.root, os.path.join(self.root, "cityscapes")):
            if os.path.isdir(os.path.join(path, "leftImg8bit")):
                return path
        return None

    def pairs(self, split: str) -> List[Tuple[str, str]]:
        """(image, label map) paths of split ``split``, sorted by city and file name; raises
        ConfigError when a folder or an image's label map is missing (listings only)."""
        folder = self.folder()
        if folder is None:
            shown = os.path.abspath(self.root) if isinstance(self.root, (str, os.PathLike)) \
                else repr(self.root)
            raise ConfigError("root", f"no Cityscapes under {shown} (no leftImg8bit folder in "
                              "it or in cityscapes/)", fix=_LAYOUT)
        field = "train_split" if split == self.train_split else "val_split"
        images = os.path.join(folder, "leftImg8bit", split)
        labels = os.path.join(folder, "gtFine", split)
        for path in (images, labels):
            if not os.path.isdir(path):
                raise ConfigError(field, f"folder {os.path.abspath(path)} does not exist",
                                  fix=f"set {field} to a split present in both leftImg8bit/ and "
                                      f"gtFine/ (train, val), or {_LAYOUT}")
        pairs = []
        for city in sorted(e.name for e in os.scandir(images) if e.is_dir()):
            names = sorted(n for n in os.listdir(os.path.join(images, city))
                           if n.endswith(IMAGE_SUFFIX))
            have = set(os.listdir(os.path.join(labels, city))) \
                if os.path.isdir(os.path.join(labels, city)) else set()
            for name in names:
                stem = name[:-len(IMAGE_SUFFIX)]
                label = next((stem + s for s in (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX)
                              if stem + s in have), None)
                if label is None:
                    raise ConfigError("root", f"{os.path.abspath(os.path.join(images, city, name))}"
                                      f" has no label map {stem}{LABEL_IDS_SUFFIX} in "
                                      f"{os.path.abspath(os.path.join(labels, city))}",
                                      fix=_LAYOUT)
                pairs.append((os.path.join(images, city, name),
                              os.path.join(labels, city, label)))
        if not pairs:
            raise ConfigError(field, f"folder {os.path.abspath(images)} holds no "
                              f"<city>/*{IMAGE_SUFFIX} images", fix=_LAYOUT)
        return pairs

    def check_data(self) -> None:
        """Both splits have images, each with its label map (listings only)."""
        self.pairs(self.train_split)
        self.pairs(self.val_split)

    def data_files(self) -> List[DataFile]:
        """Every image and label map of both splits (once each), decoded as training
        decodes them."""
        return pair_files([*self.pairs(self.train_split), *self.pairs(self.val_split)],
                          read_cityscapes_mask)


@register_dataset("cityscapes", CityscapesConfig)
def build_cityscapes(cfg: CityscapesConfig, batch_size: int, seed: int, device: torch.device,
                     channels_last: bool) -> Data:
    """Train: random scale, crop, flip (:mod:`~orchestrator.data.seg_transforms`); val: whole
    images; ImageNet statistics; PNGs decoded with PIL by ``workers`` processes."""
    train = FileSource(cfg.pairs(cfg.train_split), read_cityscapes_mask)
    keep = cfg.train_indices(torch.full((len(train),), -1, dtype=torch.int64))
    return seg_data(Subset(train, keep.tolist()),
                    FileSource(cfg.pairs(cfg.val_split), read_cityscapes_mask),
                    CITYSCAPES_CLASSES, Normalise(IMAGENET_MEAN, IMAGENET_STD), cfg.crop(),
                    (cfg.scale_min, cfg.scale_max), batch_size, seed, device, cfg.workers,
                    channels_last)
