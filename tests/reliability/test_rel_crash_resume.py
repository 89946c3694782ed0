"""Issue 9, item 1: a job SIGKILLed at random points resumes from its last complete checkpoint
and ends exactly like a run that was never interrupted; no half-written file is ever read.

One job is killed again and again, each time in a real subprocess that dies by a real SIGKILL:
once from outside at a random moment, and at seeded random points from inside (the worker
patches itself so the kill lands exactly there): within an optimizer step, after writing a
random fraction of a checkpoint, of ``model.pt`` and of ``result.json``. After every kill the
test checks which checkpoint the next attempt must resume from, and that attempt's
``resumed_step`` says it did.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
from multiprocess import REPO
from rel_checkpoint_jobs import QUIET, checkpoint_steps, saved_steps, vanilla_job

from kdflow.orchestrator.checkpoint import checkpoint_path, read_sealed
from kdflow.orchestrator.runner import run_job
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore

SEED = 9  # the kill points are drawn from random.Random(SEED)
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 3, 12, 5
SAVES = saved_steps(EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)  # no step is listed twice

#: ``python -c WORKER root job_id kill``: run the job of the store at ``root/jobs``; ``kill``
#: (JSON) says where the process SIGKILLs itself: ``{"kind": "step", "at": g}`` inside the
#: optimizer step that would complete global step g, ``{"kind": "write", "file": name,
#: "fraction": f}`` once a fraction f of the bytes of ``name`` reached its temporary file, or
#: ``{"kind": "none"}`` (the test kills it from outside).
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from kdflow.orchestrator.runner import RunOptions, run_job_in_store
    from kdflow.orchestrator.store import JobStore

    root, job_id, kill = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill["kind"] == "step":
        store, steps_run, real_step = JobStore(os.path.join(root, "jobs")), [], torch.optim.SGD.step

        def step(self, *args, **kwargs):
            if not steps_run:
                steps_run.append(store.state(job_id).resumed_step or 0)
            steps_run.append(1)
            if sum(steps_run) == kill["at"]:
                die()
            return real_step(self, *args, **kwargs)

        torch.optim.SGD.step = step
    elif kill["kind"] == "write":
        real_fdopen = os.fdopen

        class Torn:
            def __init__(self, f):
                self.f = f
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                self.f.close()
            def write(self, data):
                self.f.write(bytes(data[:int(len(data) * kill["fraction"])]))
                self.f.flush()
                os.fsync(self.f.fileno())
                die()

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            return Torn(f) if name.startswith(f".tmp-{kill['file']}-") else f

        os.fdopen = fdopen
    run_job_in_store(root, job_id, RunOptions(progress=False, threads=1))  # as the reference
""")


def _start(root: Path, job: JobSpec, kill: Dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), job.job_id, json.dumps(kill)],
                            env={**os.environ, "PYTHONPATH": REPO})


def _kill_from_outside(proc: subprocess.Popen, store: JobStore, job: JobSpec,
                       rng: random.Random) -> None:
    """SIGKILL ``proc`` a random moment (up to 0.3 s) after its first checkpoint appears."""
    deadline = time.time() + 120
    while not any(store.checkpoint_dir(job.job_id).glob("step-*.pt")):
        assert proc.poll() is None and time.time() < deadline, "the job ended before its checkpoint"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)


def _run_killed(root: Path, store: JobStore, job: JobSpec, kill: Dict[str, Any],
                rng: random.Random) -> None:
    """One attempt of ``job`` that must end by SIGKILL at ``kill``, leaving the job unfinished."""
    proc = _start(root, job, kill)
    if kill["kind"] == "none":
        _kill_from_outside(proc, store, job, rng)
    assert proc.wait(timeout=180) == -signal.SIGKILL, f"the attempt with {kill} was not killed"
    assert not store.is_done(job.job_id)
    assert store.state(job.job_id).status == "running"  # SIGKILL leaves no chance to record
    if kill["kind"] == "write":  # killed mid-write: the torn bytes are in a temporary file
        folder = store.checkpoint_dir(job.job_id) if kill["file"].startswith("step-") \
            else store.job_dir(job.job_id)
        assert list(folder.glob(f".tmp-{kill['file']}-*"))


def _partial_files(store: JobStore, job: JobSpec) -> List[Path]:
    folder = store.job_dir(job.job_id)
    return [*folder.glob(".tmp-model.pt-*"), *folder.glob(".tmp-result.json-*"),
            *store.checkpoint_dir(job.job_id).glob(".tmp-*")]


def _expected_resume(kill: Dict[str, Any], present: Optional[int]) -> Optional[int]:
    """The step the attempt after ``kill`` must resume from: the last checkpoint completed
    before the killed step or write (``present``: the newest on disk, for an outside kill)."""
    if kill["kind"] == "step":
        return max([s for s in SAVES if s < kill["at"]], default=None)
    if kill["kind"] == "write" and kill["file"].startswith("step-"):
        torn = int(kill["file"][len("step-"):-len(".pt")])
        return max([s for s in SAVES if s < torn], default=None)
    if kill["kind"] == "write":  # model.pt or result.json: training had ended
        return SAVES[-1]
    return present


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_from_last_complete_checkpoint(study, tmp_path):
    job = vanilla_job(study, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    reference = JobStore(tmp_path / "reference" / "jobs")
    expected = run_job(job, reference, QUIET)

    rng = random.Random(SEED)
    total = EPOCHS * STEPS_PER_EPOCH
    root = tmp_path / "killed"
    store = JobStore(root / "jobs")
    store.add(job)

    def from_outside(after: int) -> Dict[str, Any]:
        return {"kind": "none"}

    def in_step(after: int) -> Dict[str, Any]:
        return {"kind": "step", "at": rng.randint(after + 1, min(after + STEPS_PER_EPOCH, total))}

    def in_checkpoint(after: int) -> Dict[str, Any]:
        step = rng.choice([s for s in SAVES if after < s <= after + STEPS_PER_EPOCH])
        return {"kind": "write", "file": checkpoint_path(Path(), step).name,
                "fraction": rng.random()}

    def in_final(name: str):
        return lambda after: {"kind": "write", "file": name, "fraction": rng.random()}

    plan = [from_outside, in_step, in_checkpoint, in_step, in_checkpoint,
            in_final("model.pt"), in_final("result.json")]
    resumed_from = None
    for make_kill in plan:
        kill = make_kill(resumed_from or 0)
        _run_killed(root, store, job, kill, rng)
        assert store.state(job.job_id).resumed_step == resumed_from
        present = checkpoint_steps(store, job)
        resumed_from = _expected_resume(kill, present[-1] if present else None)
        assert (present[-1] if present else None) == resumed_from, f"after {kill}: {present}"

    result = run_job(job, store, QUIET)
    state = store.state(job.job_id)
    assert state.resumed_step == total and state.status == "done"
    assert state.attempts == len(plan) + 1
    assert not _partial_files(store, job)  # the torn temporary files were removed, never read
    assert result["history"] == expected["history"] and result["metrics"] == expected["metrics"]
    assert store.result(job.job_id) == result
    weights, reference_weights = (read_sealed(s.weights_path(job.job_id)) for s in (store, reference))
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)
