"""Training checkpoints: atomic, numbered by global step, newest kept plus one spare."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from orchestrator.atomic import atomic_write

log = logging.getLogger(__name__)
KEEP = 2


def checkpoint_path(folder: Path, global_step: int) -> Path:
    """Where the checkpoint at ``global_step`` of the job whose checkpoints are in ``folder`` is."""
    return folder / f"step-{global_step:09d}.pt"


def init_checkpoint_path(folder: Path, global_step: int) -> Path:
    """Where a job whose checkpoints are in ``folder`` keeps its own copy of the donor checkpoint
    (at ``global_step``) it starts from (``JobSpec.init_from``); never pruned."""
    return checkpoint_path(folder / "init", global_step)


def latest_checkpoint_path(folder: Path) -> Optional[Path]:
    """The newest checkpoint file in ``folder`` (None when there is none)."""
    paths = sorted(folder.glob("step-*.pt"))
    return paths[-1] if paths else None


def save_checkpoint(folder: Path, global_step: int, state: Dict[str, Any]) -> Path:
    """Write ``state`` as ``folder/step-<global_step>.pt`` atomically; prune older ones."""
    path = checkpoint_path(folder, global_step)
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
