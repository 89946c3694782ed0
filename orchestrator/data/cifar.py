"""CIFAR-10 and CIFAR-100 read from torchvision's pickled layout in a local folder.

``root`` holds ``cifar-10-batches-py/`` or ``cifar-100-python/`` as torchvision (or the
dataset's authors) ship them. With ``download`` (``data.download=true``) a missing folder is
fetched there first, once, before any job is submitted: from the authors' site (checked
against the md5 they publish) or from a lab's mirror (``data.mirror.url``, checked against
``data.mirror.sha256.<dataset>`` when set); see :mod:`orchestrator.data.download`. The images are
kept as uint8 (50,000 x 3 x 32 x 32 is 150 MB) and, with ``device_resident``, held on the
training device where each batch is augmented. A batch file that cannot be unpickled or
does not hold 32x32 RGB images raises :class:`~orchestrator.data.errors.DataError` naming it.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Dict, List, Optional, Sequence, TextIO

import numpy as np
import torch

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.beton import ImageSettings, beton_path
from kdflow.orchestrator.data.checks import require_bool, require_folder
from kdflow.orchestrator.data.download import (URL_SCHEMES, Archive, ChecksumMismatch,
                                               DownloadError, fetch_archive)
from kdflow.orchestrator.data.errors import read_file
from kdflow.orchestrator.data.fraction import TrainFraction
from kdflow.orchestrator.data.loader_choice import LoaderChoice
from kdflow.orchestrator.data.loaders import Data
from kdflow.orchestrator.data.prepare import SplitSource, indexed, register_source
from kdflow.orchestrator.data.registry import register_dataset, register_loader
from kdflow.orchestrator.data.scan import DataFile
from kdflow.orchestrator.data.tensor_loaders import tensor_data


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant's files live under ``root``, how its labels are keyed, and
    the authors' archive of them (its file name and published md5)."""

    folder: str
    train_files: Sequence[str]
    test_files: Sequence[str]
    label_key: str
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    archive: str
    md5: str


CIFAR10 = CifarLayout("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                      ["test_batch"], "labels", 10,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                      archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a")
CIFAR100 = CifarLayout("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                       (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                       archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85")

#: Where the dataset's authors publish the archives (the file name is appended).
AUTHORS_URL = "https://www.cs.toronto.edu/~kriz/"

PAD = 4


