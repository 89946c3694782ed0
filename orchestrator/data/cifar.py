"""CIFAR-10 and CIFAR-100 read from torchvision's pickled layout in a local folder.

kdflow never downloads: ``root`` must already hold ``cifar-10-batches-py/`` or
``cifar-100-python/`` as torchvision (or the dataset's authors) ship them. The images are
kept as uint8 (50,000 x 3 x 32 x 32 is 150 MB) and, with ``device_resident``, held on the
training device where each batch is augmented. A batch file that cannot be unpickled or
does not hold 32x32 RGB images raises :class:`~orchestrator.data.errors.DataError` naming it.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Dict, List, Sequence

import numpy as np
import torch

from methods.errors import ConfigError
from orchestrator.data.beton import ImageSettings, beton_path
from orchestrator.data.checks import require_bool, require_folder
from orchestrator.data.errors import read_file
from orchestrator.data.fraction import TrainFraction
from orchestrator.data.loader_choice import LoaderChoice
from orchestrator.data.loaders import Data
from orchestrator.data.prepare import SplitSource, indexed, register_source
from orchestrator.data.registry import register_dataset, register_loader
from orchestrator.data.scan import DataFile
from orchestrator.data.tensor_loaders import tensor_data


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant's files live under ``root`` and how its labels are keyed."""

    folder: str
    train_files: Sequence[str]
    test_files: Sequence[str]
    label_key: str
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]


CIFAR10 = CifarLayout("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                      ["test_batch"], "labels", 10,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarLayout("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                       (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))

PAD = 4


@dataclass
class CifarConfig(TrainFraction, LoaderChoice):
    """Settings shared by ``cifar10`` / ``cifar100``; subclasses set ``layout``.

    root:            folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
    device_resident: keep the whole uint8 dataset on the training device and augment there
                     (torchvision loader).
    loader, beton_dir, workers: see :class:`LoaderChoice` (``workers`` is used by FFCV only).
    """

    root: str = "./data/cifar"
    device_resident: bool = True

    layout: ClassVar[CifarLayout]

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (3, 32, 32)

    def class_count(self) -> int:
        return self.layout.num_classes

    def validate(self) -> None:
        self.validate_fraction()
        self.validate_loader()
        require_bool("device_resident", self.device_resident)

    def check_data(self) -> None:
        """The files exist (a listing only; nothing is read)."""
        if self.loader == "ffcv":
            self.check_betons()
            return
        fix = (f"point root at a folder in torchvision's CIFAR layout "
               f"({self.layout.folder}/...), e.g. data.root=/path/to/cifar; kdflow never downloads")
        require_folder("root", self.root, fix)
        for name in [*self.layout.train_files, *self.layout.test_files]:
            path = os.path.join(self.root, self.layout.folder, name)
            if not os.path.isfile(path):
                raise ConfigError("root", f"file {os.path.abspath(path)} does not exist", fix=fix)

    def data_files(self) -> List[DataFile]:
        """The pickled batches of both splits, each read as training reads it."""
        replace(self, loader="torchvision").check_data()
        read = partial(read_cifar_batch, label_key=self.layout.label_key)
        return [DataFile(os.path.join(self.root, self.layout.folder, name), read)
                for name in [*self.layout.train_files, *self.layout.test_files]]


@dataclass
class Cifar10Config(CifarConfig):
    """Settings of ``cifar10`` (see :class:`CifarConfig`)."""

    layout: ClassVar[CifarLayout] = CIFAR10
    dataset: ClassVar[str] = "cifar10"


@dataclass
class Cifar100Config(CifarConfig):
    """Settings of ``cifar100`` (see :class:`CifarConfig`)."""

    layout: ClassVar[CifarLayout] = CIFAR100
    dataset: ClassVar[str] = "cifar100"


#: Values of one CIFAR image: 3 x 32 x 32.
IMAGE_VALUES = 3 * 32 * 32


def read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, List[int]]:
    """Images (N, 3, 32, 32) uint8 and their N labels (under ``label_key``) of one pickled
    batch file; raises when it cannot be unpickled or its sizes do not match."""
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    data, labels = np.asarray(entry["data"], dtype=np.uint8), list(entry[label_key])
    if data.size != len(labels) * IMAGE_VALUES:
        raise ValueError(f"{data.size} pixel values for {len(labels)} labels, not "
                         f"{IMAGE_VALUES} per label")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_split(root: str, layout: CifarLayout, files: Sequence[str]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from the pickled batch ``files``;
    a file that cannot be read raises DataError naming it."""
    images, labels = [], []
    read = partial(read_cifar_batch, label_key=layout.label_key)
    for name in files:
        batch_images, batch_labels = read_file(read, os.path.join(root, layout.folder, name))
        images.append(batch_images)
        labels.extend(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def build_cifar(cfg: CifarConfig, batch_size: int, seed: int, device: torch.device,
                channels_last: bool) -> Data:
    """CIFAR with random 32x32 crops of the 4-pixel zero-padded image and horizontal flips."""
    layout = cfg.layout
    train_x, train_y = read_cifar_split(cfg.root, layout, layout.train_files)
    val_x, val_y = read_cifar_split(cfg.root, layout, layout.test_files)
    keep = cfg.train_indices(train_y)
    return tensor_data(train_x[keep], train_y[keep], val_x, val_y, layout.num_classes, layout.mean,
                       layout.std, batch_size, seed, device, PAD, hflip=True,
                       resident=cfg.device_resident, channels_last=channels_last)


def build_cifar_ffcv(cfg: CifarConfig, batch_size: int, seed: int, device: torch.device,
                     channels_last: bool) -> Data:
    """CIFAR from .beton files, with the same crops of the padded image and flips as above."""
    from orchestrator.data.ffcv_loaders import ffcv_data
    from orchestrator.data.ffcv_ops import SeededPadCropDecoder, WholeImageDecoder

    layout, folder = cfg.layout, cfg.betons()
    return ffcv_data(beton_path(folder, "train"), beton_path(folder, "val"),
                     lambda norm: SeededPadCropDecoder(PAD, seed, flip=True, normalise=norm),
                     lambda norm: WholeImageDecoder(normalise=norm), cfg.train_indices,
                     layout.num_classes, cfg.input_shape(), layout.mean, layout.std, batch_size,
                     seed, device, cfg.workers, channels_last)


#: FFCV's CIFAR recipe stores the 32x32 pixels as they are.
CIFAR_BETON = ImageSettings(write_mode="raw", max_side=0)


def cifar_splits(cfg: CifarConfig) -> Dict[str, SplitSource]:
    """The pickled train and test batches (the test batch is the val split), HWC uint8."""
    replace(cfg, loader="torchvision").check_data()
    layout, splits = cfg.layout, {}
    classes = [str(c) for c in range(layout.num_classes)]
    for split, files in (("train", layout.train_files), ("val", layout.test_files)):
        images, labels = read_cifar_split(cfg.root, layout, files)
        pixels = images.permute(0, 2, 3, 1).contiguous().numpy()
        splits[split] = SplitSource(indexed(range(len(labels)),
                                            lambda i, x=pixels, y=labels: (x[i], int(y[i]))),
                                    lambda i, files=files: f"{'+'.join(files)}[{i}]",
                                    len(labels), classes,
                                    os.path.abspath(os.path.join(cfg.root, layout.folder)))
    return splits


for _name, _Config in (("cifar10", Cifar10Config), ("cifar100", Cifar100Config)):
    register_dataset(_name, _Config)(build_cifar)
    register_loader(_name, "ffcv")(build_cifar_ffcv)
    register_source(_name, CIFAR_BETON)(cifar_splits)
