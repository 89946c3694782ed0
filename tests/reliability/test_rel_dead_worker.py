"""Issue 18, item 2: a worker process killed with SIGKILL (what the kernel's OOM killer does)
fails its own job alone, with the reason in the job's state; the jobs that need it are blocked,
naming it; the pool starts a new worker for the next job and every other job finishes.

A real ``kill -9`` of the teacher's worker during a two-worker local study, while the other
worker trains a student of its own.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from rel_checkpoint_jobs import QUIET
from rel_workers import has_checkpoint, wait_for, worker_of

from kdflow.launch.launchers import LocalLauncher, StudyRun
from kdflow.launch.local import death_reason
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

BOOT_TIME_RESOLUTION_S = 1.0
KILLED = "worker process killed by signal 9 (SIGKILL; possibly out of memory)"


def _long_study(study: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher, vanilla and KD students of seeds 0 and 1, each a few seconds of training
    with a checkpoint every 5 of its 120 steps."""
    study["seeds"] = [0, 1]
    study["datasets"]["synthetic"]["num_train"] = 20 * 32
    for recipe in ("teacher_recipe", "student_recipe"):
        study[recipe].update(epochs=6, lr_milestones=[5], checkpoint_every_steps=5)
    return study


def _kill_teacher_worker(jobs: Path, teacher: str, student: str, seen: Dict[str, Any]) -> None:
    """Once both the teacher and the student have checkpointed, SIGKILL the teacher's worker;
    note the pids in ``seen``, and which job was unfinished then."""
    wait_for(lambda: has_checkpoint(jobs / teacher) and has_checkpoint(jobs / student), 300,
             "the first checkpoints of the teacher and the student")
    victim = wait_for(lambda: worker_of(jobs / teacher), 30, "the teacher's worker")
    seen["student_worker"] = worker_of(jobs / student).pid
    seen["student_unfinished"] = not (jobs / student / "result.json").exists()
    seen["killed"], seen["killed_at"] = victim.pid, time.time()
    victim.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_a_sigkilled_worker_fails_its_job_alone_and_the_study_goes_on(study, tmp_path, capsys):
    graph = expand_study(_long_study(study))
    ids = {job.title: job.job_id for job in graph.jobs}
    teacher, student = ids["teacher resnet14 synthetic s0"], ids["vanilla resnet8 synthetic s0"]
    later = ids["vanilla resnet8 synthetic s1"]
    kds = [ids[f"kd resnet14->resnet8 synthetic s{seed}"] for seed in (0, 1)]
    jobs, seen, errors = tmp_path / "jobs", {}, []
    starts: List[Tuple[int, float]] = []

    def killer() -> None:
        try:
            _kill_teacher_worker(jobs, teacher, student, seen)
            worker = wait_for(lambda: worker_of(jobs / later), 300, "the job started after the kill")
            starts.append((worker.pid, worker.create_time()))
        except BaseException as err:  # reported by the test's thread
            errors.append(err)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    code = LocalLauncher({"name": "local", "workers": 2}).run(
        StudyRun(graph, str(tmp_path), QUIET, tmp_path / "reports"))
    thread.join(timeout=60)
    assert not errors, errors
    out = capsys.readouterr().out
    assert code == 1, out
    assert seen["student_unfinished"], "the student ended before the kill: make it longer"

    store = JobStore(jobs)
    killed = store.state(teacher)
    assert (killed.status, killed.error) == ("failed", KILLED)
    assert "2 run, 0 skipped (already done), 1 failed, 2 blocked, 0 interrupted" in out, out
    assert f"failed  {teacher}: {KILLED}" in out
    for kd in kds:
        blocked = store.state(kd)
        assert blocked.status == "blocked" and blocked.attempts == 0
        assert blocked.error == (f"needs job {teacher} (teacher resnet14 synthetic s0), which "
                                 f"failed: {KILLED}")
    # the student running beside it went on in its own worker, and finished in one attempt
    assert store.is_done(student) and store.state(student).attempts == 1
    assert seen["student_worker"] != seen["killed"]
    # the next job ran in a new worker, started after the kill, in the freed slot. A process's
    # start time is boot time (whole seconds in /proc/stat) plus its start tick, so it may read
    # up to BOOT_TIME_RESOLUTION_S early against time.time().
    pid, started = starts[0]
    assert store.is_done(later) and pid not in (seen["killed"], seen["student_worker"])
    assert started >= seen["killed_at"] - BOOT_TIME_RESOLUTION_S
    assert {store.state(job.job_id).status for job in graph.jobs} == {"done", "failed", "blocked"}


def test_a_worker_death_is_named_by_its_signal_or_exit_code():
    assert death_reason(-signal.SIGKILL) == KILLED
    assert death_reason(-signal.SIGSEGV) == "worker process killed by signal 11 (SIGSEGV)"
    assert death_reason(3) == "worker process exited with code 3 before reporting its job"