@dataclass
class CifarConfig(TrainFraction, LoaderChoice):
    """Settings shared by ``cifar10`` / ``cifar100``; subclasses set ``layout``.

    root:            folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
    device_resident: keep the whole uint8 dataset on the training device and augment there
                     (torchvision loader).
    loader, beton_dir, workers: see :class:`LoaderChoice` (``workers`` is used by FFCV only).
    download:        fetch the dataset's archive into root when its files are missing
                     (:meth:`fetch`, run by :meth:`check_data` before any job is submitted).
    mirror:          null (the authors' site) or the base URL of a mirror (http://, https://
                     or file://); the archive's file name is appended to it.
    sha256:          null (check the md5 the authors publish) or the archive's sha256 hex
                     digest, for a mirror whose file differs from the authors'.
    """

    root: str = "./data/cifar"
    device_resident: bool = True
    download: bool = False
    mirror: Optional[str] = None
    sha256: Optional[str] = None

    layout: ClassVar[CifarLayout]
    #: How the files are fetched does not change them: never in job specs (nor job ids).
    omitted_always: ClassVar[tuple] = ("download", "mirror", "sha256")

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (3, 32, 32)

    def class_count(self) -> int:
        return self.layout.num_classes

    def validate(self) -> None:
        self.validate_fraction()
        self.validate_loader()
        require_bool("device_resident", self.device_resident)
        require_bool("download", self.download)
        if self.mirror is not None and (not isinstance(self.mirror, str)
                                        or not self.mirror.startswith(URL_SCHEMES)):
            raise ConfigError("mirror", f"must be a URL starting with {', '.join(URL_SCHEMES)}, "
                              f"got {self.mirror!r}", fix="set data.mirror.url to the base URL "
                              f"of the folder holding {self.layout.archive}, or to null")
        if self.sha256 is not None and (not isinstance(self.sha256, str)
                                        or not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256)):
            raise ConfigError("sha256", f"must be a sha256 digest (64 hex digits), got "
                              f"{self.sha256!r}", fix=f"set {self._sha256_setting} to what "
                              f"`sha256sum {self.layout.archive}` prints (in quotes), or to null")

    @property
    def _sha256_setting(self) -> str:
        return f"data.mirror.sha256.{self.dataset}"

    def check_data(self) -> None:
        """The files exist (a listing only; nothing is read); with ``download``, missing ones
        are fetched first (:meth:`fetch`)."""
        if self.loader == "ffcv":
            self.check_betons()
            return
        if self.download:
            self.fetch()
        fix = (f"point root at a folder in torchvision's CIFAR layout "
               f"({self.layout.folder}/...), e.g. data.root=/path/to/cifar, or set "
               "data.download=true to fetch it there")
        require_folder("root", self.root, fix)
        missing = self._missing()
        if missing:
            raise ConfigError("root", f"file {os.path.abspath(missing[0])} does not exist",
                              fix=fix)

    def _missing(self) -> List[str]:
        """The paths of the dataset's batch files that do not exist."""
        paths = [os.path.join(self.root, self.layout.folder, name)
                 for name in [*self.layout.train_files, *self.layout.test_files]]
        return [path for path in paths if not os.path.isfile(path)]

    def download_archive(self) -> Archive:
        """The archive :meth:`fetch` downloads: from ``mirror`` or the authors' site, checked
        against ``sha256`` when set, else against the authors' md5."""
        base = self.mirror if self.mirror is not None else AUTHORS_URL
        url = f"{base.rstrip('/')}/{self.layout.archive}"
        digests = {"sha256": self.sha256.lower()} if self.sha256 else {"md5": self.layout.md5}
        return Archive(url, digests, self.layout.folder)

    def fetch(self, stream: Optional[TextIO] = None) -> bool:
        """Download the dataset into ``root`` unless all its files are there; True when it
        did. Progress goes to ``stream`` (default stderr). A failed download keeps nothing and
        raises ConfigError naming the setting to fix."""
        missing = self._missing()
        if not missing:
            return False
        folder = os.path.abspath(os.path.join(self.root, self.layout.folder))
        if os.path.exists(folder):
            raise ConfigError("root", f"{folder} lacks {os.path.basename(missing[0])}, so it is "
                              "not downloaded over", fix="delete that folder (data.download=true "
                              "then fetches it again), or complete it")
        try:
            fetch_archive(self.download_archive(), self.root, stream)
        except ChecksumMismatch as err:
            raise self._checksum_error(err) from None
        except DownloadError as err:
            raise ConfigError("mirror" if self.mirror else "download", str(err),
                              fix="check the network and data.mirror.url, then run again; or "
                                  f"unpack {self.layout.archive} into data.root yourself") from None
        return True

    def _checksum_error(self, err: ChecksumMismatch) -> ConfigError:
        """The ConfigError of a fetched archive whose digest differs: names the setting that
        chose the expected digest."""
        name = self.layout.archive
        if self.sha256:
            return ConfigError("sha256", str(err), fix=f"check {self._sha256_setting} (the "
                               f"mirror's checksum setting: the sha256 of its {name}) or the "
                               "mirror's file")
        if self.mirror:
            return ConfigError("mirror", str(err), fix=f"the mirror's {name} is not the "
                               "authors' file: replace it, or set "
                               f"{self._sha256_setting} to its sha256")
        return ConfigError("download", str(err), fix="the transfer was corrupted: run again, "
                           "or set data.mirror.url to a mirror")

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
    from kdflow.orchestrator.data.ffcv_loaders import ffcv_data
    from kdflow.orchestrator.data.ffcv_ops import SeededPadCropDecoder, WholeImageDecoder

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
