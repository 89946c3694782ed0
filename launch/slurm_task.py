"""What one SLURM array task runs: a kdflow job from the job store, with retries and requeue.

The task is a submitit ``Checkpointable``: when SLURM signals SIGUSR2 (the time limit is near,
or ``scancel --signal=USR2``), the runner writes a checkpoint and stops, and the task hands the
signal back to submitit, which requeues the same task; the requeued run resumes from that
checkpoint. SIGTERM (``scancel``, ``scontrol requeue``, preemption) also checkpoints first;
SLURM decides whether the job runs again.

A job that fails is run again (resuming from its checkpoint) up to ``retries`` times. A job
that fails for good, or whose needed jobs are not done, records why in the store and the
task still exits 0: ``afterok`` then only orders the stages, the store says which jobs
succeeded, and a failure blocks exactly the jobs that need the failed one.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, Optional

from submitit.helpers import Checkpointable

from kdflow.orchestrator.distributed import DistEnv, detect_env
from kdflow.orchestrator.metrics import headline
from kdflow.orchestrator.runner import JobInterrupted, RunOptions, run_job
from kdflow.orchestrator.store import JobStore

log = logging.getLogger("kdflow.slurm")


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
    """Runs the job ``job_id`` of the store at ``output_dir`` (called as ``task(job_id)``)."""

    def __init__(self, output_dir: str, options: RunOptions, retries: int) -> None:
        self.output_dir = output_dir
        self.options = options
        self.retries = retries

    def __call__(self, job_id: str) -> Dict[str, Any]:
        store = JobStore(os.path.join(self.output_dir, "jobs"))
        dist = detect_env()
        main = dist is None or dist.is_main
        if main:
            self._record_scheduler_id(store, job_id)
        blocked = self._blocked_by(store, job_id)
        if blocked:
            if main:
                store.update_state(job_id, status="blocked", error=blocked)
            return {"job_id": job_id, "status": "blocked", "error": blocked}
        return self._run_with_retries(store, job_id, dist)

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

    def _run_with_retries(self, store: JobStore, job_id: str,
                          dist: Optional[DistEnv]) -> Dict[str, Any]:
        options = RunOptions(**{**self.options.__dict__, "distributed": dist,
                                "threads": task_threads()})
        spec = store.spec(job_id)
        for attempt in range(self.retries + 1):
            try:
                result = run_job(spec, store, options)
                return {"job_id": job_id, "status": "done", "metric": headline(result)}
            except JobInterrupted as interrupted:
                if interrupted.signum == signal.SIGUSR2:
                    # submitit's handler (restored once the runner returned) checkpoints this
                    # task's call and requeues it with `scontrol requeue`, then exits
                    os.kill(os.getpid(), signal.SIGUSR2)
                raise
            except Exception as err:  # a failed run: retry from the checkpoint, or give up
                log.exception("job %s failed (attempt %d of %d)", job_id, attempt + 1, self.retries + 1)
                error = f"{type(err).__name__}: {err}"
        if dist is None or dist.is_main:
            store.update_state(job_id, status="failed",
                               error=f"{error} (after {self.retries + 1} attempts)")
        return {"job_id": job_id, "status": "failed", "error": error}
