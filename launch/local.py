"""The local launcher: runs a job graph on this machine, in dependency order, N jobs at a time.

With more than one worker, each job runs in a worker process of a small pool supervised here
(:class:`_Pool`): the pool knows which job each worker runs, so a worker that dies (the kernel's
OOM killer sends SIGKILL) fails its job alone, with the reason in the job's state; the pool
starts a new worker for the next job and every other job goes on.

Every job runs with ``cores // workers`` torch threads (:func:`job_threads`), in a worker or,
with one worker (or one job left), in this process: a job resumed here computes exactly what
its first run in a worker would have.

Progress (:mod:`kdflow.orchestrator.progress`): on a terminal a study bar above one bar per
running job; elsewhere a line per job start and end and a periodic study summary line.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import Callable, Dict, List, Optional

from kdflow.orchestrator.pack import DEFAULT_PACK, Outcome, form_packs, run_pack_in_store
from kdflow.orchestrator.progress import BARS, StudyProgress, progress_style, result_text
from kdflow.orchestrator.runner import JobInterrupted, RunOptions
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph


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


@dataclass(frozen=True)
class JobEnd:
    """How one run of a job ended: status ``done``, ``failed`` or ``interrupted``, and why."""

    status: str
    error: Optional[str] = None


#: prctl(2) option: the signal a process gets when the thread that started it exits.
PR_SET_PDEATHSIG = 1
#: What a worker's death by a signal may mean, by signal.
DEATH_HINTS = {signal.SIGKILL: "possibly out of memory"}


def death_reason(exitcode: int) -> str:
    """Why a worker process ended without reporting its job, from its exit code, e.g.
    ``worker process killed by signal 9 (SIGKILL; possibly out of memory)``."""
    if exitcode >= 0:
        return f"worker process exited with code {exitcode} before reporting its job"
    sig = signal.Signals(-exitcode)
    hint = "".join(f"; {h}" for h in [DEATH_HINTS.get(sig)] if h)
    return f"worker process killed by signal {sig.value} ({sig.name}{hint})"


def default_workers() -> int:
    """One worker per core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def job_threads(workers: int) -> int:
    """The torch threads of every job run by a launch with ``workers`` workers: an equal share
    of the cores, whether the job runs in a worker or in this process."""
    return max(1, default_workers() // workers)


def job_end(outcome: Outcome) -> JobEnd:
    """A job's :class:`JobEnd` from its outcome in a pack: a result is ``done``."""
    if isinstance(outcome, JobInterrupted):
        return JobEnd("interrupted", str(outcome))
    if isinstance(outcome, BaseException):
        return JobEnd("failed", f"{type(outcome).__name__}: {outcome}")
    return JobEnd("done")


def run_and_report(output_dir: str, job_ids: List[str], options: RunOptions) -> Dict[str, JobEnd]:
    """Run the pack of jobs ``job_ids`` (one job: alone) of the store at ``output_dir`` and say
    how each ended (the runner records the same in each job's state)."""
    try:
        outcomes = run_pack_in_store(output_dir, job_ids, options)
    except Exception as err:
        return {job_id: JobEnd("failed", f"{type(err).__name__}: {err}") for job_id in job_ids}
    return {job_id: job_end(outcome) for job_id, outcome in outcomes.items()}


def _stop_with_parent(parent: int) -> None:
    """On Linux, have the kernel send this worker SIGTERM when ``parent`` (the ``kdflow run``
    process) dies, even by SIGKILL: the worker's job then checkpoints and stops as on any
    preemption (:func:`_worker_main` then ends the worker), instead of training on with
    nobody to collect its result."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(conn: Connection, parent: int) -> None:
    """A worker process: runs the packs ``(output_dir, job_ids, options)`` that ``parent``
    sends over ``conn``, one at a time, answering each with its jobs' :class:`JobEnd`; ends
    when ``parent`` closes ``conn`` or dies. Ctrl-C is the launcher's to handle (a job's run
    catches it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_parent(parent)
    while True:
        try:
            output_dir, job_ids, options = conn.recv()
        except EOFError:
            return
        ended = run_and_report(output_dir, job_ids, options)
        try:
            conn.send(ended)
        except OSError:  # nobody left to tell
            pass
        if os.getppid() != parent:
            os._exit(1)


@dataclass
class _Worker:
    """A worker process, the launcher's end of its pipe, its progress bar row and its pack."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    slot: int
    job_ids: List[str] = field(default_factory=list)


class _Pool:
    """Up to ``size`` worker processes (spawned, each told to stop with this process); a dead
    worker's slot gets a new worker when the next job starts."""

    def __init__(self, size: int, output_dir: str, options: RunOptions, store: JobStore) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.output_dir, self.options, self.store = output_dir, options, store
        self.free_slots = list(range(size))
        self.idle: List[_Worker] = []
        self.busy: List[_Worker] = []

    def has_room(self) -> bool:
        return bool(self.idle or self.free_slots)

    def free(self) -> int:
        """How many more packs can start now."""
        return len(self.idle) + len(self.free_slots)

    def start(self, job_ids: List[str]) -> None:
        """Run the pack ``job_ids`` on an idle worker, or on a new one in a free slot."""
        worker = self._take_worker()
        worker.job_ids = job_ids
        self.busy.append(worker)
        try:
            worker.conn.send((self.output_dir, job_ids,
                              replace(self.options, progress_position=worker.slot + 1)))
        except OSError:  # it died since: collect() reports the death
            pass

    def _take_worker(self) -> _Worker:
        """A live idle worker (dead ones free their slots), or a new one in a free slot."""
        while self.idle:
            worker = self.idle.pop(0)
            if worker.process.is_alive():
                return worker
            self._retire(worker)
        return self._spawn(self.free_slots.pop(0))

    def _spawn(self, slot: int) -> _Worker:
        conn, child = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(child, os.getpid()),
                                       name=f"kdflow-worker-{slot}")
        process.start()
        child.close()  # the worker's end lives in the worker alone: its death reads as EOF
        return _Worker(process, conn, slot)

    def collect(self) -> List[tuple[str, JobEnd]]:
        """Wait until a running pack ends; each job of the ended packs with how it ended."""
        ready = set(wait([w.conn for w in self.busy] + [w.process.sentinel for w in self.busy]))
        ended = [w for w in self.busy if w.conn in ready or w.process.sentinel in ready]
        return [item for w in ended for item in self._end_of(w).items()]

    def _end_of(self, worker: _Worker) -> Dict[str, JobEnd]:
        """The ends ``worker`` reported for its pack's jobs or, if it died first, how its
        death ended each."""
        self.busy.remove(worker)
        try:
            ended = worker.conn.recv()
        except (EOFError, OSError):
            ended = self._died(worker)
        if worker.process.is_alive():
            self.idle.append(worker)
        else:
            self._retire(worker)
        return ended

    def _died(self, worker: _Worker) -> Dict[str, JobEnd]:
        """Record in the store how ``worker``'s death ended each job of its pack (done if it
        got as far as its result, else failed with the death's reason), and return that."""
        worker.process.join()
        why = death_reason(worker.process.exitcode)
        ends = {}
        for job_id in worker.job_ids:
            if self.store.is_done(job_id):
                self.store.update_state(job_id, status="done")
                ends[job_id] = JobEnd("done")
            elif self.store.state(job_id).status in ("failed", "interrupted"):
                state = self.store.state(job_id)  # it ended before the worker died
                ends[job_id] = JobEnd(state.status, state.error)
            else:
                self.store.update_state(job_id, status="failed", error=why)
                ends[job_id] = JobEnd("failed", why)
        return ends

    def _retire(self, worker: _Worker) -> None:
        worker.conn.close()
        worker.process.join()
        self.free_slots.append(worker.slot)
        self.free_slots.sort()

    def stop_jobs(self) -> None:
        """SIGTERM every running job: each checkpoints and stops (and is then collected)."""
        for worker in self.busy:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)

    def close(self) -> None:
        """End every worker: idle ones at once, running ones once their jobs have stopped."""
        self.stop_jobs()
        for worker in self.idle + self.busy:
            self._retire(worker)
        self.idle, self.busy = [], []


