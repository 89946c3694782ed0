"""Ray as the execution engine of a study: one Ray task per unfinished job.

Each task gets the ObjectRefs of the jobs it needs as arguments, so Ray starts it only once
they have ended; they resolve to an :class:`Outcome`, and a task whose needed job did not end
``done`` marks itself ``blocked`` in the store instead of running. Jobs already done are never
submitted. The embedded Ray (``address: null``) lives for one run; a cluster given by address
(``auto``, ``ray://...``) is joined and left running.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional

from kdflow.launch.local import Summary
from kdflow.launch.ray_config import RaySettings
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.progress import StudyProgress, progress_style, result_text
from kdflow.orchestrator.runner import JobInterrupted, RunOptions, run_job_in_store
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

# how long Ctrl-C waits for the running jobs to write their checkpoints, in seconds
CANCEL_GRACE_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """How one job's task ended: status is done, failed, blocked or interrupted."""

    job_id: str
    status: str
    error: Optional[str] = None


def _blocked_by(needs: tuple) -> Optional[Outcome]:
    """The first needed job that did not end ``done``, if any."""
    return next((need for need in needs if need.status != "done"), None)


def run_stored_job(output_dir: str, job_id: str, options: RunOptions, attempts: int,
                   *needs: Outcome) -> Outcome:
    """Body of a job's Ray task: run ``job_id`` (up to ``attempts`` times, each resuming from the
    last checkpoint) with ``options.threads`` torch threads, unless one of ``needs`` did not
    succeed."""
    need = _blocked_by(needs)
    if need is not None and need.status == "interrupted":
        return Outcome(job_id, "interrupted", f"needs job {need.job_id}, which was interrupted")
    if need is not None:
        why = need.error if need.status == "blocked" else f"needs job {need.job_id}, which failed"
        JobStore(os.path.join(output_dir, "jobs")).update_state(job_id, status="blocked", error=why)
        return Outcome(job_id, "blocked", why)
    error = None
    for _ in range(attempts):
        try:
            run_job_in_store(output_dir, job_id, options)
            return Outcome(job_id, "done")
        except JobInterrupted as err:
            return Outcome(job_id, "interrupted", str(err))
        except Exception as err:  # the job records it in its state; run it again from its checkpoint
            error = f"{type(err).__name__}: {err}"
    return Outcome(job_id, "failed", error)


