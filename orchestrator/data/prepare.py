"""``kdflow data prepare``: write a dataset's splits as FFCV .beton files.

Each split is written to a hidden temporary file beside its final name and renamed into place
only when complete; its manifest follows. A split whose manifest matches what would be
written (source, sample count, classes, image settings) is skipped, so an interrupted prepare
run resumes at the first unfinished split and nothing finished is written twice. An image that
cannot be decoded does not hang FFCV's writer: it is recorded, the temporary file is removed
and the error lists the files to fix.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from kdflow.methods.errors import ConfigError
from kdflow.methods.registry import Registry
from kdflow.orchestrator.data.beton import (SPLITS, ImageSettings, Manifest, beton_path,
                                            read_manifest, write_manifest)
from kdflow.orchestrator.data.checks import require_int
from kdflow.orchestrator.data.errors import DataError, check_command

#: Bad files listed in an error before "... and N more".
SHOWN_ERRORS = 10
#: Side of the placeholder written for an undecodable image (the split is discarded anyway).
PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)


class PrepareError(RuntimeError):
    """Some source files could not be read; nothing was left under a final .beton name."""


@dataclass(frozen=True)
class SplitSource:
    """One split to write: an indexable of ``(image, label)`` and facts for its manifest.

    samples: ``samples[i] -> (H x W x 3 uint8 array, int label)``; ``name(i)`` names sample i
             in errors (its file path).
    """

    samples: Any
    name: Callable[[int], str]
    count: int
    classes: List[str]
    source: str


@dataclass(frozen=True)
class Source:
    """How a dataset is read for writing: its default image settings and its splits."""

    image: ImageSettings
    splits: Callable[[Any], Dict[str, SplitSource]]


#: Datasets ``kdflow data prepare`` can write, by registered dataset name.
SOURCES: Registry[Source] = Registry("dataset", "dataset")


def check_settings(image: ImageSettings, workers: int) -> None:
    """Raise ConfigError (fields under ``prepare.``) for settings FFCV would reject."""
    modes = ("jpg", "raw", "proportion")
    if image.write_mode not in modes:
        raise ConfigError("prepare.write_mode", f"unknown write mode {image.write_mode!r}",
                          allowed=modes, fix="set prepare.write_mode=jpg (smallest files)")
    require_int("prepare.max_side", image.max_side, 0)
    if isinstance(image.jpeg_quality, bool) or not isinstance(image.jpeg_quality, int) \
            or not 1 <= image.jpeg_quality <= 100:
        raise ConfigError("prepare.jpeg_quality", f"must be an integer in 1..100, got "
                          f"{image.jpeg_quality!r}", fix="set prepare.jpeg_quality=90")
    if not isinstance(image.compress_probability, (int, float)) \
            or not 0 <= image.compress_probability <= 1:
        raise ConfigError("prepare.compress_probability", "must be in [0, 1], got "
                          f"{image.compress_probability!r}", fix="set it to e.g. 0.5")
    require_int("prepare.workers", workers, 1)


def image_settings(dataset: str, overrides: Dict[str, Any]) -> ImageSettings:
    """The dataset's default image settings with the non-null ``overrides`` applied."""
    return replace(SOURCES.get(dataset, "dataset").image,
                   **{k: v for k, v in overrides.items() if v is not None})


class _Recorded:
    """``samples`` whose unreadable items are written to ``errors_path`` instead of raising
    (FFCV's writer waits forever for a worker that died)."""

    def __init__(self, split: SplitSource, errors_path: str) -> None:
        self.split = split
        self.errors_path = errors_path

    def __len__(self) -> int:
        return self.split.count

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        try:
            image, label = self.split.samples[index]
            return image, int(label)
        except Exception as err:  # noqa: BLE001  (any unreadable file is reported, not fatal)
            with open(self.errors_path, "a") as fh:
                fh.write(f"{self.split.name(index)}: {type(err).__name__}: {err}\n".replace(
                    "\n", " ").rstrip() + "\n")
            return PLACEHOLDER, 0


