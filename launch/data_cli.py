"""``kdflow data prepare DATASET [overrides] [--force]``: write a dataset's FFCV .beton files.

The dataset's settings come from ``configs/dataset/<DATASET>.yaml`` (with ``data.root`` and any
``prepare.dataset.<setting>=...`` override); how images are stored comes from ``prepare.*``.
"""
from __future__ import annotations

from typing import List

from methods.errors import ConfigError


def prepare_command(dataset: str, overrides: List[str], force: bool) -> int:
    """Validate everything, then write the train and val .beton files; 0 on success."""
    from omegaconf import OmegaConf

    from launch.compose import compose_config
    from orchestrator.data import validate_dataset
    from orchestrator.data.loader_choice import FFCV_INSTALL, ffcv_import_error
    from orchestrator.data.prepare import SOURCES, PrepareError, image_settings, prepare

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
    except PrepareError as err:
        print(f"kdflow: error: {err}")
        return 1
    print(f"done: use it with data.loader=ffcv (files in {dataset_cfg.betons()})")
    return 0
