"""Crash-safe file writes: write a temporary sibling, fsync, then rename over the target."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A reader sees either the old file or the complete new one, never a partial write, even if
    the process is killed mid-way (a stray ``.tmp-*`` file may remain and is ignored).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    payload = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(payload))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
