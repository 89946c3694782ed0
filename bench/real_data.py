"""Real CIFAR-10 images for tests and benchmarks, built once and cached outside the clone.

The source is a tar of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (32x32 JPEG files):
``$KDFLOW_CIFAR10_JPG`` when set, else the 60,000-image archive of the nearest ``shared/``
folder beside the checkout or beside one of its parent folders
(``../shared/data/cifar10/cifar10-jpg.tar.xz``, ``../../shared/...``, ...), else the
12,000-image sample kdflow ships
(so a fresh machine without ``shared/`` still trains on real photographs). From it this module
writes, under ``${KDFLOW_DATA_CACHE:-~/.cache/kdflow-data}/cifar10-jpg-<sha256[:16]>/``:

- ``cifar-10-batches-py/``: torchvision's pickled layout (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``), the ``cifar10`` dataset's input (``data.root`` = the cache folder);
- ``jpg/train/<class>/*.jpg`` and ``jpg/val/<class>/*.jpg``: the files as they are, an
  ImageNet-style tree for the ``imagefolder`` dataset (the archive's ``test`` split is ``val``).

Each part is written into a temporary folder and renamed into place, under a lock, so
concurrent builders (pytest workers, benchmark runs) never see half a cache.

    python -m bench.real_data        # builds the cache, prints its folder
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from kdflow.orchestrator.data.cifar10_jpeg import CLASSES, SAMPLE_ARCHIVE, read_jpeg_archive

REPO = Path(__file__).resolve().parents[1]
#: Where the full archive lies inside a ``shared/`` folder.
SHARED_PATH = Path("shared", "data", "cifar10", "cifar10-jpg.tar.xz")
#: Training batches of the pickled layout (CIFAR-10 has five, of 10,000 images each).
TRAIN_BATCHES = 5


def source_archive() -> Path:
    """The archive the cache is built from (see the module docstring for the order)."""
    if os.environ.get("KDFLOW_CIFAR10_JPG"):
        return Path(os.environ["KDFLOW_CIFAR10_JPG"])
    shared = [folder / SHARED_PATH for folder in REPO.parents if (folder / SHARED_PATH).is_file()]
    return shared[0] if shared else SAMPLE_ARCHIVE


def is_full_archive(archive: Optional[Path] = None) -> bool:
    """Whether ``archive`` (default: :func:`source_archive`) is not the shipped sample."""
    return (archive or source_archive()).resolve() != SAMPLE_ARCHIVE.resolve()


def sha256_of(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder(archive: Path) -> Path:
    """The cache folder of ``archive``, keyed by its sha256."""
    base = Path(os.environ.get("KDFLOW_DATA_CACHE", Path.home() / ".cache" / "kdflow-data"))
    return base / f"cifar10-jpg-{sha256_of(archive)[:16]}"


def write_batches(archive: Path, out: Path) -> None:
    """``out/cifar-10-batches-py/`` from the archive: the train split in file-name order cut
    into five batches, the test split as ``test_batch``; pixels in R, G, B planes."""
    splits = read_jpeg_archive(archive)
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, images, labels, label: str) -> None:
        entry = {"batch_label": label, "labels": labels.tolist(),
                 "data": images.reshape(len(images), -1).numpy(),
                 "filenames": [f"{name}_{i}.jpg" for i in range(len(labels))]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=4)

    images, labels = splits["train"]
    for b, part in enumerate(np.array_split(np.arange(len(labels)), TRAIN_BATCHES)):
        dump(f"data_batch_{b + 1}", images[part], labels[part],
             f"training batch {b + 1} of {TRAIN_BATCHES}")
    dump("test_batch", *splits["test"], "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(CLASSES), "num_vis": 3072}, fh, protocol=4)


def extract_tree(archive: Path, out: Path) -> None:
    """``out/jpg/{train,val}/<class>/*.jpg``: the archive's files (``test`` renamed ``val``)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in CLASSES:
                continue
            split = {"train": "train", "test": "val"}.get(parts[0])
            if split is None:
                continue
            target = out / "jpg" / split / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def build(archive: Optional[Path] = None) -> Path:
    """The cache folder of ``archive`` (default :func:`source_archive`), built if missing:
    it holds ``cifar-10-batches-py/`` and ``jpg/``."""
    archive = archive or source_archive()
    folder = cache_folder(archive)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for part, write in (("cifar-10-batches-py", write_batches), ("jpg", extract_tree)):
            if (folder / part).is_dir():
                continue
            work = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder))
            try:
                write(archive, work)
                os.replace(work / part, folder / part)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(build())
