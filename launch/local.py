"""The local launcher: runs a job graph on this machine, in dependency order, N jobs at a time."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from orchestrator.runner import JobInterrupted, RunOptions, run_job_in_store
from orchestrator.store import JobStore
from orchestrator.study import JobGraph


@dataclass
class Summary:
    """What happened to each job of one launch, by job id."""

    skipped: List[str] = field(default_factory=list)
    done: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    blocked: Dict[str, str] = field(default_factory=dict)
    interrupted: List[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.failed or self.blocked or self.interrupted)

    def render(self) -> str:
        lines = [f"study summary: {len(self.done)} run, {len(self.skipped)} skipped (already done), "
                 f"{len(self.failed)} failed, {len(self.blocked)} blocked, "
                 f"{len(self.interrupted)} interrupted, in {self.wall_time_s:.1f} s"]
        lines += [f"  failed  {job}: {why}" for job, why in self.failed.items()]
        lines += [f"  blocked {job}: {why}" for job, why in self.blocked.items()]
        return "\n".join(lines)


#: prctl(2) option: the signal a process gets when the thread that started it exits.
PR_SET_PDEATHSIG = 1


def _init_worker(threads: int, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _stop_with_parent(parent)


def _stop_with_parent(parent: int) -> None:
    """On Linux, have the kernel send this worker SIGTERM when ``parent`` (the ``kdflow run``
    process) dies, even by SIGKILL: the worker's job then checkpoints and stops as on any
    preemption (:func:`_run_in_worker` then ends the worker), instead of training on with
    nobody to collect its result."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _run_in_worker(output_dir: str, job_id: str, options: RunOptions, parent: int) -> None:
    """A pool worker's job; if ``parent`` died meanwhile, the worker exits once the job has
    stopped: the pool's queues never report a dead parent to a worker waiting for more work,
    as every worker holds their write ends too."""
    try:
        run_job_in_store(output_dir, job_id, options)
    finally:
        if os.getppid() != parent:
            os._exit(1)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def run_local(graph: JobGraph, output_dir: str, options: RunOptions,
              workers: Optional[int] = None) -> Summary:
    """Run every unfinished job of ``graph``; a job starts once the jobs it needs are done.

    ``workers`` processes run jobs side by side (default: one per core, each with an equal
    share of the cores as torch threads); with one worker, jobs run in this process. A failed
    job marks the jobs that need it ``blocked`` and the rest of the study goes on.
    """
    started = time.time()
    store = JobStore(os.path.join(output_dir, "jobs"))
    summary = Summary()
    pending: Dict[str, tuple[str, ...]] = {}
    for job in graph.jobs:
        store.add(job)
        if store.is_done(job.job_id):
            summary.skipped.append(job.job_id)
        else:
            pending[job.job_id] = job.needs
    workers = workers or default_workers()
    workers = max(1, min(workers, len(pending) or 1))
    finished = set(summary.skipped)
    titles = {job.job_id: job.title for job in graph.jobs}

    def ready() -> List[str]:
        return [j for j, needs in pending.items() if all(n in finished for n in needs)]

    def block_dependents(job_id: str, why: str) -> None:
        for other, needs in list(pending.items()):
            if job_id in needs:
                del pending[other]
                summary.blocked[other] = why
                store.update_state(other, status="blocked", error=why)
                block_dependents(other, why)

    def settle(job_id: str, error: Optional[BaseException]) -> None:
        if error is None:
            finished.add(job_id)
            summary.done.append(job_id)
        elif isinstance(error, JobInterrupted):
            summary.interrupted.append(job_id)
        else:
            summary.failed[job_id] = f"{type(error).__name__}: {error}"
            block_dependents(job_id, f"needs job {job_id} ({titles[job_id]}), which failed: "
                                     f"{summary.failed[job_id]}")

    if workers == 1:
        while (todo := ready()) and not summary.interrupted:
            job_id = todo[0]
            del pending[job_id]
            try:
                run_job_in_store(output_dir, job_id, options)
                settle(job_id, None)
            except (JobInterrupted, Exception) as err:
                settle(job_id, err)
    else:
        _run_pool(pending, ready, settle, output_dir, options, workers, summary)
    summary.wall_time_s = time.time() - started
    return summary


def _run_pool(pending, ready, settle, output_dir: str, options: RunOptions, workers: int,
              summary: Summary) -> None:
    threads = max(1, default_workers() // workers)
    context = multiprocessing.get_context("spawn")
    free_slots = list(range(workers))
    running: Dict[Future, tuple[str, int]] = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads, os.getpid())) as pool:
        while True:
            if not summary.interrupted:
                for job_id in ready():
                    if not free_slots:
                        break
                    slot = free_slots.pop(0)
                    del pending[job_id]
                    slot_options = RunOptions(**{**options.__dict__, "progress_position": slot})
                    future = pool.submit(_run_in_worker, output_dir, job_id, slot_options,
                                         os.getpid())
                    running[future] = (job_id, slot)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job_id, slot = running.pop(future)
                free_slots.append(slot)
                free_slots.sort()
                settle(job_id, future.exception())
