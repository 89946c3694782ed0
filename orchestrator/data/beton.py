"""Where a dataset's FFCV files live and what each one holds.

``kdflow data prepare`` writes one ``<split>.beton`` per split into the dataset's
``beton_dir`` (default ``<root>/ffcv/<dataset>``), each with a ``<split>.beton.json`` manifest
beside it: the source it was written from, its sample count, class names and image settings. The
manifest is written after the ``.beton`` is in place, so a split with a manifest is complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from kdflow.orchestrator.atomic import write_json

#: Version of the manifest layout; a manifest of another version is treated as absent.
FORMAT = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageSettings:
    """How images are stored in a .beton (FFCV's ``RGBImageField``).

    write_mode:           ``jpg`` (every image JPEG), ``raw`` (uint8 pixels) or ``proportion``
                          (a random ``compress_probability`` share as JPEG, the rest raw).
    max_side:             longest side in pixels after downscaling (never upscaled); 0 keeps
                          the source size.
    jpeg_quality:         JPEG quality 1-100 of the compressed images.
    compress_probability: share of JPEG images under ``proportion``.
    """

    write_mode: str = "proportion"
    max_side: int = 500
    jpeg_quality: int = 90
    compress_probability: float = 0.5


@dataclass(frozen=True)
class Manifest:
    """What one written split holds (the ``.beton.json`` beside it)."""

    dataset: str
    split: str
    source: str
    num_samples: int
    classes: List[str]
    image: Dict[str, Any]
    format: int = FORMAT
    extra: Dict[str, Any] = field(default_factory=dict)


def beton_folder(root: str, beton_dir: str, dataset: str) -> str:
    """The folder of a dataset's .beton files: ``beton_dir``, or ``<root>/ffcv/<dataset>``."""
    return beton_dir or os.path.join(root, "ffcv", dataset)


def beton_path(folder: str, split: str) -> str:
    """The .beton file of ``split`` (``train`` or ``val``) in ``folder``."""
    return os.path.join(folder, f"{split}.beton")


def manifest_path(folder: str, split: str) -> str:
    return beton_path(folder, split) + ".json"


def read_manifest(folder: str, split: str) -> Optional[Manifest]:
    """The manifest of a complete split, or None when the split was not (fully) written."""
    path = manifest_path(folder, split)
    if not os.path.isfile(path) or not os.path.isfile(beton_path(folder, split)):
        return None
    with open(path) as fh:
        values = json.load(fh)
    if values.get("format") != FORMAT:
        return None
    return Manifest(**values)


def write_manifest(folder: str, manifest: Manifest) -> None:
    """Record ``manifest`` for its split (atomically; call after the .beton is in place)."""
    write_json(Path(manifest_path(folder, manifest.split)), asdict(manifest))