def _write_split(split: SplitSource, final: str, image: ImageSettings, workers: int) -> None:
    from kdflow.orchestrator.data.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    folder = os.path.dirname(final)
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.partial-", dir=folder)
    os.close(fd)
    errors_path = partial + ".errors"
    try:
        fields = {"image": RGBImageField(write_mode=image.write_mode,
                                         max_resolution=image.max_side or None,
                                         jpeg_quality=image.jpeg_quality,
                                         compress_probability=image.compress_probability),
                  "label": IntField()}
        DatasetWriter(partial, fields, num_workers=workers).from_indexed_dataset(
            _Recorded(split, errors_path), chunksize=64)
        if os.path.exists(errors_path):
            with open(errors_path) as fh:
                bad = fh.read().splitlines()
            shown = "\n  ".join(bad[:SHOWN_ERRORS])
            more = f"\n  ... and {len(bad) - SHOWN_ERRORS} more" if len(bad) > SHOWN_ERRORS else ""
            raise PrepareError(f"{len(bad)} of {split.count} images of {split.source} could not "
                               f"be read:\n  {shown}{more}\nFix: remove or replace these files, "
                               "then run `kdflow data prepare` again (finished splits are kept).")
        os.replace(partial, final)
    finally:
        for path in (partial, errors_path):
            if os.path.exists(path):
                os.remove(path)


def prepare(dataset: str, cfg: Any, image: ImageSettings, workers: int, force: bool = False,
            say: Callable[[str], None] = print) -> List[Manifest]:
    """Write ``train.beton`` and ``val.beton`` of ``dataset`` (settings ``cfg``) into
    ``cfg.betons()``; returns their manifests.

    Splits already written with the same source, count, classes and ``image`` settings are kept
    unless ``force``. Progress: one line per split and FFCV's progress bar while writing.
    A source file that cannot be read while listing the splits (a CIFAR pickle) raises
    :class:`DataError`.
    """
    entry = SOURCES.get(dataset, "dataset")
    check_settings(image, workers)
    folder = cfg.betons()
    try:
        splits = entry.splits(cfg)
    except DataError as err:
        raise err.with_check(check_command(dataset, cfg)) from None
    os.makedirs(folder, exist_ok=True)
    manifests = []
    for split_name in SPLITS:
        split = splits[split_name]
        wanted = Manifest(dataset=dataset, split=split_name, source=split.source,
                          num_samples=split.count, classes=list(split.classes),
                          image=asdict(image))
        final = beton_path(folder, split_name)
        if not force and read_manifest(folder, split_name) == wanted:
            say(f"{split_name}: {final} is already written ({split.count:,} images); kept")
            manifests.append(wanted)
            continue
        say(f"{split_name}: writing {split.count:,} images of {split.source} to {final}")
        _write_split(split, final, image, workers)
        write_manifest(folder, wanted)
        say(f"{split_name}: done, {os.path.getsize(final) / 2**20:,.1f} MiB")
        manifests.append(wanted)
    return manifests


def register_source(dataset: str, image: ImageSettings
                    ) -> Callable[[Callable[[Any], Dict[str, SplitSource]]],
                                  Callable[[Any], Dict[str, SplitSource]]]:
    """Decorator registering ``splits(cfg) -> {"train": SplitSource, "val": ...}``."""

    def add(splits: Callable[[Any], Dict[str, SplitSource]]
            ) -> Callable[[Any], Dict[str, SplitSource]]:
        SOURCES.register(dataset)(Source(image, splits))
        return splits

    return add


def indexed(items: Sequence[Any], read: Callable[[Any], Tuple[np.ndarray, int]]) -> Any:
    """A lazy indexable: ``indexed(items, read)[i] == read(items[i])``."""
    return _Indexed(items, read)


class _Indexed:
    def __init__(self, items: Sequence[Any], read: Callable[[Any], Tuple[np.ndarray, int]]):
        self.items = items
        self.read = read

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        return self.read(self.items[index])
