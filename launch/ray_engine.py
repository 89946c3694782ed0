"""Ray as the execution engine of a study: one Ray task per pack of unfinished jobs.

Distillation jobs of one teacher and batch stream that become ready together run as a pack
(:mod:`orchestrator.pack`: one batch load and one teacher forward per batch for all of them);
every other job, and every job with ``pack: 1``, is a pack of its own. Each task gets the
ObjectRefs of the packs its jobs need, so Ray starts it only once they have ended; they
resolve to one :class:`Outcome` per job, and a job whose needed job did not end ``done`` marks
itself ``blocked`` in the store instead of running. Each job's outcome is its own: a failed
member blocks its dependents only, and only failed members are run again. Jobs already done
are never submitted. The embedded Ray (``address: null``) lives for one run; a cluster given by
address (``auto``, ``ray://...``) is joined and left running.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from kdflow.launch.local import Summary, job_end
from kdflow.launch.ray_config import RayResources, RaySettings
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.pack import Outcome as PackEnd
from kdflow.orchestrator.pack import form_packs, pack_id, run_pack_in_store
from kdflow.orchestrator.progress import StudyProgress, progress_style, result_text
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

# how long Ctrl-C waits for the running jobs to write their checkpoints, in seconds
CANCEL_GRACE_S = 60.0

#: A pack's key in the task table: its jobs' ids, in pack order.
PackIds = Tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """How one job's run ended: status is done, failed, blocked or interrupted."""

    job_id: str
    status: str
    error: Optional[str] = None


def _blocked_by(needs: Sequence[Outcome]) -> Optional[Outcome]:
    """The first needed job that did not end ``done``, if any."""
    return next((need for need in needs if need.status != "done"), None)


def _held_back(store: JobStore, job_id: str, needs: Sequence[Outcome]) -> Optional[Outcome]:
    """``job_id``'s outcome when one of ``needs`` did not succeed (recorded ``blocked`` in its
    state unless the need was interrupted); None when it may run."""
    need = _blocked_by(needs)
    if need is None:
        return None
    if need.status == "interrupted":
        return Outcome(job_id, "interrupted", f"needs job {need.job_id}, which was interrupted")
    why = need.error if need.status == "blocked" else f"needs job {need.job_id}, which failed"
    store.update_state(job_id, status="blocked", error=why)
    return Outcome(job_id, "blocked", why)


def _outcome(job_id: str, end: PackEnd) -> Outcome:
    """``job_id``'s :class:`Outcome` from how its run in a pack ended (a result or an error)."""
    ended = job_end(end)
    return Outcome(job_id, ended.status, ended.error)


def _run_once(output_dir: str, job_ids: List[str], options: RunOptions) -> Dict[str, Outcome]:
    """Run the jobs ``job_ids`` as one pack (one job: alone); each one's outcome by job id."""
    try:
        ends = run_pack_in_store(output_dir, job_ids, options)
    except Exception as err:  # the pack as a whole failed (its store, its data): every member did
        ends = dict.fromkeys(job_ids, err)
    return {job_id: _outcome(job_id, end) for job_id, end in ends.items()}


def run_members(output_dir: str, job_ids: List[str], options: RunOptions,
                attempts: int) -> Dict[str, Outcome]:
    """Run the pack ``job_ids`` up to ``attempts`` times, each time only the members that
    failed (each resuming from its last checkpoint), until none fails or one is interrupted."""
    outcomes: Dict[str, Outcome] = {}
    left = list(job_ids)
    for _ in range(attempts):
        if not left:
            break
        outcomes.update(_run_once(output_dir, left, options))
        statuses = {outcomes[job_id].status for job_id in left}
        left = [] if "interrupted" in statuses else [
            job_id for job_id in left if outcomes[job_id].status == "failed"]
    return outcomes


def run_stored_pack(output_dir: str, members: Dict[str, Tuple[str, ...]], options: RunOptions,
                    attempts: int, *needs: List[Outcome]) -> List[Outcome]:
    """Body of a pack's Ray task: run the jobs of ``members`` (job id -> ids of the jobs it
    needs) with ``options.threads`` torch threads, each unless one of its needed jobs, among
    the outcomes ``needs`` of the packs it waited for, did not succeed; one outcome per member,
    in order."""
    store = JobStore(os.path.join(output_dir, "jobs"))
    ended = {outcome.job_id: outcome for outcomes in needs for outcome in outcomes}
    outcomes: Dict[str, Outcome] = {}
    for job_id, job_needs in members.items():
        held = _held_back(store, job_id, [ended[need] for need in job_needs if need in ended])
        if held is not None:
            outcomes[job_id] = held
    runnable = [job_id for job_id in members if job_id not in outcomes]
    outcomes.update(run_members(output_dir, runnable, options, attempts))
    return [outcomes[job_id] for job_id in members]


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


def _levels(jobs: Sequence[JobSpec]) -> Dict[str, int]:
    """Each job's depth among ``jobs`` (in dependency order): 0 for a job that needs none of
    them, else one more than the deepest job it needs."""
    levels: Dict[str, int] = {}
    for job in jobs:
        levels[job.job_id] = 1 + max((levels[n] for n in job.needs if n in levels), default=-1)
    return levels


