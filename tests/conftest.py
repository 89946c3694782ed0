"""Shared fixtures: small studies on generated data, and a single-threaded torch."""
from __future__ import annotations

import copy
from typing import Any, Dict

import pytest
import torch

SMALL_RECIPE: Dict[str, Any] = {
    "epochs": 2, "batch_size": 32, "lr": 0.05, "lr_milestones": [1],
    "checkpoint_every_steps": 5, "device": "cpu",
}
SMALL_STUDY: Dict[str, Any] = {
    "name": "unit",
    "datasets": {"synthetic": {"num_train": 128, "num_val": 64, "image_size": 16}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "seeds": [0],
    "teacher_seed": 0,
    "teacher_recipe": dict(SMALL_RECIPE),
    "student_recipe": dict(SMALL_RECIPE),
    "methods": {"vanilla": {}, "kd": {}},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reliability: fault-injection tests (crashes, outages, bad input, security); "
        "run them alone with pytest -m reliability")


@pytest.fixture
def study() -> Dict[str, Any]:
    """A fresh copy of a two-method study on generated data (a few seconds to run)."""
    return copy.deepcopy(SMALL_STUDY)


@pytest.fixture(autouse=True)
def single_thread_seeded():
    """Every test starts from the same RNG state, and bitwise comparisons between runs need
    the same (single) intra-op thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
