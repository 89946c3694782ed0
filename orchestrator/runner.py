"""The job runner: the single entry point that runs one teacher or distillation job.

Every launcher (local worker processes, SLURM, Ray) calls :func:`run_job` for a job run alone,
or :func:`orchestrator.pack.run_pack` for a pack of jobs that share one data pass and one
teacher forward; both keep a job's state, lock and MLflow run the same way
(:func:`begin_job` ... :func:`end_job`) and drive the same training object
(:class:`orchestrator.training.JobTraining`). Each launcher states the torch thread count in
:attr:`RunOptions.threads`, the run uses it wherever it runs, and ``result.json`` records it
(``threads``) with the job's provenance (:mod:`orchestrator.provenance`).

With ``RunOptions.distributed`` (``world_size >= 2``) the process runs as one rank of a
multi-process job (:mod:`orchestrator.distributed`): rank 0 alone writes the job's files and
talks to MLflow. Such a run resumes from its checkpoints too, but it is not bit-identical to a
single-process run (BatchNorm normalises over each rank's slice).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from kdflow.methods.config import parse_config
from kdflow.orchestrator.distributed import Ranks, process_group
from kdflow.orchestrator.evaluation import VAL_SAMPLES
from kdflow.orchestrator.metrics import primary_metric
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.tracking import JobTracker
from kdflow.orchestrator.training import (JobFailed, JobInterrupted, JobTraining, RunOptions,
                                          select_device, train_alone)

__all__ = ["JobFailed", "JobInterrupted", "RunOptions", "VAL_SAMPLES", "run_job",
           "run_job_in_store", "begin_job", "end_job", "torch_threads", "preemption_flag"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Within the block, torch runs ``threads`` intra-op threads (None: as it is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def preemption_flag() -> Iterator[List[int]]:
    """Within the block, SIGTERM / SIGUSR2 / SIGINT set a flag instead of killing the process.

    Off the main thread (a Ray Tune trial), where handlers cannot be installed, the flag is
    never set: the process's owner stops the run and the job resumes from its checkpoints.
    """
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)



def run_job(spec: JobSpec, store: JobStore, options: RunOptions | None = None) -> Dict[str, Any]:
    """Run (or resume, or skip if finished) the job ``spec`` and return its ``result.json``.

    Raises :class:`JobInterrupted` after SIGTERM/SIGUSR2 (checkpoint written, state
    ``interrupted``) and :class:`JobFailed` or the original error otherwise (state ``failed``),
    among them non-finite weights or metrics (no ``model.pt``, no ``result.json``).
    ``options.threads`` torch threads run it (the count is restored afterwards).
    The job's lock is held throughout: a second process asked to run the same job (two sweep
    points sharing a teacher) waits, then finds it done.
    With ``options.distributed`` every rank of the job calls this: they join one process group,
    return the same result and raise together when any of them is signalled.
    """
    options = options or RunOptions()
    ranks = Ranks(options.distributed)
    with torch_threads(options.threads):
        if ranks.env is None:
            with store.lock(spec):
                return _run(spec, store, options, ranks)
        recipe = parse_config(Recipe, spec.recipe, f"{spec.job_id}.recipe")
        with process_group(ranks.env, ranks.device(select_device(recipe.device))):
            with store.lock(spec) if ranks.is_main else contextlib.nullcontext():
                return _run(spec, store, options, ranks)


def begin_job(spec: JobSpec, store: JobStore, options: RunOptions, ranks: Ranks,
              pack: Optional[str] = None) -> Tuple[Optional[Dict[str, Any]], Optional[JobTracker]]:
    """Under the job's lock: its ``result.json`` if it is already done (nothing else happens),
    else (None, its MLflow tracker or None) once its state says ``running`` (in ``pack``, the
    id of the pack running it; None: alone) with one more attempt."""
    job_id = spec.job_id
    done = state = None
    if ranks.is_main:
        store.add(spec)
        store.complete_supersede(job_id)  # a re-run request cut short: finish setting aside
        done = store.result(job_id)
        if done is None:
            state = store.update_state(job_id, status="running", error=None, pack=pack,
                                       attempts=store.state(job_id).attempts + 1)
    done = ranks.from_main(done)
    if done is not None:
        return done, None
    if not (options.tracking_uri and ranks.is_main):
        return None, None
    try:
        return None, JobTracker(options.tracking_uri, options.experiment, spec,
                                state.mlflow_run_id, store.job_dir(job_id),
                                on_run=lambda run_id: store.update_state(job_id, mlflow_run_id=run_id))
    except BaseException as err:
        end_job(spec, store, None, ranks, error=err)
        raise


def end_job(spec: JobSpec, store: JobStore, tracker: Optional[JobTracker], ranks: Ranks,
            result: Optional[Dict[str, Any]] = None, error: Optional[BaseException] = None) -> None:
    """Record how the job's run ended: done with ``result``, interrupted (``error`` is a
    :class:`JobInterrupted`) or failed with ``error``; its MLflow run ends the same way."""
    if error is None:
        if ranks.is_main:
            store.update_state(spec.job_id, status="done",
                               last_metric=result["metrics"][primary_metric(result["task"])])
        status = "FINISHED"
    elif isinstance(error, JobInterrupted):
        if ranks.is_main:
            store.update_state(spec.job_id, status="interrupted")
        status = "KILLED"
    else:
        if ranks.is_main:
            store.update_state(spec.job_id, status="failed",
                               error=f"{type(error).__name__}: {error}")
        status = "FAILED"
    if tracker:
        tracker.finish(status)


def _run(spec: JobSpec, store: JobStore, options: RunOptions, ranks: Ranks) -> Dict[str, Any]:
    """:func:`run_job` on ``ranks``: rank 0 keeps the job's state; all ranks train."""
    done, tracker = begin_job(spec, store, options, ranks)
    if done is not None:
        return done
    try:
        with preemption_flag() as received:
            training = JobTraining(spec, store, options, tracker, ranks)
            training.restore()
            result = train_alone(training, received)
    except BaseException as err:
        end_job(spec, store, tracker, ranks, error=err)
        raise
    end_job(spec, store, tracker, ranks, result=result)
    return result


def run_job_in_store(output_dir: str, job_id: str, options: RunOptions) -> Dict[str, Any]:
    """Worker entry point: load the spec of ``job_id`` from the store at ``output_dir``."""
    store = JobStore(Path(output_dir) / "jobs")
    return run_job(store.spec(job_id), store, options)
