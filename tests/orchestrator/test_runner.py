"""The job runner: training, skipping finished jobs, and exact resume after SIGKILL."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdflow.methods.models import build_model
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study
from test_fast_path import training_step_layouts

QUIET = RunOptions(progress=False)


def _jobs(study):
    graph = expand_study(study)
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    return teacher, [j for j in graph.jobs if j.stage == "distill"]


@pytest.mark.slow
def test_teacher_then_students_train_and_finished_jobs_are_skipped(study, tmp_path):
    study["methods"] = {"vanilla": {}, "kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}}
    study["datasets"]["synthetic"].update(num_train=256)
    study["teacher_recipe"] = {**study["teacher_recipe"], "epochs": 4, "lr_milestones": [3]}
    study["student_recipe"] = {**study["student_recipe"], "epochs": 3, "lr_milestones": [2]}
    teacher, students = _jobs(study)
    store = JobStore(tmp_path)
    result = run_job(teacher, store, QUIET)
    assert result["metrics"]["top1"] >= 90.0  # the generated classes are easy to learn
    assert {"job_id", "stage", "method", "teacher", "student", "dataset", "seed", "metrics",
            "epochs", "wall_time_s"} <= set(result)
    for job in students:
        out = run_job(job, store, QUIET)
        assert out["epochs"] == 3 and len(out["history"]) == 3
        assert out["metrics"]["top1"] > 100.0 / 4  # better than chance on 4 classes
        state = store.state(job.job_id)
        assert state.status == "done" and state.attempts == 1
    before = store.weights_path(students[0].job_id).stat().st_mtime_ns
    assert run_job(students[0], store, QUIET) == store.result(students[0].job_id)
    assert store.weights_path(students[0].job_id).stat().st_mtime_ns == before
    assert store.state(students[0].job_id).attempts == 1  # skipped, not re-run


def test_teacher_is_frozen_during_distillation(study, tmp_path):
    teacher, students = _jobs(study)
    store = JobStore(tmp_path)
    run_job(teacher, store, QUIET)
    weights_before = torch.load(store.weights_path(teacher.job_id))
    run_job(next(j for j in students if j.method == "kd"), store, QUIET)
    weights_after = torch.load(store.weights_path(teacher.job_id))
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)


WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kdflow.orchestrator.runner import RunOptions, run_job_in_store
    run_job_in_store(sys.argv[1], sys.argv[2], RunOptions(progress=False))
""")


@pytest.mark.parametrize("method", ["kd", "crd"])
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(study, tmp_path, method):
    study["datasets"]["synthetic"].update(num_train=960)
    study["methods"] = {method: {"num_negatives": 64} if method == "crd" else {}}
    study["student_recipe"] = {**study["student_recipe"], "epochs": 3, "lr_milestones": [2],
                               "checkpoint_every_steps": 7}
    teacher, (job,) = _jobs(study)
    reference = JobStore(tmp_path / "reference" / "jobs")
    run_job(teacher, reference, QUIET)
    shutil.copytree(reference.job_dir(teacher.job_id),
                    tmp_path / "killed" / "jobs" / teacher.job_id)
    expected = run_job(job, reference, QUIET)

    killed = JobStore(tmp_path / "killed" / "jobs")
    killed.add(job)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "killed"), job.job_id],
                            env=env)
    ckpts = killed.checkpoint_dir(job.job_id)
    deadline = time.time() + 120
    while not any(ckpts.glob("step-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.is_done(job.job_id), "the job finished before it could be killed"
    latest = torch.load(sorted(ckpts.glob("step-*.pt"))[-1], weights_only=False)
    steps_per_epoch = 960 // 32
    assert latest["progress"]["global_step"] % steps_per_epoch != 0  # killed mid-epoch
    assert killed.state(job.job_id).status == "running"  # SIGKILL leaves no chance to record

    resumed = run_job(job, killed, QUIET)
    assert killed.state(job.job_id).attempts == 2
    assert resumed["history"] == expected["history"]
    assert resumed["metrics"] == expected["metrics"]
    a = torch.load(reference.weights_path(job.job_id))
    b = torch.load(killed.weights_path(job.job_id))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_checkpoints_and_marks_interrupted(study, tmp_path):
    study["datasets"]["synthetic"].update(num_train=960)
    study["student_recipe"] = {**study["student_recipe"], "epochs": 20,
                               "checkpoint_every_steps": 10_000}
    study["methods"] = {"vanilla": {}}
    (job,) = expand_study(study).jobs
    store = JobStore(tmp_path / "jobs")
    store.add(job)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), job.job_id], env=env)
    deadline = time.time() + 120
    while store.state(job.job_id).epoch < 1 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert store.state(job.job_id).status == "interrupted"
    assert any(store.checkpoint_dir(job.job_id).glob("step-*.pt"))



@pytest.mark.slow
def test_bf16_autocast_and_channels_last_switches(study, tmp_path):
    study["methods"] = {"vanilla": {}}
    study["datasets"]["synthetic"].update(num_train=256)
    study["student_recipe"] = {**study["student_recipe"], "epochs": 3, "lr_milestones": [2]}
    (plain,) = expand_study(study).jobs
    study["student_recipe"].update(amp="bf16", channels_last=True)
    (fast,) = expand_study(study).jobs
    assert fast.job_id != plain.job_id
    store = JobStore(tmp_path)
    with training_step_layouts() as plain_seen:
        a = run_job(plain, store, QUIET)
    with training_step_layouts() as fast_seen:
        b = run_job(fast, store, QUIET)
    assert b["metrics"]["top1"] > 100.0 / 4
    # every convolution of the step ran in bf16 on NHWC input, none of the plain one did
    assert plain_seen == {(torch.float32, False)}
    assert fast_seen == {(torch.bfloat16, True)}
    assert a["history"][0]["train/loss"] != b["history"][0]["train/loss"]


def test_random_init_teacher_trains_nothing_and_calibrates_batchnorm(study, tmp_path):
    study["methods"] = {"inverted_projection": {"teacher_init": "random"}}
    graph = expand_study(study)
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    assert teacher.recipe["epochs"] == 0
    store = JobStore(tmp_path)
    result = run_job(teacher, store, QUIET)
    assert result["epochs"] == 0 and len(result["history"]) == 1
    weights = torch.load(store.weights_path(teacher.job_id))
    torch.manual_seed(teacher.seed)
    fresh = build_model(teacher.model, 4).state_dict()
    conv = next(k for k in fresh if k.endswith("conv1.weight"))
    assert torch.equal(weights[conv], fresh[conv])  # the weights are the random init
    means = [v for k, v in weights.items() if k.endswith("running_mean")]
    assert any(m.abs().sum() > 0 for m in means)  # statistics came from the data
    student = next(j for j in graph.jobs if j.stage == "distill")
    out = run_job(student, store, QUIET)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in out["history"])
