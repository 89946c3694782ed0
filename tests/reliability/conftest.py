"""Fault-injection tests (issue 9): crashes, corrupt checkpoints, tracking outages, concurrency,
numerical faults, full disks, bad input and security. Every test under this folder is marked
``reliability`` (the SLURM ones live in ``tests/slurm`` and carry the mark themselves), so
``pytest -m reliability`` runs them on their own."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.reliability)
