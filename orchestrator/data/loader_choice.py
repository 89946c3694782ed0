"""The ``loader`` setting of datasets stored as files: torchvision decoding or FFCV .beton files.

``data.loader=torchvision`` (the default) decodes the dataset's own files; ``data.loader=ffcv``
reads the .beton files ``kdflow data prepare`` wrote. Both are checked before any job runs:
an unknown loader, a missing ffcv package or missing .beton files each raise a ConfigError
that says how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Optional

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.beton import SPLITS, beton_folder, beton_path, read_manifest
from kdflow.orchestrator.data.checks import require_int

#: What to run when the ffcv package is missing (the Makefile's target does all three steps).
FFCV_INSTALL = ("make ffcv (apt-get install pkg-config libturbojpeg0-dev libopencv-dev, then "
                "pip install -e '.[ffcv]')")


@lru_cache(maxsize=1)
def ffcv_import_error() -> Optional[str]:
    """Why ffcv cannot be used (``"ModuleNotFoundError: No module named 'ffcv'"``, or its
    compiled library failing to load its system libraries), or None when it can.

    It really imports ffcv (once per process): an installed package whose libturbojpeg or
    OpenCV went missing fails here rather than in a job.
    """
    from kdflow.orchestrator.data.ffcv_import import import_ffcv

    try:
        import_ffcv()
        import ffcv.libffcv  # noqa: F401  (loads the compiled library)
    except (ImportError, OSError) as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


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
        """``workers`` is a count; ``loader=ffcv`` needs an importable ffcv. (Whether the
        dataset has the loader at all is the dataset registry's check.)"""
        require_int("workers", self.workers, 0)
        problem = ffcv_import_error() if self.loader == "ffcv" else None
        if problem is not None:
            raise ConfigError("loader", "loader 'ffcv' needs the ffcv package, which cannot be "
                              f"imported ({problem})",
                              fix=f"{FFCV_INSTALL}, or set data.loader=torchvision")

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
