"""The slurm launcher: submits a study's whole job graph up front as submitit job arrays.

One array per (dependency level, stage, resources), chained with ``afterok``; each task of an
array runs one pack of distillation jobs that share a teacher and a batch stream (``pack``
jobs at most, :mod:`orchestrator.pack`) or one job alone, and every job of a pack records that
task's SLURM id as its own. A re-run submits only jobs that are neither done nor already
queued or running. The terminal may close
once ``submit_study`` returns: SLURM does the waiting. ``reconcile`` joins the job store with
``squeue``/``sacct`` for ``kdflow status``; ``cancel_study`` takes a study off the queue.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from kdflow.launch.slurm_config import SlurmSettings
from kdflow.methods.errors import ConfigError
from kdflow.launch.slurm_plan import ArrayPlan, plan_arrays
from kdflow.launch.slurm_queue import QueueEntry, SlurmQueue, require_slurm
from kdflow.launch.slurm_task import StoreTask
from kdflow.orchestrator.progress import BARS, LINES, SUMMARY_EVERY_S, progress_style
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph


@dataclass
class SubmittedArray:
    """One sbatch call: its SLURM job id, stage, how many jobs it runs in how many array tasks
    (fewer tasks than jobs: packs), and what it waits for."""

    scheduler_id: str
    stage: str
    jobs: int
    tasks: int
    dependency: str

    def render(self) -> str:
        after = f", after {self.dependency}" if self.dependency else ""
        packed = (f", packed into {self.tasks} task{'' if self.tasks == 1 else 's'}"
                  if self.tasks < self.jobs else "")
        return f"array {self.scheduler_id}: {self.jobs} {self.stage} jobs{after}{packed}"


@dataclass
class Submission:
    """What one ``submit_study`` call did."""

    arrays: List[SubmittedArray] = field(default_factory=list)
    already_done: int = 0
    in_flight: int = 0
    resubmitted_stuck: int = 0
    seconds: float = 0.0

    @property
    def submitted(self) -> int:
        return sum(a.jobs for a in self.arrays)

    def render(self) -> str:
        lines = [f"submitted {self.submitted} jobs in {len(self.arrays)} sbatch calls "
                 f"({self.already_done} already done, {self.in_flight} already queued or running"
                 + (f", {self.resubmitted_stuck} stuck on a failed dependency resubmitted"
                    if self.resubmitted_stuck else "") + f") in {self.seconds:.1f} s"]
        lines.extend(f"  {array.render()}" for array in self.arrays)
        return "\n".join(lines)


def submitit_folder(settings: SlurmSettings, output_dir: str, study: str) -> Path:
    """Where submitit keeps pickles and logs: ``<folder>/<slurm job id>/`` per job."""
    return Path(settings.folder or os.path.join(output_dir, "slurm", study)) / "%j"


def latest_scheduler_id(store: JobStore, job_id: str) -> Optional[str]:
    submissions = store.submissions(job_id)
    return submissions[-1] if submissions else None


def in_flight(graph: JobGraph, store: JobStore, live: Dict[str, QueueEntry]) -> Dict[str, str]:
    """Jobs of ``graph`` whose latest submission is queued or running: job id -> scheduler id."""
    found = {}
    for job in graph.jobs:
        scheduler_id = latest_scheduler_id(store, job.job_id)
        if scheduler_id in live and live[scheduler_id].live and not store.is_done(job.job_id):
            found[job.job_id] = scheduler_id
    return found


def _dependency(array: ArrayPlan, array_ids: List[str]) -> str:
    targets = [array_ids[i] for i in array.after_arrays] + array.after_ids
    return "afterok:" + ":".join(targets) if targets else ""


def check_resources(plan: List[ArrayPlan], settings: SlurmSettings, queue: SlurmQueue) -> None:
    """``sbatch --test-only`` once per distinct request of the plan; ConfigError naming the
    stage's setting when SLURM would refuse it, before anything is submitted."""
    checked = set()
    for array in plan:
        flags = tuple(array.resources.sbatch_flags())
        if flags in checked:
            continue
        checked.add(flags)
        problem = queue.test_only(list(flags))
        if problem is not None:
            where = f"launcher.stages.{array.stage}" if settings.stages.get(array.stage) else "launcher.resources"
            raise ConfigError(where, f"SLURM would refuse the {array.stage} jobs: {problem}",
                              fix=f"change {where} (partition, account, qos, mem_gb, time_min, "
                                  f"gpus_per_node...); `sinfo` lists what the cluster has")


