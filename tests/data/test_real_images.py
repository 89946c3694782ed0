"""Real CIFAR-10 photographs (the JPEG archive, via :mod:`bench.real_data`'s cache).

Students learn on them through each dataset's real path (a one-job study run by the runner),
``cifar10_jpeg`` decodes exactly what the cache's pickled batches hold, the shipped sample is
what its README says it is, and FFCV .beton files written by ``kdflow data prepare`` from the
real files give back what the torchvision loaders read.

The cache comes from the full 60,000-image archive when a ``shared/`` folder lies beside the
checkout or one of its parents (:func:`bench.real_data.source_archive`), else from the 12,000-image sample kdflow ships; sizes below are chosen per source so that both
train about the same number of images (the sample's test split is 200 images a class).
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from bench.real_data import build, is_full_archive, sha256_of, source_archive
from kdflow.launch.cli import main
from kdflow.orchestrator.data import Batch, build_data
from kdflow.orchestrator.data.cifar import CIFAR10, read_cifar_split
from kdflow.orchestrator.data.cifar10_jpeg import CLASSES, SAMPLE_ARCHIVE, read_jpeg_archive
from kdflow.orchestrator.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

CPU = torch.device("cpu")
FULL = is_full_archive()
#: Training images a training test uses: 10,000 of the full archive's 50,000, or all of the
#: sample's 10,000 (the same count, so the thresholds hold for both sources).
CIFAR_FRACTION = 0.2 if FULL else 1.0
FOLDER_FRACTION = 0.1 if FULL else 0.5
#: Validation images a class in the imagefolder training test (the sample's whole test split).
VAL_PER_CLASS = 200
ASSETS_README = SAMPLE_ARCHIVE.parent / "README.md"


@pytest.fixture(scope="session")
def real() -> Path:
    """The cache folder: ``cifar-10-batches-py/`` and ``jpg/{train,val}/<class>/*.jpg``."""
    return build()


def _train_student(tmp_path: Path, dataset: str, settings: Dict, recipe: Dict) -> Dict:
    """result.json of a one-job study: a resnet8 student trained from scratch (vanilla)."""
    recipe = {"lr_milestones": [], "device": "cpu", "amp": "none",
              "checkpoint_every_steps": 100_000, **recipe}
    study = {"name": "real", "datasets": {dataset: settings},
             "pairs": [{"teacher": "resnet14", "student": "resnet8"}], "seeds": [0],
             "teacher_seed": 0, "teacher_recipe": dict(recipe), "student_recipe": dict(recipe),
             "methods": {"vanilla": {}}}
    (job,) = expand_study(study).jobs
    result = run_job(job, JobStore(tmp_path / "jobs"), RunOptions(progress=False))
    print(f"{dataset}: val top1 by epoch {[h.get('val/top1') for h in result['history']]}, "
          f"{result['wall_time_s']:.1f} s")
    return result


def _pixels(batch: Batch, mean, std) -> torch.Tensor:
    """A normalised batch back to [0, 1] pixels."""
    return batch.x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def _val_order(real: Path) -> List[str]:
    """``<class>/<file>`` of the test split in the pickled test batch's order (file name)."""
    val = real / "jpg" / "val"
    return sorted(f"{c}/{f}" for c in CLASSES for f in os.listdir(val / c))


# --- students learn on real images ---------------------------------------------------------

def test_cifar10_student_learns_from_the_real_batches(real: Path, tmp_path: Path) -> None:
    """resnet8, 10,000 real training images, 2 epochs: about 40 % on the 10,000 real test
    images (chance is 10 %)."""
    result = _train_student(tmp_path, "cifar10",
                            {"root": str(real), "train_fraction": CIFAR_FRACTION},
                            {"epochs": 2, "batch_size": 128, "lr": 0.2, "lr_milestones": [1]})
    assert len(result["history"]) == 2
    assert result["metrics"]["top1"] > 25.0, result["history"]


def test_imagefolder_student_learns_from_the_real_jpeg_tree(real: Path, tmp_path: Path) -> None:
    """The ImageNet pipeline (RandomResizedCrop, flips; Resize + CenterCrop) at 32 px over the
    real JPEG files: about 32 % on 2,000 real test images after 2 epochs on 5,000."""
    tree = real / "jpg"
    assert sorted(os.listdir(tree / "train")) == sorted(os.listdir(tree / "val")) == list(CLASSES)
    # the whole tree: ten classes, labels in folder order (which is CIFAR-10's label order)
    data = build_data("imagefolder", {"root": str(tree), "image_size": 32, "workers": 0,
                                      "train_fraction": FOLDER_FRACTION},
                      "study.datasets.imagefolder", 64, 0, CPU)
    per_class = 5000 if FULL else 1000
    kept = round(FOLDER_FRACTION * per_class)
    assert data.info.num_classes == 10 and data.info.num_samples == 10 * kept
    assert torch.equal(data.info.labels, torch.arange(10).repeat_interleave(kept))

    # train on that tree's train split; validate on the first 200 test files of each class
    root = tmp_path / "tree"
    root.mkdir()
    (root / "train").symlink_to(tree / "train", target_is_directory=True)
    for cls in CLASSES:
        (root / "val" / cls).mkdir(parents=True)
        for name in sorted(os.listdir(tree / "val" / cls))[:VAL_PER_CLASS]:
            (root / "val" / cls / name).symlink_to(tree / "val" / cls / name)
    settings = {"root": str(root), "image_size": 32, "workers": 0,
                "train_fraction": FOLDER_FRACTION}
    result = _train_student(tmp_path, "imagefolder", settings,
                            {"epochs": 2, "batch_size": 64, "lr": 0.1, "lr_milestones": [1]})
    assert len(result["history"]) == 2
    assert result["metrics"]["top1"] > 20.0, result["history"]


# --- cifar10_jpeg and the shipped sample ---------------------------------------------------

def test_cifar10_jpeg_decodes_the_pixels_and_labels_of_the_pickled_batches(real: Path) -> None:
    archive = source_archive()
    splits = read_jpeg_archive(archive)
    for split, files in (("train", CIFAR10.train_files), ("test", CIFAR10.test_files)):
        images, labels = read_cifar_split(str(real), CIFAR10, files)
        assert images.shape == splits[split][0].shape == (len(labels), 3, 32, 32)
        assert torch.equal(splits[split][0], images) and torch.equal(splits[split][1], labels)
    assert len(splits["test"][1]) == (10_000 if FULL else 2_000)
    assert torch.equal(torch.bincount(splits["test"][1]),
                       torch.full((10,), len(splits["test"][1]) // 10))

    # and the dataset loads them: the very batches `cifar10` makes of the pickles
    settings = {"train_fraction": CIFAR_FRACTION, "fraction_seed": 3}
    jpeg = build_data("cifar10_jpeg", {"archive": str(archive), **settings}, "d", 256, 5, CPU)
    pickled = build_data("cifar10", {"root": str(real), **settings}, "d", 256, 5, CPU)
    assert jpeg.info.num_classes == 10 and jpeg.info.input_shape == (3, 32, 32)
    assert torch.equal(jpeg.info.labels, pickled.info.labels)
    for a, b in zip(jpeg.val.batches(), pickled.val.batches()):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
    a, b = next(jpeg.train.batches(1)), next(pickled.train.batches(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)


def _readme_sha256(label: str) -> str:
    """The sha256 the assets README gives right after ``label`` (within 80 characters)."""
    found = re.search(re.escape(label) + r".{0,80}?\b([0-9a-f]{64})\b",
                      ASSETS_README.read_text(), re.DOTALL)
    assert found, f"{ASSETS_README} gives no sha256 after {label!r}"
    return found.group(1)


def test_the_shipped_sample_is_the_one_its_readme_records() -> None:
    # orchestrator/data/assets/README.md records the sample's provenance and sha256
    assert ASSETS_README.is_file(), f"{ASSETS_README} is missing: it records the sample's sha256"
    assert sha256_of(SAMPLE_ARCHIVE) == _readme_sha256("sha256 of the sample")
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        names = [m.name for m in tar if m.isfile()]
    assert names == sorted(names) and len(names) == 12_000
    for split, per_class in (("train", 1000), ("test", 200)):
        for cls in CLASSES:
            assert sum(n.startswith(f"{split}/{cls}/") for n in names) == per_class


def test_the_shipped_sample_is_cut_byte_for_byte_from_the_full_archive() -> None:
    if not FULL:
        pytest.skip("the full archive (shared/data/cifar10/cifar10-jpg.tar.xz) is not here")
    archive = source_archive()
    if ASSETS_README.is_file() and "cifar10-jpg.tar.xz" in ASSETS_README.read_text():
        assert sha256_of(archive) == _readme_sha256("cifar10-jpg.tar.xz")
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        sample = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    full: Dict[str, bytes] = {}
    names: Dict[str, List[str]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile():
                names.setdefault(member.name.rsplit("/", 1)[0], []).append(member.name)
                if member.name in sample:
                    full[member.name] = tar.extractfile(member).read()
    assert full.keys() == sample.keys()
    different = [name for name in sample if full[name] != sample[name]]
    assert not different, f"{len(different)} files differ, e.g. {different[:3]}"
    # the first 1,000 (train) and 200 (test) files by name of every class
    for folder, members in names.items():
        count = 1000 if folder.startswith("train/") else 200
        assert sorted(members)[:count] == sorted(n for n in sample if n.startswith(folder + "/"))


# --- FFCV betons of the real files -----------------------------------------------------------

def test_ffcv_cifar10_from_the_real_batches_gives_back_the_same_validation_batches(
        real: Path, tmp_path: Path) -> None:
    """The real test batch as it is and 200 real images of each training batch, prepared
    (raw pixels) through `kdflow data prepare`."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    source = real / "cifar-10-batches-py"
    for name in ("test_batch", "batches.meta"):
        (folder / name).symlink_to(source / name)
    for name in CIFAR10.train_files:
        with open(source / name, "rb") as fh:
            entry = pickle.load(fh)
        entry = {**entry, "data": entry["data"][:200], "labels": entry["labels"][:200],
                 "filenames": entry["filenames"][:200]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=4)
    assert main(["data", "prepare", "cifar10", f"data.root={tmp_path}"]) == 0

    ffcv = build_data("cifar10", {"root": str(tmp_path), "loader": "ffcv", "workers": 1},
                      "d", 500, 0, CPU)
    reference = build_data("cifar10", {"root": str(tmp_path)}, "d", 500, 0, CPU)
    assert ffcv.info.num_samples == 1000 and torch.equal(ffcv.info.labels, reference.info.labels)
    mine, theirs = list(ffcv.val.batches()), list(reference.val.batches())
    assert sum(len(b.y) for b in mine) == (10_000 if FULL else 2_000)
    assert len(mine) == len(theirs)
    pixels, _ = read_cifar_split(str(real), CIFAR10, CIFAR10.test_files)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
        assert torch.allclose(a.x, b.x, atol=1e-5)  # normalised alike (up to float rounding)
        stored = (_pixels(a, CIFAR10.mean, CIFAR10.std) * 255).round().to(torch.uint8)
        assert torch.equal(stored, pixels[a.index])  # the very pixels of the real test batch
    for batch in ffcv.train.batches(0):
        assert torch.equal(batch.y, ffcv.info.labels[batch.index])


def test_ffcv_imagefolder_from_real_jpegs_matches_the_torchvision_loader(
        real: Path, tmp_path: Path) -> None:
    """A tree of real JPEG files (10 train, 20 val a class) prepared raw and as JPEG.

    At image_size 28 both loaders only crop: torchvision resizes 32 to int(28 / 0.875) = 32
    and centre-crops 28, FFCV centre-crops 0.875 x 32 = 28; so raw betons give back the very
    pixels, which are also the centre of the pickled test images (the same files)."""
    tree = real / "jpg"
    root = tmp_path / "tree"
    for split, count in (("train", 10), ("val", 20)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(tree / split / cls))[:count]:
                shutil.copyfile(tree / split / cls / name, root / split / cls / name)
    assert main(["data", "prepare", "imagefolder", f"data.root={root}",
                 "prepare.write_mode=raw"]) == 0
    assert main(["data", "prepare", "imagefolder", f"data.root={root}", "prepare.write_mode=jpg",
                 f"prepare.dataset.beton_dir={root / 'jpg'}"]) == 0

    def load(**extra):
        settings = {"root": str(root), "image_size": 28, "workers": 0, **extra}
        return build_data("imagefolder", settings, "d", 64, 0, CPU)

    reference = load()
    theirs = list(reference.val.batches())
    labels = torch.cat([b.y for b in theirs])
    assert torch.equal(labels, torch.arange(10).repeat_interleave(20))
    assert reference.info.num_classes == 10
    assert torch.equal(reference.info.labels, torch.arange(10).repeat_interleave(10))

    # the torchvision loader decodes the pixels the pickled test batch holds
    order = _val_order(real)
    files = [f"{cls}/{name}" for cls in CLASSES
             for name in sorted(os.listdir(root / "val" / cls))]
    rows = [order.index(f) for f in files]
    pickled, pickled_y = read_cifar_split(str(real), CIFAR10, CIFAR10.test_files)
    assert torch.equal(pickled_y[rows], labels)
    source = pickled[rows, :, 2:30, 2:30].float() / 255
    assert torch.allclose(torch.cat([_pixels(b, IMAGENET_MEAN, IMAGENET_STD) for b in theirs]),
                          source, atol=1e-5)

    raw = load(loader="ffcv")
    assert raw.info.num_classes == 10 and torch.equal(raw.info.labels, reference.info.labels)
    mine = list(raw.val.batches())
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
        assert torch.allclose(a.x, b.x, atol=1e-5)  # the same pixels, normalised

    # JPEG at quality 90 over quality-75 photographs: close, not equal
    errors = []
    for a, b in zip(load(loader="ffcv", beton_dir=str(root / "jpg")).val.batches(), theirs):
        assert torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
        errors.append((_pixels(a, IMAGENET_MEAN, IMAGENET_STD)
                       - _pixels(b, IMAGENET_MEAN, IMAGENET_STD)).abs())
    error = torch.cat(errors)
    assert 0 < error.mean() < 3 / 255 and error.max() < 48 / 255, (error.mean(), error.max())
    for batch in raw.train.batches(0):
        assert torch.equal(batch.y, raw.info.labels[batch.index])
        assert batch.x.shape[1:] == (3, 28, 28)
