"""The job store: one folder per job holding its spec, state, checkpoints and result."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from orchestrator.atomic import read_json, write_json
from orchestrator.spec import JobSpec

# pending: recorded, never submitted; queued: submitted to a scheduler, not started yet;
# cancelled: taken out of a scheduler's queue before it finished (a re-run submits it again).
log = logging.getLogger("kdflow.store")

STATUSES = ("pending", "queued", "running", "done", "failed", "blocked", "interrupted", "cancelled")


@dataclass
class JobState:
    """The bookkeeping record of one job (``state.json``).

    scheduler_ids: the scheduler ids the job has run under (a requeued SLURM job keeps its id);
    resumed_step: the global step of the checkpoint the latest run started from (None: from
    scratch).
    notes: faults the job survived, oldest first, one sentence each (e.g. a damaged checkpoint
    that was set aside and which one was used instead).
    """

    status: str = "pending"
    attempts: int = 0
    scheduler_ids: List[str] = field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    last_metric: Optional[float] = None
    epoch: int = 0
    resumed_step: Optional[int] = None
    notes: List[str] = field(default_factory=list)
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

    @contextlib.contextmanager
    def lock(self, spec: JobSpec) -> Iterator[None]:
        """Hold the job's exclusive lock (``<job>/.lock``, flock; released if the process dies).

        Waits while another process holds it, with a log line saying so.
        """
        folder = self.add(spec)
        with open(folder / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("job %s is running in another process; waiting for it", spec.job_id)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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

    def add_notes(self, job_id: str, *notes: str) -> None:
        """Append ``notes`` (faults the job survived) to its state's ``notes``; none: no write."""
        if notes:
            self.update_state(job_id, notes=[*self.state(job_id).notes, *notes])

    def record_submission(self, job_id: str, scheduler_id: str) -> None:
        """Note that ``job_id`` was handed to a scheduler under ``scheduler_id``.

        Kept apart from ``state.json`` (which the running job owns) in ``submissions.json``,
        so that a launcher recording a submission never races a job that has already started.
        """
        path = self.job_dir(job_id) / "submissions.json"
        entries = read_json(path) if path.exists() else []
        write_json(path, [*entries, {"scheduler_id": scheduler_id, "time": time.time()}])

    def submissions(self, job_id: str) -> List[str]:
        """The scheduler ids ``job_id`` was submitted under, oldest first."""
        path = self.job_dir(job_id) / "submissions.json"
        return [entry["scheduler_id"] for entry in read_json(path)] if path.exists() else []

    def result(self, job_id: str) -> Optional[Dict[str, Any]]:
        path = self.job_dir(job_id) / "result.json"
        return read_json(path) if path.exists() else None

    def is_done(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "result.json").exists()

    def weights_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "model.pt"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"
