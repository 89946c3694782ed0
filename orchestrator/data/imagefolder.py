"""An ImageNet-style tree: ``root/<train_dir>/<class>/*.jpg`` and ``root/<val_dir>/<class>/*``."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar, Dict, List, Tuple

import numpy as np
from PIL import Image

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from kdflow.methods.distillers.base import DataInfo
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.beton import ImageSettings, beton_path, read_manifest
from kdflow.orchestrator.data.checks import require_folder, require_int
from kdflow.orchestrator.data.folder_loaders import FolderEvalLoader, FolderTrainLoader, SeededSamples
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loader_choice import LoaderChoice
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.prepare import SplitSource, indexed, register_source
from kdflow.orchestrator.data.registry import register_dataset, register_loader
from kdflow.orchestrator.data.scan import DataFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Validation crops keep this share of the shorter side (ImageNet's 224 of 256).
CENTER_CROP_RATIO = 224 / 256


@dataclass
class ImageFolderConfig(TrainFraction, LoaderChoice):
    """Settings of ``imagefolder``.

    root:       folder holding the split folders.
    train_dir:  split folder (under root) of the training images, one sub-folder per class.
    val_dir:    split folder of the validation images; same class sub-folders as train_dir.
    image_size: side in pixels of the square crops fed to the network.
    num_classes: the number of classes; 0 counts the class folders (or the .beton's classes).
                Setting it lets ``--dry-run`` plan a study before the tree exists.
    loader, beton_dir, workers: see :class:`LoaderChoice` (torchvision: ``workers`` DataLoader
                processes, 0 decodes in the main process; FFCV: decoding threads).
    """

    dataset: ClassVar[str] = "imagefolder"
    omitted_at_default: ClassVar[tuple] = ("loader", "beton_dir", "num_classes")

    root: str = "./data/imagenet"
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int = 224
    num_classes: int = 0

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one network input (the crop)."""
        return (3, self.image_size, self.image_size)

    def class_count(self) -> int:
        """``num_classes``, else the class folders of the train split or the .beton's classes."""
        if self.num_classes:
            return self.num_classes
        if self.loader == "ffcv":
            manifest = read_manifest(self.betons(), "train")
            if manifest is not None:
                return len(manifest.classes)
        path = os.path.join(self.root, self.train_dir)
        if not os.path.isdir(path):
            raise ConfigError("num_classes", f"cannot count the classes: {os.path.abspath(path)} "
                              "does not exist", fix="set num_classes (e.g. 1000 for ImageNet) "
                              "or point root at the tree")
        return sum(1 for e in os.scandir(path) if e.is_dir())

    def validate(self) -> None:
        self.validate_fraction()
        self.validate_loader()
        require_int("image_size", self.image_size, 1)
        require_int("num_classes", self.num_classes, 0)

    def check_data(self) -> None:
        """Both splits exist with the same non-empty class folders (directory listings only);
        under ``loader=ffcv``, both .beton files were written completely instead."""
        if self.loader == "ffcv":
            self.check_betons()
            return
        fix = ("point root at a folder holding train_dir/<class>/*.jpg and "
               "val_dir/<class>/*.jpg (an ImageNet-style tree)")
        require_folder("root", self.root, fix)
        classes: dict[str, list[str]] = {}
        folders = ", ".join(sorted(e.name for e in os.scandir(self.root) if e.is_dir()))
        for setting, split in (("train_dir", self.train_dir), ("val_dir", self.val_dir)):
            path = os.path.join(self.root, split)
            require_folder(setting, path, f"set {setting} to the split's folder under root "
                           f"({folders or 'it has none'}), or {fix}")
            classes[split] = sorted(e.name for e in os.scandir(path) if e.is_dir())
            if not classes[split]:
                raise ConfigError("root", f"folder {os.path.abspath(path)} has no class folders",
                                  fix=fix)
            for name in classes[split]:
                if not _has_image(os.path.join(path, name)):
                    raise ConfigError("root", f"class folder {os.path.abspath(path)}/{name} "
                                      "holds no image files", fix=fix)
        if self.num_classes and len(classes[self.train_dir]) != self.num_classes:
            raise ConfigError("num_classes", f"is {self.num_classes}, but {self.train_dir!r} has "
                              f"{len(classes[self.train_dir])} class folders",
                              fix="set num_classes to the number of class folders, or to 0")
        if classes[self.train_dir] != classes[self.val_dir]:
            raise ConfigError("val_dir", f"the class folders of {self.val_dir!r} differ from "
                              f"those of {self.train_dir!r}",
                              fix="give both splits the same class sub-folders")

    def data_files(self) -> List[DataFile]:
        """Every image of both splits (the files the torchvision loader reads), each decoded
        as training decodes it; the tree is checked first."""
        replace(self, loader="torchvision").check_data()
        return [DataFile(path, default_loader) for split in (self.train_dir, self.val_dir)
                for path, _ in ImageFolder(os.path.join(self.root, split)).samples]


def _has_image(folder: str) -> bool:
    """Whether ``folder`` (searched recursively, stopping at the first hit) holds an image."""
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


@register_dataset("imagefolder", ImageFolderConfig)
def build_imagefolder(cfg: ImageFolderConfig, batch_size: int, seed: int,
                      device: torch.device, channels_last: bool) -> Data:
    """Train: RandomResizedCrop + flip; val: Resize(size*256/224) + CenterCrop; ImageNet stats."""
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(cfg.image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalise])
    val_tf = transforms.Compose([transforms.Resize(int(cfg.image_size / CENTER_CROP_RATIO)),
                                 transforms.CenterCrop(cfg.image_size), transforms.ToTensor(),
                                 normalise])
    train = ImageFolder(os.path.join(cfg.root, cfg.train_dir))
    val = ImageFolder(os.path.join(cfg.root, cfg.val_dir))
    targets = torch.tensor(train.targets, dtype=torch.int64)
    keep = cfg.train_indices(targets)
    train_samples = SeededSamples([train.samples[i] for i in keep.tolist()], train.loader,
                                  train_tf, seed)
    val_samples = SeededSamples(val.samples, val.loader, val_tf, seed)
    info = DataInfo(num_samples=len(keep), labels=targets[keep],
                    num_classes=len(train.classes),
                    input_shape=(3, cfg.image_size, cfg.image_size))
    return Data(train=FolderTrainLoader(train_samples, batch_size, cfg.workers, device,
                                        channels_last),
                val=FolderEvalLoader(val_samples, batch_size, cfg.workers, device, channels_last),
                info=info)


