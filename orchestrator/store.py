"""The job store: one folder per job holding its spec, state, checkpoints and result."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from kdflow.methods.errors import ConfigError
from kdflow.methods.tasks import CLASSIFICATION
from kdflow.orchestrator.atomic import read_json, write_json
from kdflow.orchestrator.checkpoint import REJECTED_SUFFIX, ends_without_comment, seal_digests
from kdflow.orchestrator.metrics import primary_metric
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.tracking_outbox import LOCK_FILE as OUTBOX_LOCK

# pending: recorded, never submitted; queued: submitted to a scheduler, not started yet;
# cancelled: taken out of a scheduler's queue before it finished (a re-run submits it again).
log = logging.getLogger("kdflow.store")

#: Where a re-run sets a job's earlier files aside: ``<job>/superseded/<UTC time>/``.
SUPERSEDED = "superseded"
#: The marker of a supersede in progress (it names the folder); see :meth:`JobStore.supersede`.
SUPERSEDING = "superseding.json"
#: What stays in a job's folder when it is superseded (the state is replaced by a fresh one).
KEPT = ("spec.json", ".lock", OUTBOX_LOCK, SUPERSEDED, SUPERSEDING)

#: A finished job's record; :data:`RESULT_KEYS` are the keys every one holds (docs/architecture.md).
RESULT = "result.json"
RESULT_KEYS = ("job_id", "stage", "method", "teacher", "student", "dataset", "seed", "metrics",
               "epochs", "wall_time_s")
#: A file's identity for the verification cache: (path, mtime in ns, size); None: no file.
FileStamp = Optional[Tuple[str, int, int]]

STATUSES = ("pending", "queued", "running", "done", "failed", "blocked", "interrupted", "cancelled")


@dataclass
class JobState:
    """The bookkeeping record of one job (``state.json``).

    scheduler_ids: the scheduler ids the job has run under (a requeued SLURM job keeps its id);
    resumed_step: the global step of the checkpoint the latest run started from (None: from
    scratch).
    pack: the id of the pack (:mod:`orchestrator.pack`) its latest run ran in; None: alone.
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
    pack: Optional[str] = None
    updated: float = 0.0


