"""kdflow's data layer: registered datasets built into deterministic, resumable loaders.

``validate_dataset`` checks a dataset's settings without loading anything (it runs before
any job is submitted); ``build_data`` loads the dataset and returns its loaders. A file that
cannot be decoded, while building or loading, raises :class:`DataError`: one line naming the
file, the cause and the ``kdflow data check`` command that lists every unreadable file.

Every module here that calls ``register_dataset`` or ``register_loader`` is imported when the
package is: a new dataset is one new file, no list to edit (:mod:`kdflow.methods.discovery`).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from kdflow.methods.config import config_record, parse_config
from kdflow.methods.discovery import import_registering_modules
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data.errors import DataError, build_named
from kdflow.orchestrator.data.loaders import Batch, Data, EvalLoader, TrainLoader
from kdflow.orchestrator.data.registry import (DATASETS, DEFAULT_LOADER, DatasetEntry,
                                               register_dataset, register_loader)

import_registering_modules(__name__, __path__, ("register_dataset", "register_loader"))

__all__ = ["Batch", "Data", "DataError", "DATASETS", "DatasetEntry", "EvalLoader",
           "TrainLoader", "build_data", "dataset_record", "register_dataset", "register_loader",
           "validate_dataset"]


def validate_dataset(dataset_name: str, settings: Mapping[str, Any] | None, field: str,
                     require_data: bool = True) -> Any:
    """Parse and check ``settings`` of dataset ``dataset_name``; returns its Config dataclass.

    ``field`` is the settings' dotted path (``study.datasets.cifar100``); errors name fields
    under it (``study.datasets.cifar100.root``). An unknown name raises ConfigError at
    ``field`` listing the registered datasets. With ``require_data`` the dataset's files must
    exist (``Config.check_data``: listings only, no data is read).
    """
    entry = DATASETS.get(dataset_name, field)
    cfg = parse_config(entry.Config, settings, field)
    loader = getattr(cfg, "loader", DEFAULT_LOADER)
    if loader not in entry.loaders:
        raise ConfigError(f"{field}.loader", f"dataset {dataset_name!r} has no {loader!r} loader",
                          allowed=list(entry.loaders),
                          fix=f"set data.loader to one of {', '.join(entry.loaders)}")
    check = getattr(cfg, "check_data", None)
    if require_data and check is not None:
        try:
            check()
        except ConfigError as err:
            raise err.under(field) from None
    return cfg


def dataset_record(cfg: Any) -> Dict[str, Any]:
    """``cfg`` as the plain dict a job spec holds (:func:`methods.config.config_record`).

    Settings the Config lists in ``omitted_always`` (how its files are fetched, which does
    not change them) are left out at any value: they change no job id, and a job reads them
    back as their defaults.
    """
    record = config_record(cfg)
    for name in getattr(cfg, "omitted_always", ()):
        record.pop(name, None)
    return record


def build_data(dataset_name: str, settings: Mapping[str, Any] | None, field: str,
               batch_size: int, seed: int, device: torch.device,
               channels_last: bool = False) -> Data:
    """Validate ``settings`` and load the dataset as loaders of ``batch_size`` on ``device``.

    ``seed`` fixes the training order and augmentation (per epoch and step); the train/val
    split itself is fixed by the dataset's own settings. Batches are laid out channels_last
    when ``channels_last`` (else contiguous NCHW). The loader is the one ``settings`` name.
    An unreadable file raises :class:`DataError` (here or from the loaders' ``batches``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg = validate_dataset(dataset_name, settings, field)
    build = DATASETS.get(dataset_name, field).builder(cfg)
    return build_named(lambda: build(cfg, batch_size, seed, device, channels_last),
                       dataset_name, cfg)
