"""``kdflow data ACTION DATASET [overrides]``: work on a dataset's files.

The dataset's settings come from ``configs/dataset/<DATASET>.yaml`` (with ``data.root`` and any
``prepare.dataset.<setting>=...`` override); ``prepare.workers`` processes do the work.
``prepare`` writes the dataset's FFCV .beton files (how images are stored comes from
``prepare.*``); ``check`` decodes every file of the dataset and lists those that cannot be read;
``download`` fetches CIFAR-10/100 into ``data.root`` (from ``data.mirror.url`` when set).
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

from kdflow.methods.errors import ConfigError


def prepare_command(dataset: str, overrides: List[str], force: bool) -> int:
    """Validate everything, then write the train and val .beton files; 0 on success."""
    from omegaconf import OmegaConf

    from kdflow.launch.compose import compose_config
    from kdflow.orchestrator.data import DataError, validate_dataset
    from kdflow.orchestrator.data.loader_choice import FFCV_INSTALL, ffcv_import_error
    from kdflow.orchestrator.data.prepare import SOURCES, PrepareError, image_settings, prepare

    SOURCES.get(dataset, "dataset")
    cfg = compose_config([f"+dataset@prepare.dataset={dataset}", *overrides])
    settings = OmegaConf.to_container(cfg.prepare, resolve=True)
    values = {**settings.pop("dataset"), "loader": "torchvision"}
    workers = settings.pop("workers")
    dataset_cfg = validate_dataset(dataset, values, "prepare.dataset")
    image = image_settings(dataset, settings)
    problem = ffcv_import_error()
    if problem is not None:
        raise ConfigError("data.loader", "writing .beton files needs the ffcv package, which "
                          f"cannot be imported ({problem})", fix=FFCV_INSTALL)
    try:
        prepare(dataset, dataset_cfg, image, workers, force)
    except (PrepareError, DataError) as err:
        print(f"kdflow: error: {err}")
        return 1
    print(f"done: use it with data.loader=ffcv (files in {dataset_cfg.betons()})")
    return 0


def check_command(dataset: str, overrides: List[str], progress: bool = True) -> int:
    """Decode every file of ``dataset``'s splits and list the unreadable ones with their
    reasons: 0 when all are readable (or the dataset has no files), 1 otherwise. A tree that
    is missing or malformed raises ConfigError (fields under ``prepare.dataset.``)."""
    from kdflow.orchestrator.data.scan import scan_files

    dataset_cfg, workers = _check_settings(dataset, overrides)
    list_files = getattr(dataset_cfg, "data_files", None)
    if list_files is None:
        print(f"{dataset} is generated or bundled, not read from files: nothing to check")
        return 0
    try:
        files = list_files()
    except ConfigError as err:
        raise err.under("prepare.dataset") from None
    print(f"checking {len(files):,} files of {dataset} under {os.path.abspath(dataset_cfg.root)}"
          f" with {workers} processes (prepare.workers=N to change)", flush=True)
    problems = scan_files(files, workers, progress)
    for path, reason in problems:
        print(f"{path}: {reason}")
    if problems:
        print(f"{len(problems):,} of {len(files):,} files of {dataset} cannot be read. Fix: "
              "replace or delete them, then run the check again.")
        return 1
    print(f"all {len(files):,} files of {dataset} are readable")
    return 0


def download_command(dataset: str, overrides: List[str]) -> int:
    """Fetch ``dataset``'s archive into ``data.root`` unless its files are all there (then
    nothing is fetched); 0 when they are there afterwards. A download that fails raises
    ConfigError (fields under ``prepare.dataset.``) and keeps nothing."""
    from omegaconf import OmegaConf

    from kdflow.launch.compose import compose_config
    from kdflow.orchestrator.data import DATASETS, validate_dataset

    fetchable = [name for name in DATASETS if hasattr(DATASETS.get(name).Config, "fetch")]
    if dataset not in fetchable:
        raise ConfigError("dataset", f"kdflow does not download {dataset!r}", allowed=fetchable,
                          fix="put the dataset's files under data.root yourself")
    cfg = compose_config([f"+dataset@prepare.dataset={dataset}", *overrides])
    values = {**OmegaConf.to_container(cfg.prepare.dataset, resolve=True), "loader": "torchvision"}
    dataset_cfg = validate_dataset(dataset, values, "prepare.dataset", require_data=False)
    try:
        fetched = dataset_cfg.fetch()
    except ConfigError as err:
        raise err.under("prepare.dataset") from None
    where = os.path.abspath(dataset_cfg.root)
    print(f"{dataset} downloaded into {where}" if fetched
          else f"{dataset} is already complete in {where}: nothing was downloaded")
    return 0


def _check_settings(dataset: str, overrides: List[str]) -> Tuple[Any, int]:
    """The validated settings of ``dataset`` (``prepare.dataset``, no files read) and the
    number of decoding processes (``prepare.workers``; 0 decodes in this process)."""
    from omegaconf import OmegaConf

    from kdflow.launch.compose import compose_config
    from kdflow.orchestrator.data import DATASETS, validate_dataset
    from kdflow.orchestrator.data.checks import require_int

    DATASETS.get(dataset, "dataset")
    cfg = compose_config([f"+dataset@prepare.dataset={dataset}", *overrides])
    settings = OmegaConf.to_container(cfg.prepare, resolve=True)
    require_int("prepare.workers", settings["workers"], 0)
    return (validate_dataset(dataset, settings["dataset"], "prepare.dataset",
                             require_data=False), settings["workers"])