def submit_study(graph: JobGraph, output_dir: str, options: RunOptions, settings: SlurmSettings,
                 queue: Optional[SlurmQueue] = None,
                 on_accepted: Optional[Callable[[], None]] = None) -> Submission:
    """Submit every job of ``graph`` that is not done and not already queued or running;
    ``on_accepted`` is called once SLURM has accepted the requests (``sbatch --test-only``),
    before anything is written."""
    import submitit

    require_slurm()
    started = time.time()
    queue = queue or SlurmQueue()
    store = JobStore(Path(output_dir) / "jobs")
    live = queue.live()
    stuck = [sid for job in graph.jobs
             if (sid := latest_scheduler_id(store, job.job_id)) in live and not live[sid].live]
    flying = in_flight(graph, store, live)
    done = {job.job_id for job in graph.jobs if store.is_done(job.job_id)}
    todo = {job.job_id for job in graph.jobs} - done - set(flying)
    plan = plan_arrays(graph, todo, flying, settings.stage_resources, settings.pack)
    check_resources(plan, settings, queue)  # before the store holds anything of this study
    if on_accepted is not None:
        on_accepted()
    for job in graph.jobs:
        store.add(job)
    if stuck:  # pending on a dependency that failed hard: they would never run; replace them
        queue.cancel(stuck)
    submission = Submission(already_done=len(done), in_flight=len(flying), resubmitted_stuck=len(stuck))
    task = StoreTask(output_dir, RunOptions(**{**options.__dict__, "progress": False}), settings.retries)
    folder = submitit_folder(settings, output_dir, graph.study)
    array_ids: List[str] = []
    for array in plan:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=settings.max_requeues,
                                          python=settings.python)
        dependency = _dependency(array, array_ids)
        extra = {**array.resources.additional, **({"dependency": dependency} if dependency else {})}
        executor.update_parameters(
            **array.resources.executor_parameters(), array_parallelism=settings.array_parallelism,
            job_name=f"{settings.job_name}-{graph.study}-{array.stage}", setup=list(settings.setup),
            stderr_to_stdout=True, additional_parameters=extra)
        jobs = executor.map_array(task, array.tasks)
        for job_ids, job in zip(array.tasks, jobs):
            for job_id in job_ids:
                store.record_submission(job_id, job.job_id)
        array_ids.append(jobs[0].job_id.split("_")[0])
        submission.arrays.append(SubmittedArray(array_ids[-1], array.stage, len(array.job_ids),
                                                len(jobs), dependency))
    submission.seconds = time.time() - started
    return submission


@dataclass(frozen=True)
class JobView:
    """One job as ``kdflow status`` shows it: the store's record joined with the scheduler's."""

    status: str
    scheduler_id: str = ""
    scheduler_state: str = ""
    note: str = ""


