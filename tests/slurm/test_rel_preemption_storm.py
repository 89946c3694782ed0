"""Preemption storm on the real dev cluster: the teacher of a two-job study is stopped three
times in a row, each time after it has made progress and written a checkpoint, alternately by
the signal SLURM sends before a time limit or preemption (SIGUSR2: the job checkpoints and
submitit requeues it) and by ``scontrol requeue`` (SIGTERM: the job checkpoints, SLURM requeues
it). It still finishes, its student runs after it, both results equal a local uninterrupted
run of the same study bit for bit (single-threaded torch on CPU), and ``kdflow status`` shows
the teacher's attempts: one per run SLURM's accounting records.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest
from omegaconf import OmegaConf
from slurm_wait import wait_until
from test_launcher import DEV, jobs_by_title

from kdflow.launch.cli import main
from kdflow.launch.compose import compose_config
from kdflow.launch.local import run_local
from kdflow.launch.slurm_queue import SlurmQueue
from kdflow.orchestrator.checkpoint import checkpoint_path
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

pytestmark = [pytest.mark.slurm, pytest.mark.reliability, pytest.mark.usefixtures("slurm_cluster")]

NUM_TRAIN, BATCH, TEACHER_EPOCHS = 512, 32, 8
TEACHER_STEPS = TEACHER_EPOCHS * NUM_TRAIN // BATCH
# KD from resnet14 to resnet8 on generated data; the teacher checkpoints every 4 of its 128 steps
STUDY = ["study=smoke", "~study.methods.vanilla", "~study.methods.fitnet", "~study.methods.crd",
         f"study.datasets.synthetic.num_train={NUM_TRAIN}",
         f"study.teacher_recipe.epochs={TEACHER_EPOCHS}", "study.teacher_recipe.lr_milestones=[6]",
         f"study.teacher_recipe.batch_size={BATCH}", "study.teacher_recipe.checkpoint_every_steps=4",
         "study.teacher_recipe.device=cpu", "study.student_recipe.device=cpu"]
PREEMPTIONS = ("USR2", "requeue", "USR2")


def _preempt(how: str, scheduler_id: str) -> None:
    if how == "USR2":  # what SLURM sends signal_delay_s before the time limit (or preemption)
        SlurmQueue().cancel([scheduler_id], signal="USR2")
    else:  # an operator's or a preempting job's requeue: SIGTERM, then back in the queue
        subprocess.run(["scontrol", "requeue", scheduler_id], check=True, timeout=60)


def _checkpointed_after(store: JobStore, job_id: str, step: int) -> bool:
    """Whether the job has written a checkpoint at a global step after ``step``."""
    folder = store.checkpoint_dir(job_id)
    return any(checkpoint_path(folder, s).exists() for s in range(step + 1, TEACHER_STEPS + 1))


def _resumed_and_checkpointed(store: JobStore, job_id: str, attempt: int,
                              previous: Optional[int]) -> bool:
    """Whether run ``attempt`` is running, resumed later than the previous run did (from
    ``previous``; None: the first run) and has written a checkpoint of its own since."""
    state = store.state(job_id)
    if state.status != "running" or state.attempts != attempt:
        return False
    start = state.resumed_step or 0
    if previous is not None and start <= previous:
        return False  # still the previous run's record: this run has not loaded its checkpoint
    return _checkpointed_after(store, job_id, start)


def _slurm_runs(scheduler_id: str) -> List[str]:
    """The state of every run SLURM's accounting holds for ``scheduler_id`` (-D: requeued runs
    too), oldest first."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", scheduler_id],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_a_job_requeued_three_times_in_a_row_finishes_with_the_uninterrupted_result(tmp_path: Path,
                                                                                     capsys):
    out = f"output_dir={tmp_path / 'slurm'}"
    assert main(["run", *STUDY, *DEV, out]) == 0
    submitted = capsys.readouterr().out
    assert "submitted 2 jobs in 2 sbatch calls" in submitted, submitted
    store = JobStore(tmp_path / "slurm" / "jobs")
    titles = jobs_by_title(tmp_path / "slurm")
    teacher, student = titles["teacher resnet14 synthetic s0"], titles["kd resnet14->resnet8 synthetic s0"]
    scheduler_id = store.submissions(teacher)[-1]

    resumed: Optional[int] = None
    starts = []
    for attempt, how in enumerate(PREEMPTIONS, start=1):
        wait_until(f"run {attempt} of the teacher to checkpoint past step {resumed}",
                   lambda: _resumed_and_checkpointed(store, teacher, attempt, resumed),
                   timeout=180, interval=0.1)
        resumed = store.state(teacher).resumed_step or 0
        starts.append(resumed)
        _preempt(how, scheduler_id)
    wait_until("the student to finish", lambda: store.is_done(student)
               or store.state(student).status in ("failed", "blocked"), timeout=400, interval=1)
    assert store.is_done(student), store.state(student)

    runs = len(PREEMPTIONS) + 1
    final = store.state(teacher)
    starts.append(final.resumed_step)
    # every run started later than the one before: each resumed from a checkpoint of its own
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])), starts
    assert final.attempts == runs and store.submissions(teacher) == [scheduler_id]
    accounted = wait_until("SLURM's accounting of the completed run", lambda: (
        runs_seen := _slurm_runs(scheduler_id))[-1:] == ["COMPLETED"] and runs_seen, timeout=60)
    assert accounted == ["REQUEUED"] * len(PREEMPTIONS) + ["COMPLETED"]

    assert main(["status", *STUDY, *DEV, out]) == 0
    status = capsys.readouterr().out
    line = re.search(rf"^{teacher}\s+teacher\s+.+\s+done\s+{scheduler_id}\s+(\d+)\s+{TEACHER_EPOCHS}\s",
                     status, re.MULTILINE)
    assert line and int(line.group(1)) == len(accounted), status
    assert re.search(rf"^{student}\s+distill\s+.+\s+done\s+\S+\s+1\s", status, re.MULTILINE), status

    study = OmegaConf.to_container(compose_config(STUDY).study, resolve=True)
    reference = tmp_path / "local"
    # the SLURM tasks train on slurm_dev's cpus_per_task = 1 thread: the reference does too
    summary = run_local(expand_study(study), str(reference), RunOptions(progress=False, threads=1),
                        workers=1)
    assert summary.ok and len(summary.done) == 2, summary.render()
    local = JobStore(reference / "jobs")
    for job_id in (teacher, student):
        got, expected = store.result(job_id), local.result(job_id)
        assert got["history"] == expected["history"], store.spec(job_id).title
        assert got["metrics"] == expected["metrics"]