def run_local(graph: JobGraph, output_dir: str, options: RunOptions,
              workers: Optional[int] = None, pack: int = DEFAULT_PACK) -> Summary:
    """Run every unfinished job of ``graph``; a job starts once the jobs it needs are done.

    ``workers`` processes run jobs side by side (default: one per core), every job with an
    equal share of the cores as torch threads (:func:`job_threads`, unless ``options.threads``
    says otherwise); with one worker, or one job to run, jobs run in this process. Ready
    distillation jobs of one teacher and batch stream run as packs of up to ``pack`` jobs
    (:mod:`orchestrator.pack`; 1: every job alone), split so no worker idles while a pack
    could be shared. A failed job (a dead worker's too) marks the jobs that need it
    ``blocked`` and the rest of the study goes on. ``options.progress`` turns the study's
    progress on (bars on a terminal, lines elsewhere: :func:`progress_style`).
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
    style = progress_style(options.progress)
    options = replace(options, threads=options.threads or job_threads(workers),
                      progress=style == BARS, progress_position=1)
    workers = max(1, min(workers, len(pending) or 1))
    finished = set(summary.skipped)
    specs = {job.job_id: job for job in graph.jobs}
    titles = {job.job_id: job.title for job in graph.jobs}
    progress = StudyProgress(graph.study, titles, style, skipped=len(summary.skipped))

    def ready_packs(slots: int) -> List[List[str]]:
        ready = [specs[j] for j, needs in pending.items() if all(n in finished for n in needs)]
        return [[s.job_id for s in p] for p in form_packs(ready, pack, slots)]

    def block_dependents(job_id: str, why: str) -> None:
        for other, needs in list(pending.items()):
            if job_id in needs:
                del pending[other]
                summary.blocked[other] = why
                store.update_state(other, status="blocked", error=why)
                progress.ended(other, "blocked", why)
                block_dependents(other, why)

    def settle(job_id: str, ended: JobEnd) -> None:
        if ended.status == "done":
            finished.add(job_id)
            summary.done.append(job_id)
            progress.ended(job_id, "done", result_text(store.result(job_id)))
            return
        progress.ended(job_id, ended.status, ended.error or "")
        if ended.status == "interrupted":
            summary.interrupted.append(job_id)
        else:
            summary.failed[job_id] = ended.error
            block_dependents(job_id, f"needs job {job_id} ({titles[job_id]}), which failed: "
                                     f"{ended.error}")

    def start(job_ids: List[str]) -> None:
        for job_id in job_ids:
            del pending[job_id]
            progress.started(job_id)

    try:
        if workers == 1:
            while (todo := ready_packs(1)) and not summary.interrupted:
                start(todo[0])
                for job_id, ended in run_and_report(output_dir, todo[0], options).items():
                    settle(job_id, ended)
        else:
            _run_pool(_Pool(workers, output_dir, options, store), ready_packs, start, settle,
                      summary)
    finally:
        progress.close()
    summary.wall_time_s = time.time() - started
    return summary


def _run_pool(pool: _Pool, ready: Callable[[int], List[List[str]]],
              start: Callable[[List[str]], None], settle: Callable[[str, JobEnd], None],
              summary: Summary) -> None:
    """Start ready packs on ``pool`` while it has room (``ready(free workers)`` forms them,
    ``start`` takes their jobs off the pending ones) and settle each job as it ends, until none
    runs. After Ctrl-C (or a job's interruption) nothing starts, and running jobs checkpoint
    and stop."""
    stopping = False
    try:
        while True:
            for job_ids in ready(pool.free()):
                if stopping or summary.interrupted or not pool.has_room():
                    break
                start(job_ids)
                pool.start(job_ids)
            if not pool.busy:
                break
            try:
                for job_id, ended in pool.collect():
                    settle(job_id, ended)
            except KeyboardInterrupt:
                stopping = True
                pool.stop_jobs()
    finally:
        pool.close()
