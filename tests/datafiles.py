"""Dataset files made by tests: CIFAR-10/100 pickles and ImageNet-style trees of real JPEGs."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image


def write_fake_cifar100(root: Path, n_train: int = 40, n_test: int = 24) -> Dict[str, list]:
    """``root/cifar-100-python/{train,test,meta}`` with random images; returns the labels
    (``train``, ``test``) and pixels (``train_data``, ``test_data``: (N, 3072) uint8)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        labels[name] = fine
        entry = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        labels[name + "_data"] = entry["data"]
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, fh)
    return labels


def write_fake_cifar10(root: Path, per_batch: int = 6) -> Dict[str, list]:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` with the keys
    of the authors' pickles (str, as their Python 2 pickles load with ``encoding="latin1"``),
    ``per_batch`` random images each; returns the labels of the ``train`` batches (in order)
    and of ``test``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels: Dict[str, list] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = rng.integers(0, 10, per_batch).tolist()
        labels["test" if name == "test_batch" else "train"].extend(batch)
        entry = {"batch_label": name, "labels": batch,
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"num_cases_per_batch": per_batch, "num_vis": 3072,
                     "label_names": [f"c{i}" for i in range(10)]}, fh, protocol=2)
    return labels


def write_jpeg_tree(root: Path, per_class: Dict[str, int], classes: Sequence[str] = ("cat", "dog"),
                    size: Tuple[int, int] = (40, 48), smooth: bool = False) -> None:
    """``root/<split>/<class>/<i>.jpg``: ``per_class[split]`` JPEGs of ``size`` (H, W) a class.

    ``smooth`` images (a colour per class plus gentle gradients) survive JPEG re-encoding
    nearly unchanged; otherwise the pixels are uniform noise.
    """
    rng = np.random.default_rng(0)
    h, w = size
    ramp = np.linspace(0, 60, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    for split, n in per_class.items():
        for k, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                if smooth:
                    colour = rng.integers(40, 160, 3)
                    colour[k % 3] = 190
                    pixels = np.clip(colour + ramp * rng.uniform(0.5, 1.0), 0, 255)
                    pixels = pixels.astype(np.uint8)
                else:
                    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)


def _label_blocks(rng: np.random.Generator, h: int, w: int, values: Sequence[int],
                  block: int = 8) -> np.ndarray:
    """(h, w) uint8 label map of ``block``-pixel squares, each a random one of ``values``."""
    grid = rng.choice(np.asarray(values, dtype=np.uint8), ((h + block - 1) // block,
                                                           (w + block - 1) // block))
    return np.kron(grid, np.ones((block, block), dtype=np.uint8))[:h, :w]


def write_fake_voc(root: Path, counts: Dict[str, int] | None = None
                   ) -> Dict[str, Tuple[list, list]]:
    """``root/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`` with
    smooth JPEGs of varying sizes and palette PNG masks (classes 0..20, a 255 border).

    Returns split -> (images (H, W, 3) uint8 as written before JPEG, masks (H, W) uint8), in
    the order of the split's list.
    """
    counts = counts or {"train": 6, "val": 5}
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tolist()
    rng = np.random.default_rng(0)
    written: Dict[str, Tuple[list, list]] = {}
    for split, n in counts.items():
        ids, images, masks = [], [], []
        for i in range(n):
            name = f"2007_{split}{i:03d}"
            h, w = 24 + 4 * (i % 3), 32 + 8 * (i % 2)
            mask = _label_blocks(rng, h, w, range(21))
            mask[0, :] = mask[:, -1] = 255  # void border
            colour = rng.integers(30, 220, 3)
            pixels = np.clip(colour + np.linspace(0, 30, w)[None, :, None], 0, 255)
            pixels = np.broadcast_to(pixels, (h, w, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            png = Image.frombuffer("P", (w, h), mask.tobytes(), "raw", "P", 0, 1)
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{name}.png")
            ids.append(name)
            images.append(pixels)
            masks.append(mask)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        written[split] = (images, masks)
    return written


#: Cityscapes label ids the fake label maps use: train classes and ids evaluated in none.
CITYSCAPES_FAKE_IDS = (0, 1, 4, 6, 7, 8, 11, 17, 21, 24, 26, 29, 30, 33)


def write_fake_cityscapes(root: Path, counts: Dict[str, int] | None = None,
                          train_ids_for: Sequence[str] = ()) -> Dict[str, Tuple[list, list]]:
    """``root/cityscapes/{leftImg8bit,gtFine}/<split>/<city>/...`` with random PNG images and
    ``*_gtFine_labelIds.png`` maps of :data:`CITYSCAPES_FAKE_IDS` (two cities a split).

    The train split's stems in ``train_ids_for`` also get a ``*_gtFine_labelTrainIds.png``
    (ids + 100, which a reader must prefer over their labelIds). Returns split -> (images
    (H, W, 3) uint8, label id maps (H, W) uint8) in sorted (city, file) order.
    """
    counts = counts or {"train": 4, "val": 3}
    base = root / "cityscapes"
    rng = np.random.default_rng(0)
    written: Dict[str, Tuple[list, list]] = {}
    for split, n in counts.items():
        images = []
        for i in range(n):
            city = ("aachen", "bremen")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            h, w = 16, 32
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ids = _label_blocks(rng, h, w, CITYSCAPES_FAKE_IDS, block=4)
            for kind, name in (("leftImg8bit", f"{stem}_leftImg8bit.png"),
                               ("gtFine", f"{stem}_gtFine_labelIds.png")):
                (base / kind / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels if kind == "leftImg8bit" else ids).save(
                    base / kind / split / city / name)
            if split == "train" and stem in train_ids_for:
                Image.fromarray(ids + 100).save(
                    base / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
            images.append((city, stem, pixels, ids))
        images.sort(key=lambda entry: (entry[0], entry[1]))
        written[split] = ([e[2] for e in images], [e[3] for e in images])
    return written
