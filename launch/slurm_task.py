"""What one SLURM array task runs: a pack of kdflow jobs (or one job) from the job store, with
retries and requeue.

A task runs the jobs it is given with :func:`orchestrator.pack.run_pack`: jobs of one teacher
and batch stream in lockstep, one job simply alone. Every job of the task records the task's
SLURM id as its own.

The task is a submitit ``Checkpointable``: when SLURM signals SIGUSR2 (the time limit is near,
or ``scancel --signal=USR2``), the runner checkpoints every job of the pack at the same step and
stops, and the task hands the signal back to submitit, which requeues the same task; the
requeued run resumes the whole pack from those checkpoints. SIGTERM (``scancel``,
``scontrol requeue``, preemption) also checkpoints first; SLURM decides whether the job runs
again.

A job that fails is run again (resuming from its checkpoint) up to ``retries`` times, with the
other failed jobs of its pack; the jobs of the pack that are done are not run again. A job that
fails for good, or whose needed jobs are not done, records why in the store and the task still
exits 0: ``afterok`` then only orders the stages, the store says which jobs succeeded, and a
failure blocks exactly the jobs that need the failed one.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, List, Optional, Sequence

from submitit.helpers import Checkpointable

from kdflow.orchestrator.distributed import DistEnv, detect_env
from kdflow.orchestrator.metrics import headline
from kdflow.orchestrator.pack import Outcome, run_pack
from kdflow.orchestrator.runner import JobInterrupted, RunOptions
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore

log = logging.getLogger("kdflow.slurm")

#: What a task reports for one of its jobs: ``job_id``, ``status`` (done, failed, blocked) and
#: the headline ``metric`` or the ``error``.
TaskReport = Dict[str, Any]


def current_scheduler_id(environ: Dict[str, str] = os.environ) -> Optional[str]:
    """``<array job>_<task>`` inside an array task, the plain job id otherwise."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def task_threads(environ: Dict[str, str] = os.environ) -> Optional[int]:
    """The torch threads of a job run by this task: its CPUs (``SLURM_CPUS_PER_TASK``, the
    launcher's ``cpus_per_task``); None outside a SLURM allocation (torch's own count)."""
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus else None


class StoreTask(Checkpointable):
    """Runs the jobs ``job_ids`` (one pack) of the store at ``output_dir`` (called as
    ``task(job_ids)``); returns a :data:`TaskReport` per job, in that order."""

    def __init__(self, output_dir: str, options: RunOptions, retries: int) -> None:
        self.output_dir = output_dir
        self.options = options
        self.retries = retries

    def __call__(self, job_ids: Sequence[str]) -> List[TaskReport]:
        store = JobStore(os.path.join(self.output_dir, "jobs"))
        dist = detect_env()
        main = dist is None or dist.is_main
        reports: Dict[str, TaskReport] = {}
        runnable = []
        for job_id in job_ids:
            if main:
                self._record_scheduler_id(store, job_id)
            blocked = self._blocked_by(store, job_id)
            if blocked is None:
                runnable.append(store.spec(job_id))
                continue
            if main:
                store.update_state(job_id, status="blocked", error=blocked)
            reports[job_id] = {"job_id": job_id, "status": "blocked", "error": blocked}
        if runnable:
            reports.update(self._run_with_retries(store, runnable, dist))
        return [reports[job_id] for job_id in job_ids]

    def _record_scheduler_id(self, store: JobStore, job_id: str) -> None:
        scheduler_id = current_scheduler_id()
        state = store.state(job_id)
        if scheduler_id and scheduler_id not in state.scheduler_ids:
            store.update_state(job_id, scheduler_ids=[*state.scheduler_ids, scheduler_id])

    @staticmethod
    def _blocked_by(store: JobStore, job_id: str) -> Optional[str]:
        for need in store.spec(job_id).needs:
            if not store.is_done(need):
                state = store.state(need)
                why = f": {state.error}" if state.error else ""
                return f"needs job {need} ({store.spec(need).title}), which is {state.status}{why}"
        return None

    def _run_with_retries(self, store: JobStore, specs: List[JobSpec],
                          dist: Optional[DistEnv]) -> Dict[str, TaskReport]:
        """Run the pack ``specs``, then its failed jobs again (from their checkpoints) until
        they succeed or have had ``retries`` more attempts; a preemption raises
        :class:`JobInterrupted` (after handing SIGUSR2 back to submitit) once every job is
        checkpointed."""
        options = RunOptions(**{**self.options.__dict__, "distributed": dist,
                                "threads": task_threads()})
        reports: Dict[str, TaskReport] = {}
        errors: Dict[str, str] = {}
        pending = specs
        for attempt in range(self.retries + 1):
            outcomes = self._run_pack(pending, store, options)
            _raise_if_interrupted(outcomes)
            for spec in pending:
                outcome = outcomes[spec.job_id]
                if isinstance(outcome, BaseException):
                    log.error("job %s failed (attempt %d of %d)", spec.job_id, attempt + 1,
                              self.retries + 1, exc_info=outcome)
                    errors[spec.job_id] = f"{type(outcome).__name__}: {outcome}"
                else:
                    reports[spec.job_id] = {"job_id": spec.job_id, "status": "done",
                                            "metric": headline(outcome)}
            pending = [spec for spec in pending if spec.job_id not in reports]
            if not pending:
                break
        for spec in pending:
            error = errors[spec.job_id]
            if dist is None or dist.is_main:
                store.update_state(spec.job_id, status="failed",
                                   error=f"{error} (after {self.retries + 1} attempts)")
            reports[spec.job_id] = {"job_id": spec.job_id, "status": "failed", "error": error}
        return reports

    @staticmethod
    def _run_pack(specs: List[JobSpec], store: JobStore,
                  options: RunOptions) -> Dict[str, Outcome]:
        """:func:`run_pack` of ``specs``; an error of the pack as a whole (not of one member)
        becomes every member's outcome."""
        try:
            return run_pack(specs, store, options)
        except Exception as err:
            return {spec.job_id: err for spec in specs}


def _raise_if_interrupted(outcomes: Dict[str, Outcome]) -> None:
    """Raise the :class:`JobInterrupted` of a pack that a preemption signal stopped (every
    member then has its checkpoint on disk); on SIGUSR2 first hand the signal back to
    submitit, whose handler (restored once the runner returned) checkpoints this task's call
    and requeues it with ``scontrol requeue``, then exits."""
    stopped = [o for o in outcomes.values() if isinstance(o, JobInterrupted)]
    if not stopped:
        return
    if stopped[0].signum == signal.SIGUSR2:
        os.kill(os.getpid(), signal.SIGUSR2)
    raise stopped[0]