class JobStore:
    """Folders under ``root/<job_id>/``: ``spec.json``, ``state.json``, ``checkpoints/``,
    ``model.pt`` (final weights), ``result.json`` and ``superseded/<UTC time>/`` (the files of
    earlier runs that ``rerun`` set aside, :meth:`supersede`). Every write is atomic."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._unmovable: Set[FileStamp] = set()  # damaged results that could not be set aside

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
    def lock(self, spec: JobSpec, wait: bool = True) -> Iterator[bool]:
        """Hold the job's exclusive lock (``<job>/.lock``, flock; released if the process dies).

        Waits while another process holds it, with a log line saying so; with ``wait=False``
        it does not, and yields False (the lock is not held) instead of True.
        """
        folder = self.add(spec)
        with open(folder / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                log.info("job %s is running in another process; waiting for it", spec.job_id)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield True
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
        """The job's ``result.json``; None when it has none or it is damaged (:meth:`is_done`)."""
        return read_json(self.job_dir(job_id) / RESULT) if self.is_done(job_id) else None

    def is_done(self, job_id: str) -> bool:
        """Whether the job has a sound result: a ``result.json`` that parses, holds
        :data:`RESULT_KEYS` and its task's metric, names this job, and sits beside a
        ``model.pt`` whose seal verifies (:func:`result_problem`, cached per file version).

        A damaged result is set aside as ``result.json.rejected`` with a warning and a note in
        the job's state (its status ``pending`` if it was ``done``), so every launcher runs the
        job again, from its last checkpoint if it has one.
        """
        stamp = _stamp(self.job_dir(job_id) / RESULT)
        if stamp is None:
            return False
        problem = result_problem(stamp, _stamp(self.weights_path(job_id)), job_id)
        if problem is not None:
            self._set_aside(job_id, stamp, problem)
        return problem is None

    def _set_aside(self, job_id: str, stamp: FileStamp, problem: str) -> None:
        """Rename the damaged ``result.json`` of ``job_id`` (the version ``stamp``, unless it
        changed since) to ``result.json.rejected``, warn and note it in the job's state; on a
        store that cannot be written, warn once."""
        path = self.job_dir(job_id) / RESULT
        if stamp in self._unmovable or _stamp(path) != stamp:
            return
        try:
            path.replace(path.with_name(RESULT + REJECTED_SUFFIX))
        except FileNotFoundError:  # set aside (or superseded) meanwhile by another process
            return
        except OSError as err:
            self._unmovable.add(stamp)
            log.warning("job %s: %s is damaged (%s) and could not be set aside (%s); the job "
                        "counts as not done", job_id, path, problem, err.strerror)
            return
        log.warning("job %s: %s was damaged (%s); set aside as %s%s, `kdflow run` runs the "
                    "job again (from its last checkpoint)", job_id, path, problem, RESULT,
                    REJECTED_SUFFIX)
        state = self.state(job_id)
        self.update_state(job_id, status="pending" if state.status == "done" else state.status,
                          notes=[*state.notes, f"result.json was damaged ({problem}): set aside "
                                               f"as {RESULT}{REJECTED_SUFFIX}, so the job runs "
                                               "again (from its last checkpoint)"])

    def weights_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "model.pt"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def has_record(self, job_id: str) -> bool:
        """Whether job ``job_id`` has anything a re-run would set aside: a result, weights,
        checkpoints, a tracking outbox, or attempts in its state."""
        folder = self.job_dir(job_id)
        if not folder.is_dir():
            return False
        return (any(entry.name not in (*KEPT, "state.json") for entry in folder.iterdir())
                or self.state(job_id).attempts > 0)

    def supersede(self, job_id: str, stamp: str) -> Optional[Path]:
        """Set aside everything job ``job_id`` recorded into ``<job>/superseded/<stamp>/`` (a
        ``-2``... suffix if that exists) and give it a fresh state, so that every launcher runs
        it again from scratch (and its tracking starts a new MLflow run). Returns the folder;
        None when the job recorded nothing. Call it under the job's lock.

        Nothing is copied and nothing deleted: ``result.json``, ``model.pt``, ``checkpoints/``,
        ``state.json``, the tracking outbox and the rest are renamed into the folder. A marker,
        ``superseding.json`` naming the folder, is written first and removed last, and
        ``result.json`` is the first file moved; so if the process dies mid-way every file is
        either still in the job folder or in the superseded one, the job is never finished
        without its weights, and :meth:`complete_supersede` (run before the job runs again)
        moves the rest.
        """
        if not self.has_record(job_id):
            return None
        parent = self.job_dir(job_id) / SUPERSEDED
        folder, n = parent / stamp, 1
        while folder.exists():
            n += 1
            folder = parent / f"{stamp}-{n}"
        folder.mkdir(parents=True)
        write_json(self.job_dir(job_id) / SUPERSEDING, {"folder": folder.name})
        return self.complete_supersede(job_id)

    def complete_supersede(self, job_id: str) -> Optional[Path]:
        """Finish the supersede of job ``job_id`` that a marker says is in progress (see
        :meth:`supersede`) and return its folder; None (and nothing done) when there is none.
        Each step is a rename that is skipped once done, so it may be repeated after a crash."""
        job_dir = self.job_dir(job_id)
        marker = job_dir / SUPERSEDING
        if not marker.exists():
            return None
        folder = job_dir / SUPERSEDED / read_json(marker)["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        entries = sorted(job_dir.iterdir(), key=lambda entry: entry.name != RESULT)
        for entry in entries:  # result.json first: from then on the job is not finished
            fresh_state = entry.name == "state.json" and (folder / entry.name).exists()
            if entry.name in KEPT or fresh_state:  # (a state beside a moved one is the fresh one)
                continue
            entry.rename(folder / entry.name)
        if not (job_dir / "state.json").exists():
            self.save_state(job_id, JobState())
        marker.unlink()
        return folder


def _stamp(path: Path) -> FileStamp:
    """``path``'s identity for :func:`result_problem`'s cache; None when there is no file."""
    try:
        stats = path.stat()
    except FileNotFoundError:
        return None
    return str(path), stats.st_mtime_ns, stats.st_size


@functools.lru_cache(maxsize=16384)
def result_problem(result: Tuple[str, int, int], weights: FileStamp,
                   job_id: str) -> Optional[str]:
    """Why the result file ``result`` of job ``job_id``, beside the weights file ``weights``,
    is not a sound finished job; None when it is.

    Cached per (path, mtime, size) of both files: a status of 1,000 jobs reads each file once
    per process, and a file that changes is checked again.
    """
    try:
        record = json.loads(Path(result[0]).read_bytes())
    except (OSError, ValueError) as err:
        return f"not readable JSON: {err}"
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    missing = [key for key in RESULT_KEYS if key not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    if record["job_id"] != job_id:
        return f"it records job {record['job_id']!r}, not this one"
    problem = _metrics_problem(record)
    if problem is None and weights is None:
        return "model.pt is missing"
    return problem or _weights_problem(Path(weights[0]))


def _metrics_problem(record: Dict[str, Any]) -> Optional[str]:
    """Why ``record["metrics"]`` lacks its task's headline number (None: it has it)."""
    try:
        metric = primary_metric(record.get("task", CLASSIFICATION))
    except (ConfigError, TypeError):
        return f"unknown task {record.get('task')!r}"
    metrics = record["metrics"]
    if not isinstance(metrics, dict) or not isinstance(metrics.get(metric), (int, float)):
        return f"metrics holds no number {metric}"
    return None


def _weights_problem(path: Path) -> Optional[str]:
    """Why the weights file ``path`` fails its seal (:mod:`orchestrator.checkpoint`): unreadable,
    truncated, or a sha256 that does not match its bytes; None when it passes (a file from
    before files were sealed passes when it ends as ``torch.save`` writes it)."""
    try:
        data = memoryview(path.read_bytes())
    except OSError as err:
        return f"model.pt unreadable ({err.strerror})"
    digests = seal_digests(data)
    if digests is not None:
        return None if digests[0] == digests[1] else "model.pt fails its checksum"
    unsealed = ends_without_comment(data)
    return None if unsealed else f"model.pt is truncated or not a kdflow file ({len(data)} bytes)"
