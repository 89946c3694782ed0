"""``voc``: Pascal VOC 2012 segmentation (21 classes) from a local folder. Never downloads.

Layout (the one the VOCtrainval tar unpacks to)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG: class indices, 255 = void
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   one <id> per line

``root`` may be the folder holding ``VOCdevkit``, the ``VOCdevkit`` folder itself (holding
``VOC2012``) or the ``VOC2012`` folder; the first of ``root/VOCdevkit/VOC2012``,
``root/VOC2012`` and ``root`` that has ``JPEGImages`` is used. The SBD-augmented training set
("trainaug") works too: its id list as ``ImageSets/Segmentation/trainaug.txt``, its index
PNGs in a folder named by ``mask_dir`` (e.g. ``SegmentationClassAug``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import SEGMENTATION
from kdflow.orchestrator.data.checks import require_folder, require_int
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.registry import register_dataset
from kdflow.orchestrator.data.scan import DataFile
from kdflow.orchestrator.data.seg_loaders import (FileSource, Subset, pair_files, read_index_png,
                                                  seg_data)
from kdflow.orchestrator.data.seg_transforms import Normalise, validate_scale

VOC_CLASSES = 21
#: Where kdflow looks for the VOC2012 folder, relative to ``root``, in order.
VOC_CANDIDATES = (os.path.join("VOCdevkit", "VOC2012"), "VOC2012", "")

_LAYOUT = ("point root at Pascal VOC 2012 in its standard layout: "
           "<root>/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
           "ImageSets/Segmentation/{train,val}.txt} (root may also be the VOCdevkit or the "
           "VOC2012 folder); kdflow never downloads: unpack VOCtrainval_11-May-2012.tar there")


@dataclass
class VOCConfig(TrainFraction):
    """Settings of ``voc``.

    root:        folder of the dataset (see the module docstring for the accepted layouts).
    train_split, val_split: id lists ``ImageSets/Segmentation/<name>.txt`` of the splits.
    mask_dir:    folder (next to JPEGImages) of the index PNGs.
    crop_size:   side of the square training crops (what models are probed with).
    scale_min, scale_max: range of the training random scale.
    workers:     DataLoader processes decoding the files; 0 decodes in the main process.
    """

    task: ClassVar[str] = SEGMENTATION

    root: str = "./data"
    train_split: str = "train"
    val_split: str = "val"
    mask_dir: str = "SegmentationClass"
    crop_size: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    workers: int = 2

    def crop(self) -> Tuple[int, int]:
        """(height, width) of a training crop."""
        return (self.crop_size, self.crop_size)

    def input_shape(self) -> tuple[int, int, int]:
        """(3, crop, crop): the training crop."""
        return (3, *self.crop())

    def class_count(self) -> int:
        return VOC_CLASSES

    def validate(self) -> None:
        self.validate_fraction()
        require_int("crop_size", self.crop_size, 1)
        validate_scale(self.scale_min, self.scale_max)
        require_int("workers", self.workers, 0)
        for name in ("train_split", "val_split", "mask_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(name, f"must be a non-empty name, got {value!r}")

    def folder(self) -> Optional[str]:
        """The VOC2012 folder (the one holding JPEGImages), or None when there is none."""
        if not isinstance(self.root, (str, os.PathLike)):
            return None
        for sub in VOC_CANDIDATES:
            path = os.path.join(self.root, sub)
            if os.path.isdir(os.path.join(path, "JPEGImages")):
                return path
        return None

    def pairs(self, split: str) -> List[Tuple[str, str]]:
        """(image, mask) paths of the ids in split ``split``'s list, in list order; raises
        ConfigError when the list, the folders or any listed file is missing (listings only)."""
        folder = self.folder()
        if folder is None:
            require_folder("root", self.root, _LAYOUT)
            raise ConfigError("root", f"no Pascal VOC 2012 under {os.path.abspath(self.root)} "
                              "(no JPEGImages folder in it, in VOC2012/ or in "
                              "VOCdevkit/VOC2012/)", fix=_LAYOUT)
        field = "train_split" if split == self.train_split else "val_split"
        listing = os.path.join(folder, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            raise ConfigError(field, f"the split list {os.path.abspath(listing)} does not exist",
                              fix="set it to a list in ImageSets/Segmentation/ (train, val, "
                                  f"trainval), or {_LAYOUT}")
        with open(listing) as fh:
            ids = [line.split()[0] for line in fh if line.strip()]
        if not ids:
            raise ConfigError(field, f"the split list {os.path.abspath(listing)} is empty",
                              fix=_LAYOUT)
        images, masks = os.path.join(folder, "JPEGImages"), os.path.join(folder, self.mask_dir)
        require_folder("mask_dir", masks, f"set mask_dir to the folder of index PNGs next to "
                                          f"JPEGImages (SegmentationClass), or {_LAYOUT}")
        have_images, have_masks = set(os.listdir(images)), set(os.listdir(masks))
        for name in ids:
            for have, where, path, field_name in ((have_images, images, f"{name}.jpg", "root"),
                                                  (have_masks, masks, f"{name}.png", "mask_dir")):
                if path not in have:
                    raise ConfigError(field_name, f"{split}.txt lists {name!r} but "
                                      f"{os.path.abspath(os.path.join(where, path))} does not "
                                      "exist", fix=_LAYOUT)
        return [(os.path.join(images, f"{name}.jpg"), os.path.join(masks, f"{name}.png"))
                for name in ids]

    def check_data(self) -> None:
        """Both split lists exist and every listed image and mask exists (listings only)."""
        self.pairs(self.train_split)
        self.pairs(self.val_split)

    def data_files(self) -> List[DataFile]:
        """Every image and mask the two split lists name (once each), decoded as training
        decodes them."""
        return pair_files([*self.pairs(self.train_split), *self.pairs(self.val_split)],
                          read_index_png)


@register_dataset("voc", VOCConfig)
def build_voc(cfg: VOCConfig, batch_size: int, seed: int, device: torch.device,
              channels_last: bool) -> Data:
    """Train: random scale, crop, flip (:mod:`~orchestrator.data.seg_transforms`); val: whole
    images; ImageNet statistics; JPEGs and PNGs decoded with PIL by ``workers`` processes."""
    train = FileSource(cfg.pairs(cfg.train_split))
    keep = cfg.train_indices(torch.full((len(train),), -1, dtype=torch.int64))
    return seg_data(Subset(train, keep.tolist()), FileSource(cfg.pairs(cfg.val_split)),
                    VOC_CLASSES, Normalise(IMAGENET_MEAN, IMAGENET_STD), cfg.crop(),
                    (cfg.scale_min, cfg.scale_max), batch_size, seed, device, cfg.workers,
                    channels_last)