@contextlib.contextmanager
def ray_session(settings: RaySettings) -> Iterator[Any]:
    """The ``ray`` module, connected: an embedded Ray, or the cluster at ``settings.address``.

    A connection already open in this process (``ray.init`` by the caller) is used as it is
    and left open; one opened here is shut down at the end.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=settings.address or None, num_cpus=settings.num_cpus, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def check_fits(ray: Any, settings: RaySettings, jobs: List[JobSpec]) -> None:
    """Refuse jobs that ask for more CPUs or GPUs than the whole Ray cluster has (they would
    wait forever)."""
    total = ray.cluster_resources()
    for stage in sorted({job.stage for job in jobs}):
        resources = settings.stage_resources(stage)
        where = f"launcher.stages.{stage}" if settings.stages.get(stage) else "launcher.resources"
        for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            asked, has = getattr(resources, name), total.get(key, 0)
            if asked > has:
                raise ConfigError(f"{where}.{name}", f"the {stage} jobs ask for {asked}, the Ray "
                                  f"cluster has {has:g} in all", fix=f"set {where}.{name} <= {has:g}")


def submit(ray: Any, jobs: List[JobSpec], output_dir: str, options: RunOptions,
           settings: RaySettings) -> Dict[str, Any]:
    """One task per job of ``jobs`` (in dependency order), by job id; each is passed the
    ObjectRefs of the submitted jobs it needs. A job runs with as many torch threads as it
    holds CPUs (:attr:`RayResources.threads`), wherever Ray places it."""
    task = ray.remote(run_stored_job)
    quiet = RunOptions(**{**options.__dict__, "progress": False})
    refs: Dict[str, Any] = {}
    for job in jobs:
        resources = settings.stage_resources(job.stage)
        needs = [refs[need] for need in job.needs if need in refs]
        refs[job.job_id] = task.options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=settings.retries,
            name=f"kdflow {job.title}",
        ).remote(output_dir, job.job_id, replace(quiet, threads=resources.threads),
                 settings.retries + 1, *needs)
    return refs


def _lost(job: JobSpec, summary: Summary, error: BaseException, store: JobStore) -> Outcome:
    """The outcome of a task Ray gave up on (its worker died ``retries + 1`` times), recorded."""
    need = next((n for n in job.needs if n in summary.failed or n in summary.blocked), None)
    if need is not None:
        why = summary.blocked.get(need, f"needs job {need}, which failed")
        store.update_state(job.job_id, status="blocked", error=why)
        return Outcome(job.job_id, "blocked", why)
    why = f"{type(error).__name__}: {error}"
    store.update_state(job.job_id, status="failed", error=why)
    return Outcome(job.job_id, "failed", why)


def settle(summary: Summary, outcome: Outcome) -> None:
    """Count ``outcome`` in ``summary``."""
    if outcome.status == "done":
        summary.done.append(outcome.job_id)
    elif outcome.status == "failed":
        summary.failed[outcome.job_id] = outcome.error or "failed"
    elif outcome.status == "blocked":
        summary.blocked[outcome.job_id] = outcome.error or "blocked"
    else:
        summary.interrupted.append(outcome.job_id)


def collect(ray: Any, refs: Dict[str, Any], graph: JobGraph, store: JobStore, summary: Summary,
            progress: StudyProgress) -> None:
    """Wait for every task of ``refs``, settling each as it ends and telling ``progress``."""
    jobs = graph.by_id()
    waiting = {ref: job_id for job_id, ref in refs.items()}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        job_id = waiting.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            outcome = _lost(jobs[job_id], summary, err, store)
        settle(summary, outcome)
        progress.ended(job_id, outcome.status, result_text(store.result(job_id))
                       if outcome.status == "done" else outcome.error or "")


def interrupt(ray: Any, refs: Dict[str, Any], summary: Summary) -> None:
    """After Ctrl-C: cancel the tasks that have not ended (running jobs checkpoint and stop)
    and count them as interrupted."""
    ended = {*summary.done, *summary.failed, *summary.blocked, *summary.interrupted}
    left = {job_id: ref for job_id, ref in refs.items() if job_id not in ended}
    for ref in left.values():
        ray.cancel(ref)
    ray.wait(list(left.values()), num_returns=len(left), timeout=CANCEL_GRACE_S)
    summary.interrupted.extend(left)


def run_ray(graph: JobGraph, output_dir: str, options: RunOptions, settings: RaySettings) -> Summary:
    """Run every unfinished job of ``graph`` as a Ray task; jobs already done are skipped.

    A job starts once the jobs it needs are done; a failed job marks the jobs that need it
    ``blocked`` and the rest of the study goes on.
    """
    started = time.time()
    store = JobStore(os.path.join(output_dir, "jobs"))
    summary = Summary()
    todo = []
    for job in graph.jobs:
        store.add(job)
        if store.is_done(job.job_id):
            summary.skipped.append(job.job_id)
        else:
            todo.append(job)
    if todo:
        with ray_session(settings) as ray:
            check_fits(ray, settings, todo)
            refs = submit(ray, todo, output_dir, options, settings)
            progress = StudyProgress(graph.study, {job.job_id: job.title for job in graph.jobs},
                                     progress_style(options.progress), skipped=len(summary.skipped))
            try:
                collect(ray, refs, graph, store, summary, progress)
            except KeyboardInterrupt:
                interrupt(ray, refs, summary)
            finally:
                progress.close()
    summary.wall_time_s = time.time() - started
    return summary