@register_loader("imagefolder", "ffcv")
def build_imagefolder_ffcv(cfg: ImageFolderConfig, batch_size: int, seed: int,
                           device: torch.device, channels_last: bool) -> Data:
    """The same transforms from .beton files: a random-resized crop + flip drawn per sample
    and epoch (:mod:`orchestrator.data.ffcv_ops`); val: the centre crop at the 224/256 ratio.
    (:func:`orchestrator.data.ffcv_loaders.ffcv_data` decides where batches are normalised.)"""
    from kdflow.orchestrator.data.ffcv_loaders import ffcv_data
    from kdflow.orchestrator.data.ffcv_ops import CenterCropDecoder, SeededResizedCropDecoder

    size, folder = cfg.image_size, cfg.betons()
    manifest = read_manifest(folder, "train")
    return ffcv_data(beton_path(folder, "train"), beton_path(folder, "val"),
                     lambda norm: SeededResizedCropDecoder(size, seed, flip=True, normalise=norm),
                     lambda norm: CenterCropDecoder(size, CENTER_CROP_RATIO, normalise=norm),
                     cfg.train_indices, len(manifest.classes), cfg.input_shape(), IMAGENET_MEAN,
                     IMAGENET_STD, batch_size, seed, device, cfg.workers, channels_last)


#: FFCV's ImageNet recipe: longest side 500, half the images JPEG at quality 90.
IMAGENET_BETON = ImageSettings(write_mode="proportion", max_side=500, jpeg_quality=90,
                               compress_probability=0.5)


def _read_rgb(sample: Tuple[str, int]) -> Tuple[np.ndarray, int]:
    path, label = sample
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), label


@register_source("imagefolder", IMAGENET_BETON)
def imagefolder_splits(cfg: ImageFolderConfig) -> Dict[str, SplitSource]:
    """The train and val trees, checked first (same non-empty class folders in both)."""
    replace(cfg, loader="torchvision").check_data()
    splits = {}
    for split, folder in (("train", cfg.train_dir), ("val", cfg.val_dir)):
        tree = ImageFolder(os.path.join(cfg.root, folder))
        splits[split] = SplitSource(indexed(tree.samples, _read_rgb),
                                    lambda i, samples=tree.samples: samples[i][0],
                                    len(tree.samples), tree.classes,
                                    os.path.abspath(os.path.join(cfg.root, folder)))
    return splits
