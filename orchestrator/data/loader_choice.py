"""The ``loader`` setting of datasets stored as files: torchvision decoding or FFCV .beton files.

``data.loader=torchvision`` (the default) decodes the dataset's own files; ``data.loader=ffcv``
reads the .beton files ``kdflow data prepare`` wrote. Both are checked before any job runs:
an unknown loader, a missing ffcv package or missing .beton files each raise a ConfigError
that says how to fix it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from methods.errors import ConfigError
from orchestrator.data.beton import SPLITS, beton_folder, beton_path, read_manifest
from orchestrator.data.checks import require_int

#: The loaders a file-backed dataset can use.
LOADERS = ("torchvision", "ffcv")
#: What to run when the ffcv package is missing (the Makefile's target does all three steps).
FFCV_INSTALL = ("make ffcv (apt-get install pkg-config libturbojpeg0-dev libopencv-dev, then "
                "pip install -e '.[ffcv]'), or set data.loader=torchvision")


def ffcv_installed() -> bool:
    """Whether the ffcv package can be imported (checked without importing it)."""
    return importlib.util.find_spec("ffcv") is not None


@dataclass
class LoaderChoice:
    """Settings of datasets that can be read through FFCV (a base of their Config).

    loader:     ``torchvision`` (decode the source files) or ``ffcv`` (read .beton files).
    beton_dir:  folder of the .beton files; empty means ``<root>/ffcv/<dataset>``.
    workers:    decoding workers: DataLoader processes (torchvision) or FFCV threads.
    """

    #: The registered name of the dataset (names its default .beton folder).
    dataset: ClassVar[str]
    #: Left out of job specs while at their defaults (:func:`orchestrator.data.dataset_record`),
    #: so the ids of jobs from before these settings existed are unchanged.
    omitted_at_default: ClassVar[tuple] = ("loader", "beton_dir", "workers")

    root: str = "./data"
    loader: str = "torchvision"
    beton_dir: str = ""
    workers: int = 2

    def validate_loader(self) -> None:
        if self.loader not in LOADERS:
            raise ConfigError("loader", f"unknown loader {self.loader!r}", allowed=list(LOADERS),
                              fix="set data.loader=torchvision or data.loader=ffcv")
        require_int("workers", self.workers, 0)
        if self.loader == "ffcv" and not ffcv_installed():
            raise ConfigError("loader", "loader 'ffcv' needs the ffcv package, which is not "
                              "installed", fix=FFCV_INSTALL)

    def betons(self) -> str:
        """The folder holding this dataset's ``train.beton`` and ``val.beton``."""
        return beton_folder(self.root, self.beton_dir, self.dataset)

    def check_betons(self) -> None:
        """Both splits were written completely for this dataset; reads the manifests only."""
        folder = self.betons()
        prepare = (f"run `kdflow data prepare {self.dataset} data.root={self.root}` first, or "
                   "set data.loader=torchvision")
        for split in SPLITS:
            manifest = read_manifest(folder, split)
            if manifest is None:
                raise ConfigError("beton_dir", f"{beton_path(folder, split)} has not been "
                                  "written (or its writing was interrupted)", fix=prepare)
            if manifest.dataset != self.dataset:
                raise ConfigError("beton_dir", f"{beton_path(folder, split)} holds dataset "
                                  f"{manifest.dataset!r}, not {self.dataset!r}",
                                  fix=f"point beton_dir at {self.dataset}'s files, or {prepare}")
