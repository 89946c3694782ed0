"""The worker processes of a local study run from this test process: which one runs a job."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import psutil


def worker_of(job_dir: Path) -> Optional[psutil.Process]:
    """The child process of this one running the job of ``job_dir`` (it holds the job's lock
    file open throughout the run), or None."""
    lock = os.path.realpath(job_dir / ".lock")
    for child in psutil.Process().children():
        try:
            if any(os.path.realpath(f.path) == lock for f in child.open_files()):
                return child
        except psutil.Error:  # it ended meanwhile
            continue
    return None


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """The first true value of ``condition()``, polled every 20 ms for ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def has_checkpoint(job_dir: Path) -> bool:
    return any((job_dir / "checkpoints").glob("step-*.pt"))
