"""Issue 18, item 8: every job of a local study runs with the torch thread count its launcher
settings state (cores // workers), in a worker process or in the launcher's own, and records it;
so a job stopped mid-way (SIGTERM: it checkpoints) and resumed when it is the only job left,
which the launcher then runs in its own process, ends bit-identical to an uninterrupted run.

The machine is made to look like four cores, and the study asks for four workers: one thread
per job. The old launcher gave each of the two workers it started (one per job) two threads,
and the job resumed alone the one thread of this test process (``single_thread_seeded``).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from rel_checkpoint_jobs import QUIET
from rel_workers import has_checkpoint, wait_for, worker_of

import kdflow.launch.local as local
from kdflow.launch.local import run_local
from kdflow.orchestrator.checkpoint import read_sealed
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph, expand_study

CORES, WORKERS = 4, 4


@pytest.fixture
def graph(study: Dict[str, Any], monkeypatch) -> JobGraph:
    """Two independent students (seeds 0 and 1) of 80 steps, checkpointing every 5."""
    monkeypatch.setattr(local, "default_workers", lambda: CORES)
    study["methods"] = {"vanilla": {}}
    study["seeds"] = [0, 1]
    study["datasets"]["synthetic"]["num_train"] = 20 * 32
    study["student_recipe"].update(epochs=4, lr_milestones=[3], checkpoint_every_steps=5)
    return expand_study(study)


def _stop_when_checkpointed(job_dir: Path, errors: List[BaseException]) -> None:
    """SIGTERM the worker running the job of ``job_dir`` once it has a checkpoint."""
    try:
        wait_for(lambda: has_checkpoint(job_dir), 300, "the job's first checkpoint")
        wait_for(lambda: worker_of(job_dir), 30, "the job's worker").send_signal(signal.SIGTERM)
    except BaseException as err:  # reported by the test's thread
        errors.append(err)


@pytest.mark.slow
def test_a_job_resumed_alone_in_process_ends_bit_identical(graph: JobGraph, tmp_path) -> None:
    first, second = (job.job_id for job in graph.jobs)
    reference = run_local(graph, str(tmp_path / "reference"), QUIET, workers=WORKERS)
    assert sorted(reference.done) == sorted([first, second]), reference.render()

    out = tmp_path / "stopped"
    errors: List[BaseException] = []
    stopper = threading.Thread(target=_stop_when_checkpointed,
                               args=(out / "jobs" / second, errors), daemon=True)
    stopper.start()
    stopped = run_local(graph, str(out), QUIET, workers=WORKERS)
    stopper.join(timeout=60)
    assert not errors, errors
    assert (stopped.done, stopped.interrupted) == ([first], [second]), stopped.render()

    resumed = run_local(graph, str(out), QUIET, workers=WORKERS)  # alone: in this process
    assert (resumed.skipped, resumed.done) == ([first], [second]), resumed.render()
    store, expected = JobStore(out / "jobs"), JobStore(tmp_path / "reference" / "jobs")
    assert store.state(second).resumed_step > 0 and store.state(second).attempts == 2
    weights, reference_weights = (read_sealed(s.weights_path(second)) for s in (store, expected))
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)
    assert store.result(second)["history"] == expected.result(second)["history"]
    assert [s.result(j)["threads"] for s in (store, expected) for j in (first, second)] == [1] * 4
    assert torch.get_num_threads() == 1  # this process's own count is restored


def test_the_thread_count_depends_on_the_launcher_settings_alone(monkeypatch) -> None:
    monkeypatch.setattr(local, "default_workers", lambda: CORES)
    assert [local.job_threads(workers) for workers in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
