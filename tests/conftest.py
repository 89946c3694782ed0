"""Shared fixtures: small studies on generated data, and a single-threaded torch."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Tuple

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


#: What a test file (or one test: ``file::name``) needs beyond Python and torch, by path under
#: ``tests/``: ``slurm`` a real SLURM cluster (root, apt), ``ray`` a real local Ray, ``services``
#: a real ``mlflow server``, ``ffcv`` FFCV and its system libraries, ``slow`` minutes of
#: training. Markers are registered in setup.cfg; everything so marked is also ``slow`` and
#: left out of the fast tier, ``make check`` (``pytest -m "not slow"``).
NEEDS: Dict[str, Tuple[str, ...]] = {
    "slurm/": ("slurm",),
    "tune/test_tune_cli.py": ("ray",),
    "tune/test_tune_pbt.py": ("ray",),
    "tune/test_search_identity.py": ("ray",),
    "launch/test_ray_launcher.py": ("ray",),
    "orchestrator/test_tracking_server.py": ("services",),
    "reliability/test_rel_tracking_concurrency.py": ("services",),
    "reliability/test_rel_tracking_server_bind.py": ("services",),
    "reliability/test_rel_tracking_outage.py": ("services",),
    "data/test_ffcv_": ("ffcv",),
    "data/test_prepare.py": ("ffcv",),
    "bench/test_bench_step.py": ("slow",),
    "bench/test_peer_torchdistill.py": ("slow",),
    "bench/test_real_cifar.py": ("slow",),
    "launch/test_demo.py": ("slow",),
    "data/test_real_images.py": ("slow",),
}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        where = Path(str(item.path)).resolve().relative_to(TESTS).as_posix()
        node = f"{where}::{item.name}"
        marks = {mark for prefix, needs in NEEDS.items()
                 if where.startswith(prefix) or node.startswith(prefix) for mark in needs}
        for mark in sorted(marks | ({"slow"} if marks else set())):
            item.add_marker(mark)


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
