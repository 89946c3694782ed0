"""Numerical faults: a NaN or infinite loss stops its job with a failed state naming the first
bad step, its epoch and the loss terms; no checkpoint keeps the poisoned weights; the rest of
the study goes on and the jobs that need the failed one are blocked, naming it.

The divergence is real: the teacher recipe multiplies the learning rate by 1e9 at epoch 1
(``lr_decay`` is only required to be positive), so the teacher trains normally for one epoch,
writes good checkpoints, then blows up a few steps into the next.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from typing import Dict

import pytest
import torch

import kdflow.orchestrator.training as training
from kdflow.launch.cli import main
from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS
from kdflow.orchestrator.checkpoint import checkpoint_path, latest_checkpoint_path
from kdflow.orchestrator.data import build_data
from kdflow.orchestrator.loss_guard import TOTAL, LossGuard
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.runner import JobFailed, RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

CPU = torch.device("cpu")
FAULT = re.compile(r"non-finite loss at step (\d+) \(epoch (\d+)\): (.+)$")
# one epoch at lr 0.05, then lr 5e7: the teacher diverges early in epoch 1
DIVERGING_TEACHER = {"lr_milestones": [1], "lr_decay": 1e9}


def _values(**values: float) -> Dict[str, torch.Tensor]:
    return {name: torch.tensor(value) for name, value in values.items()}


def test_an_inf_in_one_term_is_named_with_the_first_bad_step():
    guard = LossGuard(next_step=3, device=CPU)
    guard.observe(_values(loss=1.5, loss_ce=1.0, loss_kd=0.5))  # step 3
    guard.observe(_values(loss=1.2, loss_ce=0.9, loss_kd=0.3))  # step 4
    assert guard.first_fault() is None
    guard.observe(_values(loss=math.inf, loss_ce=0.8, loss_kd=math.inf))  # step 5: the first
    guard.observe(_values(loss=math.nan, loss_ce=math.nan, loss_kd=math.nan))  # step 6
    fault = guard.first_fault()
    assert fault is not None and fault.step == 5
    assert fault.values == {TOTAL: math.inf, "loss_kd": math.inf}
    assert fault.describe(epoch=2) == "non-finite loss at step 5 (epoch 2): loss_kd = inf"


def test_a_sum_that_overflows_is_named_when_every_term_is_finite():
    guard = LossGuard(next_step=0, device=CPU)
    guard.observe(_values(loss=-math.inf, loss_ce=-3e38, loss_kd=-3e38))
    assert guard.first_fault().describe(epoch=0) == (
        "non-finite loss at step 0 (epoch 0): loss (the sum of finite terms) = -inf")


def test_a_new_set_of_terms_keeps_the_first_record():
    guard = LossGuard(next_step=10, device=CPU)
    guard.observe(_values(loss=1.0, loss_ce=1.0))  # step 10
    guard.observe(_values(loss=2.0, loss_ce=1.0, loss_block=1.0))  # step 11: a phase adds a term
    guard.observe(_values(loss=math.nan, loss_ce=1.0, loss_block=math.nan))  # step 12
    guard.observe(_values(loss=math.nan, loss_ce=math.nan))  # step 13: the phase ends
    fault = guard.first_fault()
    assert (fault.step, fault.values.keys()) == (12, {TOTAL, "loss_block"})


def test_observing_steps_reads_nothing_back_from_the_device():
    """On the meta device a tensor has no values, so any host read (a sync on an accelerator)
    raises: observing many steps needs none; only first_fault() reads."""
    guard = LossGuard(next_step=0, device=torch.device("meta"))
    for _ in range(20):
        guard.observe({name: torch.empty((), device="meta") for name in (TOTAL, "loss_ce")})
    with pytest.raises(RuntimeError, match="meta"):
        guard.first_fault()


def _teacher(study: dict, checkpoint_every_steps: int):
    study["teacher_recipe"].update(DIVERGING_TEACHER, checkpoint_every_steps=checkpoint_every_steps)
    return next(job for job in expand_study(study).jobs if job.stage == "teacher")


def _terms_at(store: JobStore, job_id: str, step: int) -> Dict[str, float]:
    """The loss terms the job computes at global ``step`` from its checkpoint ``step-<step>``
    (the state before that step), recomputed here outside the runner."""
    spec = store.spec(job_id)
    recipe = parse_config(Recipe, spec.recipe, "recipe")
    data = build_data(spec.dataset, spec.dataset_cfg, "dataset", recipe.batch_size, spec.seed, CPU)
    cls = DISTILLERS.get(spec.method)
    cfg = parse_config(cls.Config, spec.method_cfg, "method")
    distiller = cls(cls.build_student(cfg, spec.model, data.info.num_classes), None, cfg, data.info)
    state = torch.load(checkpoint_path(store.checkpoint_dir(job_id), step), weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["distiller"].values() if t.is_floating_point())
    distiller.load_state_dict(state["distiller"], strict=False)
    distiller.train()
    epoch, index = divmod(step, data.train.steps_per_epoch)
    batch = next(iter(data.train.batches(epoch, index)))
    with torch.no_grad():
        _, terms = distiller(batch.x, batch.y, batch.index)
    return {name: float(value) for name, value in terms.items()}


def test_a_diverging_job_fails_at_its_first_bad_step_and_keeps_its_last_good_checkpoint(study, tmp_path):
    teacher = _teacher(study, checkpoint_every_steps=1)
    store = JobStore(tmp_path / "jobs")
    with pytest.raises(JobFailed) as failed:
        run_job(teacher, store, RunOptions(progress=False))
    step, epoch, terms = FAULT.match(str(failed.value)).groups()
    step = int(step)
    steps_per_epoch = 128 // 32
    assert epoch == "1" and steps_per_epoch <= step < 2 * steps_per_epoch
    assert "loss_ce = nan" in terms or "loss_ce = inf" in terms
    state = store.state(teacher.job_id)
    assert state.status == "failed" and state.error == f"JobFailed: {failed.value}"
    # checkpoints after every step: the newest is the state before the bad step, not after it
    assert latest_checkpoint_path(store.checkpoint_dir(teacher.job_id)).name == f"step-{step:09d}.pt"
    assert not store.is_done(teacher.job_id) and not store.weights_path(teacher.job_id).exists()
    # recomputed outside the runner: the step before was finite, the reported one is not
    assert all(math.isfinite(v) for v in _terms_at(store, teacher.job_id, step - 1).values())
    assert not all(math.isfinite(v) for v in _terms_at(store, teacher.job_id, step).values())


def test_checked_only_before_checkpoints_the_first_bad_step_is_still_the_one_reported(
        study, tmp_path, monkeypatch):
    """The accelerator's way (no host sync per step), forced on the CPU: the fault is read
    only before a checkpoint and at the epoch end, and the report is the same."""
    eager = _teacher(study, checkpoint_every_steps=5)
    with pytest.raises(JobFailed) as expected:
        run_job(eager, JobStore(tmp_path / "eager" / "jobs"), RunOptions(progress=False))

    class DeferredGuard(LossGuard):
        def __init__(self, next_step: int, device: torch.device) -> None:
            super().__init__(next_step, device)
            self.eager = False

    monkeypatch.setattr(training, "LossGuard", DeferredGuard)
    store = JobStore(tmp_path / "deferred" / "jobs")
    with pytest.raises(JobFailed) as deferred:
        run_job(eager, store, RunOptions(progress=False))
    assert str(deferred.value) == str(expected.value)
    step = int(FAULT.match(str(deferred.value)).group(1))
    # saved at steps 4 (epoch end) and 5; the fault at step > 5 is found at the epoch's end
    # (step 8), before that checkpoint is written
    assert step > 5
    kept = sorted(p.name for p in store.checkpoint_dir(eager.job_id).glob("step-*.pt"))
    assert kept == ["step-000000004.pt", "step-000000005.pt"]


def _kdflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_diverging_teacher_fails_its_students_are_blocked_and_the_study_goes_on(tmp_path, capsys):
    """smoke study: the trained teacher (which diverges) with KD's student, and a randomly
    initialised teacher (no training, so no divergence) with a projection-KD student, plus the
    student alone; two worker processes."""
    study = ["study=smoke", f"output_dir={tmp_path}", "~study.methods.fitnet", "~study.methods.crd",
             "+method@study.methods.inverted_projection=inverted_projection",
             "study.methods.inverted_projection.teacher_init=random",
             *(f"study.teacher_recipe.{k}={v}" for k, v in DIVERGING_TEACHER.items())]
    run = _kdflow("run", *study, "progress=false", "launcher.workers=2")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "3 run, 0 skipped (already done), 1 failed, 1 blocked" in run.stdout, run.stdout
    store = JobStore(tmp_path / "jobs")
    jobs = {store.spec(p.name).title: p.name for p in store.root.iterdir()}
    teacher, kd = jobs["teacher resnet14 synthetic s0"], jobs["kd resnet14->resnet8 synthetic s0"]
    failed = store.state(teacher)
    assert failed.status == "failed" and FAULT.search(failed.error), failed
    assert "loss_ce = nan" in failed.error or "loss_ce = inf" in failed.error
    assert f"failed  {teacher}: {failed.error}" in run.stdout
    blocked = store.state(kd)
    assert blocked.status == "blocked" and blocked.attempts == 0
    assert blocked.error.startswith(f"needs job {teacher} (teacher resnet14 synthetic s0), which failed")
    assert f"blocked {kd}: {blocked.error}" in run.stdout
    for title in ("teacher (random init) resnet14 synthetic s0", "vanilla resnet8 synthetic s0",
                  "inverted_projection resnet14->resnet8 synthetic s0"):
        assert store.is_done(jobs[title]), (title, store.state(jobs[title]))
    report = tmp_path / "reports" / "smoke" / "report.md"
    assert "| Projection KD |" in report.read_text() and "| KD | - |" in report.read_text()

    assert main(["status", *study]) == 0
    status = capsys.readouterr().out
    assert "1 blocked, 3 done, 1 failed" in status
    assert f"{teacher} (failed): {failed.error}" in status
    assert f"{kd} (blocked): needs job {teacher}" in status
