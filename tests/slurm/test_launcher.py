"""The slurm launcher on the real dev cluster: whole studies, requeue/preemption, failures,
idempotent re-runs and cancel."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from multiprocess import WORKER, launch_ranks, wait_ranks
from slurm_wait import wait_until

from kdflow.launch.compose import compose_config
from kdflow.launch.slurm import submit_study
from kdflow.launch.slurm_config import parse_slurm_settings
from kdflow.launch.slurm_queue import SlurmQueue
from omegaconf import OmegaConf
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

#: The SLURM dev cluster shares this machine's disk: its jobs may write the SQLite store.
DEV = ["launcher=slurm_dev", "progress=false", "tracking_sqlite_on_cluster=true"]


def kdflow(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "KDFLOW_LOG": "WARNING"})


def jobs_by_title(output_dir: Path) -> Dict[str, str]:
    store = JobStore(output_dir / "jobs")
    return {store.spec(p.name).title: p.name for p in store.root.iterdir()}


def dev_settings(**changes: Any):
    cfg = compose_config(["launcher=slurm_dev", "tracking_sqlite_on_cluster=true"])
    launcher = OmegaConf.to_container(cfg.launcher, resolve=True)
    launcher.update(changes)
    return parse_slurm_settings(launcher)


def test_study_trains_the_teacher_once_and_a_rerun_submits_nothing(tmp_path):
    out = f"output_dir={tmp_path}"
    first = kdflow("run", "study=quick", *DEV, "launcher.wait=true", out)
    assert first.returncode == 0, first.stdout + first.stderr
    # one teacher array, then one array for the four students, after it
    assert "submitted 5 jobs in 2 sbatch calls" in first.stdout
    assert "1 teacher jobs" in first.stdout and "4 distill jobs, after afterok:" in first.stdout
    store = JobStore(tmp_path / "jobs")
    titles = jobs_by_title(tmp_path)
    assert len(titles) == 5 and all(store.is_done(j) for j in titles.values())
    teacher = titles["teacher resnet14 digits s0"]
    assert len(store.submissions(teacher)) == 1 and store.state(teacher).attempts == 1
    teacher_end = store.result(teacher)["wall_time_s"]
    assert teacher_end > 0 and (tmp_path / "reports" / "quick" / "report.md").exists()
    assert "| KD |" in first.stdout and "| FitNet |" in first.stdout

    again = kdflow("run", "study=quick", *DEV, out)
    assert again.returncode == 0, again.stderr
    assert "submitted 0 jobs in 0 sbatch calls (5 already done" in again.stdout
    status = kdflow("status", "study=quick", *DEV, out)
    assert status.returncode == 0 and "\n5 done\n" in status.stdout
    for job_id in titles.values():  # the scheduler column shows each job's SLURM id
        assert store.submissions(job_id)[-1] in status.stdout


def test_rerun_never_submits_a_second_copy_and_cancel_takes_the_study_off(tmp_path):
    out = f"output_dir={tmp_path}"
    held = ["+launcher.resources.additional.hold=true"]  # stays PENDING until released
    first = kdflow("run", "study=quick", *DEV, *held, out)
    assert first.returncode == 0 and "submitted 5 jobs" in first.stdout, first.stdout + first.stderr
    try:
        again = kdflow("run", "study=quick", *DEV, *held, out)
        assert "submitted 0 jobs in 0 sbatch calls (0 already done, 5 already queued" in again.stdout
        status = kdflow("status", "study=quick", *DEV, out)
        assert "\n5 queued\n" in status.stdout, status.stdout
        assert "JobHeldUser" in status.stdout or "Dependency" in status.stdout
    finally:
        cancel = kdflow("cancel", "study=quick", *DEV, out)
    # the teacher's task and one task per seed, each running the seed's KD and FitNet as a pack
    assert cancel.returncode == 0 and "cancelled 3 SLURM jobs" in cancel.stdout, cancel.stdout + cancel.stderr
    queue = SlurmQueue()
    store = JobStore(tmp_path / "jobs")
    ids = {store.submissions(j)[-1] for j in jobs_by_title(tmp_path).values()}
    assert not ids & set(queue.live())
    status = kdflow("status", "study=quick", *DEV, out)
    assert "\n5 cancelled\n" in status.stdout, status.stdout


def _long_students(seeds: List[int]) -> Dict[str, Any]:
    """Student-alone jobs long enough (~20 s of training) to be interrupted mid-way."""
    recipe = {"epochs": 8, "batch_size": 32, "lr": 0.05, "lr_milestones": [6],
              "checkpoint_every_steps": 7, "device": "cpu"}
    return {"name": "requeue", "datasets": {"digits": {}}, "pairs": [{"teacher": "resnet8", "student": "resnet14"}],
            "seeds": seeds, "teacher_seed": 0, "teacher_recipe": dict(recipe),
            "student_recipe": dict(recipe), "methods": {"vanilla": {}}}


def test_usr2_and_scontrol_requeue_resume_from_the_checkpoint_with_the_same_result(tmp_path):
    graph = expand_study(_long_students([0, 1]))
    assert len(graph.jobs) == 2
    output = tmp_path / "slurm"
    submission = submit_study(graph, str(output), RunOptions(progress=False), dev_settings())
    assert len(submission.arrays) == 1
    store = JobStore(output / "jobs")
    signalled, requeued = (job.job_id for job in graph.jobs)
    queue = SlurmQueue()
    for job_id in (signalled, requeued):
        wait_until(f"{job_id} to finish an epoch", lambda: store.state(job_id).epoch >= 1, timeout=180, interval=0.2)
    # submitit's way: SIGUSR2 -> checkpoint -> `scontrol requeue` from inside the job
    queue.cancel([store.submissions(signalled)[-1]], signal="USR2")
    # the operator's (or preemption's) way: SLURM kills the job and queues it again
    subprocess.run(["scontrol", "requeue", store.submissions(requeued)[-1]], check=True)
    for job_id in (signalled, requeued):
        wait_until(f"{job_id} to finish after its requeue", lambda: store.is_done(job_id), timeout=300)

    reference = JobStore(tmp_path / "reference" / "jobs")
    for job in graph.jobs:
        state = store.state(job.job_id)
        assert state.attempts == 2, state  # started, stopped, started again
        assert state.resumed_step and state.resumed_step > 0, state  # ...from its checkpoint
        assert store.submissions(job.job_id) == state.scheduler_ids[:1]  # requeued, not resubmitted
        expected = run_job(copy.deepcopy(job), reference, RunOptions(progress=False))
        got = store.result(job.job_id)
        assert got["history"] == expected["history"], job.title  # bit-identical on CPU


def test_a_job_that_always_fails_blocks_only_its_dependents(tmp_path):
    out = f"output_dir={tmp_path}"
    diverging = kdflow("run", "study=quick", *DEV, "launcher.wait=true", "launcher.retries=1",
                       "study.teacher_recipe.lr=1e10", "+study.methods.vanilla={}", out)
    assert diverging.returncode == 1, diverging.stdout + diverging.stderr
    store = JobStore(tmp_path / "jobs")
    titles = jobs_by_title(tmp_path)
    teacher = titles["teacher resnet14 digits s0"]
    state = store.state(teacher)
    assert state.status == "failed" and state.attempts == 2 and "non-finite" in state.error
    for title, job_id in titles.items():
        if title.startswith(("kd ", "fitnet ")):
            assert store.state(job_id).status == "blocked"
            assert teacher in store.state(job_id).error
        elif title.startswith("vanilla "):
            assert store.is_done(job_id)
    assert "\n4 blocked, 2 done, 1 failed\n" in diverging.stdout, diverging.stdout
    assert f"needs job {teacher} (teacher resnet14 digits s0), which is failed" in diverging.stdout


def test_a_two_task_job_trains_under_gloo_exactly_as_two_local_processes(tmp_path):
    # Its top-1 is not compared with one process's: 69 steps of this job amplify rounding
    # differences (BatchNorm over half batches, or just another intra-op thread count) into
    # final top-1s 84-97% apart (seed 0 on one machine: 95.6% alone with one thread, 93.1%
    # with two, 83.9% with three; 92.2% on two ranks). What is deterministic is asserted: the
    # SLURM job equals, bit for bit, the same job run by two local ranks (tests/orchestrator/
    # test_distributed.py shows that those ranks agree before any broadcast, repeat bit for
    # bit, and that one step averages to the single-process gradient).
    study = _long_students([0])
    study["student_recipe"].update(epochs=3, lr_milestones=[2], batch_size=64)
    graph = expand_study(study)
    (job,) = graph.jobs
    # one intra-op thread per task (launch.slurm_task), as the local ranks (WORKER) use
    settings = dev_settings(resources={**dev_settings().resources, "tasks_per_node": 2,
                                       "cpus_per_task": 1})
    output = tmp_path / "slurm"
    submission = submit_study(graph, str(output), RunOptions(progress=False), settings)
    assert len(submission.arrays) == 1
    store = JobStore(output / "jobs")
    wait_until("the two-task job to finish", lambda: store.is_done(job.job_id) or
               store.state(job.job_id).status == "failed", timeout=300)
    assert store.is_done(job.job_id), store.state(job.job_id)
    got = store.result(job.job_id)
    assert got["world_size"] == 2 and store.state(job.job_id).attempts == 1
    assert got["metrics"]["top1"] > 70.0  # chance is 10%

    local = JobStore(tmp_path / "local" / "jobs")
    local.add(job)
    wait_ranks(launch_ranks(WORKER, str(tmp_path / "local"), job.job_id, str(tmp_path)), timeout=300)
    expected = local.result(job.job_id)
    assert expected["world_size"] == 2
    assert got["history"] == expected["history"]
    slurm_weights = torch.load(store.weights_path(job.job_id))
    local_weights = torch.load(local.weights_path(job.job_id))
    assert slurm_weights.keys() == local_weights.keys()
    assert all(torch.equal(slurm_weights[k], local_weights[k]) for k in local_weights)


def test_hydra_sweep_through_hydra_submitit_launcher(tmp_path):
    sweep = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "kdflow.launch.hydra_app", "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
         "hydra.launcher.timeout_min=20", f"hydra.sweep.dir={sweep}", f"output_dir={tmp_path / 'out'}",
         "progress=false", "study=quick", "study.methods.kd.temperature=2,8"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = sorted(p.name.split("_")[1] for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert tasks == ["0", "1"]  # one SLURM array task per sweep point
    reports = sorted(p.name for p in (tmp_path / "out" / "reports" / "quick").iterdir())
    assert reports == ["study.methods.kd.temperature=2", "study.methods.kd.temperature=8"]
    store = JobStore(tmp_path / "out" / "jobs")
    titles = jobs_by_title(tmp_path / "out")
    job_ids = [p.name for p in store.root.iterdir()]
    # 1 teacher + fitnet x 2 seeds (shared by both points) + kd x 2 seeds x 2 temperatures
    assert len(job_ids) == 7 and all(store.is_done(j) for j in job_ids)
    teacher = store.state(titles["teacher resnet14 digits s0"])
    assert teacher.attempts == 1  # both points needed it; the job lock let one train it


def test_a_request_slurm_would_refuse_is_an_error_before_anything_is_submitted(tmp_path):
    refused = kdflow("run", "study=quick", *DEV, "launcher.resources.partition=nosuchpartition",
                     f"output_dir={tmp_path}")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    reason = refused.stderr.lower()
    assert "launcher.resources" in refused.stderr, refused.stderr
    assert "nosuchpartition" in reason or "invalid partition" in reason, refused.stderr
    assert "No job was started." in refused.stderr
    assert not list(tmp_path.glob("jobs/*/submissions.json"))


def test_a_job_killed_outright_strands_its_dependents_and_a_rerun_recovers(tmp_path):
    out = f"output_dir={tmp_path}"
    first = kdflow("run", "study=quick", *DEV, out)
    assert first.returncode == 0, first.stdout + first.stderr
    store = JobStore(tmp_path / "jobs")
    teacher = jobs_by_title(tmp_path)["teacher resnet14 digits s0"]
    wait_until("the teacher to finish an epoch", lambda: store.state(teacher).epoch >= 1,
               timeout=180, interval=0.2)
    # SIGKILL: no checkpoint on the way out, SLURM records FAILED, afterok can never be met
    SlurmQueue().cancel([store.submissions(teacher)[-1]], signal="KILL")
    status = wait_until("the students to be stuck", lambda: (
        s := kdflow("status", "study=quick", *DEV, out)).stdout.count("DependencyNeverSatisfied") == 4 and s,
        timeout=120, interval=1)
    assert "\n1 lost, 4 stuck\n" in status.stdout, status.stdout

    rerun = kdflow("run", "study=quick", *DEV, "launcher.wait=true", out)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "submitted 5 jobs in 2 sbatch calls" in rerun.stdout
    assert "4 stuck on a failed dependency resubmitted" in rerun.stdout
    state = store.state(teacher)
    assert state.attempts == 2 and state.resumed_step > 0  # from its last periodic checkpoint
    assert all(store.is_done(job_id) for job_id in jobs_by_title(tmp_path).values())
