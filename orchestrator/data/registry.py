"""The dataset registry: a name maps to the dataset's Config dataclass and its builder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch

from methods.registry import Registry
from orchestrator.data.loaders import Data

C = TypeVar("C")

#: ``build(cfg, batch_size, seed, device)`` loads the data and returns its loaders.
Builder = Callable[[C, int, int, torch.device], Data]


@dataclass(frozen=True)
class DatasetEntry(Generic[C]):
    """A registered dataset.

    Config: dataclass of the dataset's settings (the config keys); its ``validate()`` does
            only cheap checks (paths exist), never loads data.
    build:  ``build(cfg, batch_size, seed, device) -> Data``.
    """

    Config: type
    build: Builder[Any]


DATASETS: Registry[DatasetEntry[Any]] = Registry("dataset", "datasets")


def register_dataset(name: str, Config: type) -> Callable[[Builder[C]], Builder[C]]:
    """Decorator registering a builder under ``name`` with its settings dataclass ``Config``."""

    def add(build: Builder[C]) -> Builder[C]:
        DATASETS.register(name)(DatasetEntry(Config, build))
        return build

    return add
