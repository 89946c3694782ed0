"""Training checkpoints: atomic, numbered by global step, newest kept plus one spare."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from orchestrator.atomic import atomic_write

log = logging.getLogger(__name__)
KEEP = 2


def save_checkpoint(folder: Path, global_step: int, state: Dict[str, Any]) -> Path:
    """Write ``state`` as ``folder/step-<global_step>.pt`` atomically; prune older ones."""
    path = folder / f"step-{global_step:09d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path) -> Optional[Dict[str, Any]]:
    """The newest readable checkpoint in ``folder`` (an unreadable one is reported and skipped)."""
    for path in sorted(folder.glob("step-*.pt"), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a torn or corrupt file: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s); using the previous one", path, err)
    return None
