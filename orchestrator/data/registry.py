"""The dataset registry: a name maps to the dataset's Config dataclass and its loaders.

Every dataset has a ``torchvision`` builder (decoding its own files, or holding it in memory);
datasets with a ``loader`` setting may add others (``ffcv``) with :func:`register_loader`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, TypeVar

import torch

from kdflow.methods.registry import Registry
from kdflow.orchestrator.data.loaders import Data

C = TypeVar("C")

#: ``build(cfg, batch_size, seed, device, channels_last)`` loads the data, returns its loaders.
Builder = Callable[[C, int, int, torch.device, bool], Data]

#: The loader every dataset has.
DEFAULT_LOADER = "torchvision"


@dataclass(frozen=True)
class DatasetEntry(Generic[C]):
    """A registered dataset.

    Config:  dataclass of the dataset's settings (the config keys); its ``validate()`` does
             only cheap checks (paths exist), never loads data.
    loaders: loader name -> ``build(cfg, batch_size, seed, device, channels_last) -> Data``.
    """

    Config: type
    loaders: Dict[str, Builder[Any]] = field(default_factory=dict)

    def builder(self, cfg: Any) -> Builder[Any]:
        """The builder of the loader ``cfg`` asks for (``cfg.loader``; else the default)."""
        return self.loaders[getattr(cfg, "loader", DEFAULT_LOADER)]


DATASETS: Registry[DatasetEntry[Any]] = Registry("dataset", "datasets")


def loader_names() -> list[str]:
    """Every loader some registered dataset has (``torchvision`` first): the values
    ``data.loader`` may take."""
    names = {loader for name in DATASETS for loader in DATASETS.get(name).loaders}
    return [DEFAULT_LOADER, *sorted(names - {DEFAULT_LOADER})]


def register_dataset(name: str, Config: type) -> Callable[[Builder[C]], Builder[C]]:
    """Decorator registering a dataset's default builder under ``name`` with its settings
    dataclass ``Config``."""

    def add(build: Builder[C]) -> Builder[C]:
        DATASETS.register(name)(DatasetEntry(Config, {DEFAULT_LOADER: build}))
        return build

    return add


def register_loader(name: str, loader: str) -> Callable[[Builder[C]], Builder[C]]:
    """Decorator adding the builder of ``loader`` (e.g. ``ffcv``) to dataset ``name``."""

    def add(build: Builder[C]) -> Builder[C]:
        DATASETS.get(name, "dataset").loaders[loader] = build
        return build

    return add