def _slots(total: Mapping[str, float], resources: RayResources) -> int:
    """How many tasks holding ``resources`` the cluster with ``total`` resources runs at once
    (at least one)."""
    fits = [total.get("CPU", 0) / resources.num_cpus]
    if resources.num_gpus:
        fits.append(total.get("GPU", 0) / resources.num_gpus)
    return max(1, math.floor(min(fits)))


def plan_packs(jobs: Sequence[JobSpec], settings: RaySettings,
               total: Mapping[str, float]) -> List[List[JobSpec]]:
    """``jobs`` (in dependency order) as packs of at most ``settings.pack_size``, in an order
    where every pack comes after the packs its jobs need.

    Only jobs of one depth (which become ready together) and with the same resources share a
    pack (:func:`orchestrator.pack.form_packs`); the packs of one depth are split until they
    fill the cluster's slots for those resources (``total``: the cluster's resources), so
    packing never leaves Ray cores idle.
    """
    levels = _levels(jobs)
    order = {job.job_id: index for index, job in enumerate(jobs)}
    groups: Dict[Tuple[int, float, float], List[JobSpec]] = {}
    for job in jobs:
        resources = settings.stage_resources(job.stage)
        key = (levels[job.job_id], resources.num_cpus, resources.num_gpus)
        groups.setdefault(key, []).append(job)
    packs = [pack for (_, cpus, gpus), group in groups.items()
             for pack in form_packs(group, settings.pack_size,
                                    _slots(total, RayResources(cpus, gpus)))]
    return sorted(packs, key=lambda pack: (levels[pack[0].job_id], order[pack[0].job_id]))


def _task_name(pack: Sequence[JobSpec]) -> str:
    """The Ray task's name: the job's title, or the pack's id and its jobs' titles."""
    if len(pack) == 1:
        return f"kdflow {pack[0].title}"
    return f"kdflow {pack_id([job.job_id for job in pack])}: " + ", ".join(j.title for j in pack)


def submit(ray: Any, packs: List[List[JobSpec]], output_dir: str, options: RunOptions,
           settings: RaySettings) -> Dict[PackIds, Any]:
    """One task per pack of ``packs`` (each after the packs its jobs need), by its jobs' ids;
    each is passed the ObjectRefs of the submitted packs its jobs need. A pack asks for the
    resources of one job of its stage and runs with as many torch threads as it holds CPUs
    (:attr:`RayResources.threads`), wherever Ray places it."""
    task = ray.remote(run_stored_pack)
    quiet = replace(options, progress=False)
    refs: Dict[PackIds, Any] = {}
    owner: Dict[str, PackIds] = {}
    for pack in packs:
        ids = tuple(job.job_id for job in pack)
        resources = settings.stage_resources(pack[0].stage)
        needed = dict.fromkeys(owner[need] for job in pack for need in job.needs if need in owner)
        refs[ids] = task.options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=settings.retries,
            name=_task_name(pack),
        ).remote(output_dir, {job.job_id: job.needs for job in pack},
                 replace(quiet, threads=resources.threads), settings.retries + 1,
                 *(refs[other] for other in needed))
        owner.update(dict.fromkeys(ids, ids))
    return refs


def _lost(job: JobSpec, summary: Summary, error: BaseException, store: JobStore) -> Outcome:
    """The outcome of ``job`` when Ray gave up on its pack's task (its worker died ``retries + 1``
    times), recorded: done if it had finished before."""
    if store.is_done(job.job_id):
        return Outcome(job.job_id, "done")
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


def collect(ray: Any, refs: Dict[PackIds, Any], graph: JobGraph, store: JobStore,
            summary: Summary, progress: StudyProgress) -> None:
    """Wait for every task of ``refs``, settling each of its jobs as it ends and telling
    ``progress``."""
    jobs = graph.by_id()
    waiting = {ref: ids for ids, ref in refs.items()}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        ids = waiting.pop(ready[0])
        try:
            outcomes = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            outcomes = [_lost(jobs[job_id], summary, err, store) for job_id in ids]
        for outcome in outcomes:
            settle(summary, outcome)
            progress.ended(outcome.job_id, outcome.status, result_text(store.result(outcome.job_id))
                           if outcome.status == "done" else outcome.error or "")


def interrupt(ray: Any, refs: Dict[PackIds, Any], summary: Summary) -> None:
    """After Ctrl-C: cancel the tasks that have not ended (running jobs checkpoint and stop)
    and count their jobs as interrupted."""
    ended = {*summary.done, *summary.failed, *summary.blocked, *summary.interrupted}
    left = {ids: ref for ids, ref in refs.items() if not ended.issuperset(ids)}
    for ref in left.values():
        ray.cancel(ref)
    ray.wait(list(left.values()), num_returns=len(left), timeout=CANCEL_GRACE_S)
    summary.interrupted.extend(job_id for ids in left for job_id in ids if job_id not in ended)


def run_ray(graph: JobGraph, output_dir: str, options: RunOptions, settings: RaySettings) -> Summary:
    """Run every unfinished job of ``graph`` in a Ray task, alone or in a pack of up to
    ``settings.pack`` jobs (:func:`plan_packs`); jobs already done are skipped.

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
            packs = plan_packs(todo, settings, ray.cluster_resources())
            refs = submit(ray, packs, output_dir, options, settings)
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
