"""Imagewoof (fastai's ``imagewoof2``): 10 dog breeds from ImageNet, in an ImageNet-style tree.

StableKD's second dataset (methods.md §6.1). The release unpacks to
``imagewoof2/train/<wnid>/*.JPEG`` (9,025 images) and ``imagewoof2/val/<wnid>/*.JPEG``
(3,929 images); the 160 and 320 px releases (``imagewoof2-160``, ``imagewoof2-320``) have the
same layout. It is read exactly as ``imagefolder`` is (same transforms, same FFCV path); only
the defaults differ, and its .beton files go to ``<root>/ffcv/imagewoof``. kdflow never
downloads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kdflow.orchestrator.data.imagefolder import (IMAGENET_BETON, ImageFolderConfig,
                                                  build_imagefolder, build_imagefolder_ffcv,
                                                  imagefolder_splits)
from kdflow.orchestrator.data.prepare import register_source
from kdflow.orchestrator.data.registry import register_dataset, register_loader

#: Imagewoof's class count: its ten ImageNet dog-breed synsets.
IMAGEWOOF_CLASSES = 10


@dataclass
class ImagewoofConfig(ImageFolderConfig):
    """``imagefolder``'s settings with Imagewoof's defaults: ``root`` the unpacked
    ``imagewoof2`` folder, ``val`` as its validation split, 10 classes (checked against the
    tree before anything starts, and what lets ``--dry-run`` plan without the files)."""

    dataset: ClassVar[str] = "imagewoof"

    root: str = "./data/imagewoof2"
    num_classes: int = IMAGEWOOF_CLASSES


register_dataset("imagewoof", ImagewoofConfig)(build_imagefolder)
register_loader("imagewoof", "ffcv")(build_imagefolder_ffcv)
register_source("imagewoof", IMAGENET_BETON)(imagefolder_splits)
