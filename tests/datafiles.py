"""Dataset files made by tests: CIFAR-100 pickles and ImageNet-style trees of real JPEGs."""
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
