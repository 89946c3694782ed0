"""The job store: one folder per job holding its spec, state, checkpoints and result."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from orchestrator.atomic import read_json, write_json
from orchestrator.spec import JobSpec

STATUSES = ("pending", "running", "done", "failed", "blocked", "interrupted")


@dataclass
class JobState:
    """The bookkeeping record of one job (``state.json``)."""

    status: str = "pending"
    attempts: int = 0
    scheduler_ids: List[str] = field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    last_metric: Optional[float] = None
    epoch: int = 0
    updated: float = 0.0


class JobStore:
    """Folders under ``root/<job_id>/``: ``spec.json``, ``state.json``, ``checkpoints/``,
    ``model.pt`` (final weights) and ``result.json``. Every write is atomic."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def add(self, spec: JobSpec) -> Path:
        """Record ``spec`` (idempotent: an existing job's state is kept)."""
        folder = self.job_dir(spec.job_id)
        if not (folder / "spec.json").exists():
            write_json(folder / "spec.json", spec.to_json())
        if not (folder / "state.json").exists():
            self.save_state(spec.job_id, JobState())
        return folder

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.from_json(read_json(self.job_dir(job_id) / "spec.json"))

    def state(self, job_id: str) -> JobState:
        path = self.job_dir(job_id) / "state.json"
        return JobState(**read_json(path)) if path.exists() else JobState()

    def save_state(self, job_id: str, state: JobState) -> None:
        state.updated = time.time()
        write_json(self.job_dir(job_id) / "state.json", asdict(state))

    def update_state(self, job_id: str, **changes: Any) -> JobState:
        state = self.state(job_id)
        for key, value in changes.items():
            setattr(state, key, value)
        self.save_state(job_id, state)
        return state

    def result(self, job_id: str) -> Optional[Dict[str, Any]]:
        path = self.job_dir(job_id) / "result.json"
        return read_json(path) if path.exists() else None

    def is_done(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "result.json").exists()

    def weights_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "model.pt"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"