def reconcile(graph: JobGraph, store: JobStore, queue: SlurmQueue) -> Dict[str, JobView]:
    """The state of each job: done and failed/blocked from the store; queued/running from
    squeue; jobs the store thinks are alive but SLURM has ended (killed, out of memory, node
    failure, cancelled) from sacct, shown as ``lost``."""
    live = queue.live()
    views: Dict[str, JobView] = {}
    ended: Dict[str, str] = {}
    for job in graph.jobs:
        state = store.state(job.job_id)
        scheduler_id = latest_scheduler_id(store, job.job_id) or ""
        entry = live.get(scheduler_id)
        if store.is_done(job.job_id):
            views[job.job_id] = JobView("done", scheduler_id)
        elif entry is not None and entry.live:
            status = "queued" if entry.state == "PENDING" else (
                "requeued" if entry.state.startswith("REQUEUE") else "running")
            views[job.job_id] = JobView(status, scheduler_id, entry.state, entry.reason
                                        if entry.reason not in ("None", "") else "")
        elif entry is not None:
            views[job.job_id] = JobView("stuck", scheduler_id, entry.state, entry.reason)
        elif scheduler_id and state.status in ("pending", "running", "interrupted"):
            ended[job.job_id] = scheduler_id
        else:
            views[job.job_id] = JobView(state.status, scheduler_id, "", state.error or "")
    accounting = queue.accounting(ended.values()) if ended else {}
    for job_id, scheduler_id in ended.items():
        entry = accounting.get(scheduler_id)
        slurm_state = entry.state if entry else "UNKNOWN"
        views[job_id] = JobView("lost", scheduler_id, slurm_state,
                                f"SLURM ended it ({slurm_state}"
                                + (f", exit {entry.reason}" if entry else "") + "); kdflow run resubmits it")
    return views


def cancel_study(graph: JobGraph, store: JobStore, queue: Optional[SlurmQueue] = None) -> List[str]:
    """Cancel the study's queued and running jobs; returns the scheduler ids cancelled (one per
    array task: the jobs of a pack share it).

    Running jobs checkpoint on SLURM's SIGTERM (their state becomes ``interrupted``); queued
    ones are marked ``cancelled``. Done jobs are untouched; ``kdflow run`` submits the rest again.
    """
    queue = queue or SlurmQueue()
    live = queue.live()
    targets = {}
    for job in graph.jobs:
        scheduler_id = latest_scheduler_id(store, job.job_id)
        if scheduler_id in live and not store.is_done(job.job_id):
            targets[job.job_id] = scheduler_id
    if targets:
        queue.cancel(list(targets.values()))
    for job_id, scheduler_id in targets.items():
        if live[scheduler_id].state == "PENDING":
            store.update_state(job_id, status="cancelled", error="cancelled by kdflow cancel")
    return sorted(set(targets.values()))


ACTIVE = ("queued", "running", "requeued")


def wait_for_study(graph: JobGraph, store: JobStore, queue: SlurmQueue, poll_s: float,
                   progress: bool = True) -> Dict[str, JobView]:
    """Poll until no job of the study is queued or running, showing how many jobs are in each
    state: a bar over the ended ones on a terminal, else a line whenever the counts change and
    at least every :data:`SUMMARY_EVERY_S` seconds (:func:`progress_style`).

    One squeue call per poll (plus one sacct call when jobs vanished from the queue).
    """
    from tqdm import tqdm

    style = progress_style(progress)
    bar = tqdm(total=len(graph.jobs), desc=f"{graph.study} on SLURM", unit="job",
               disable=style != BARS, dynamic_ncols=True)
    said, said_at = "", 0.0
    try:
        while True:
            views = reconcile(graph, store, queue)
            counts: Dict[str, int] = {}
            for view in views.values():
                counts[view.status] = counts.get(view.status, 0) + 1
            text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            bar.n = sum(n for status, n in counts.items() if status not in ACTIVE)
            bar.set_postfix_str(text)
            if style == LINES and (text != said or time.monotonic() - said_at >= SUMMARY_EVERY_S):
                print(f"[{graph.study} on SLURM] {len(graph.jobs)} jobs: {text}", flush=True)
                said, said_at = text, time.monotonic()
            if not any(status in ACTIVE for status in counts):
                return views
            time.sleep(poll_s)
    finally:
        bar.close()
