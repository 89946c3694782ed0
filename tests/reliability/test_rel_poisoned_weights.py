"""Issue 18, item 1: a step that poisons the weights while its loss (computed before the update)
is finite (the last step of a job, above all) fails the job: its state names how many values
are NaN or inf and the first tensor holding one; there is no ``model.pt`` and no
``result.json``; ``kdflow run`` exits 1; and the last checkpoint from before the poison resumes
to exactly the weights of a clean run.

The poison: the optimizer's last step of the job fills every parameter but the last with NaN.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

import torch
from rel_checkpoint_jobs import QUIET, checkpoint_steps, vanilla_job

from kdflow.launch.launchers import LocalLauncher, StudyRun
from kdflow.orchestrator.checkpoint import checkpoint_path, read_sealed
from kdflow.orchestrator.loss_guard import nonfinite_tensors, weights_fault
from kdflow.orchestrator.runner import run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 6, 4
LAST = EPOCHS * STEPS_PER_EPOCH
BUFFERS = re.compile(r"\.(running_mean|running_var|num_batches_tracked)$")


def _poison_last_step(monkeypatch) -> list:
    """Patch SGD so that its step number LAST (of this process) leaves every parameter but the
    last NaN; the returned list gets the poisoned value count."""
    poisoned, steps, real_step = [], [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == LAST:
            params = [p for group in self.param_groups for p in group["params"]]
            with torch.no_grad():
                for param in params[:-1]:
                    param.fill_(math.nan)
            poisoned.append(sum(p.numel() for p in params[:-1]))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return poisoned


def test_poisoned_final_weights_fail_the_job_and_the_last_good_checkpoint_resumes(
        study, tmp_path, monkeypatch, capsys):
    job = vanilla_job(study, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    expected = run_job(job, JobStore(tmp_path / "reference" / "jobs"), QUIET)
    store = JobStore(tmp_path / "jobs")
    poisoned = _poison_last_step(monkeypatch)

    one_thread = replace(QUIET, threads=1)  # as the reference and the resumed run
    code = LocalLauncher({"name": "local", "workers": 1}).run(
        StudyRun(JobGraph(study["name"], [job]), str(tmp_path), one_thread, tmp_path / "reports"))
    out = capsys.readouterr().out
    assert code == 1 and "0 run, 0 skipped (already done), 1 failed" in out, out
    # the poisoned epoch end was never checkpointed: the newest checkpoint is from before it
    assert checkpoint_steps(store, job)[-1] == 8
    good = read_sealed(checkpoint_path(store.checkpoint_dir(job.job_id), 8))["distiller"]
    assert not nonfinite_tensors(good).item()
    first = next(name for name in good if not BUFFERS.search(name))
    total = sum(t.numel() for t in good.values() if t.is_floating_point())
    state = store.state(job.job_id)
    assert state.status == "failed"
    assert state.error == (f"JobFailed: non-finite weights after step {LAST} (epoch {EPOCHS - 1}): "
                           f"{poisoned[0]} of {total} values are NaN or inf, the first in {first}")
    assert f"failed  {job.job_id}: {state.error}" in out
    assert not store.weights_path(job.job_id).exists() and not store.is_done(job.job_id)

    monkeypatch.undo()
    result = run_job(job, store, QUIET)
    assert store.state(job.job_id).resumed_step == 8
    assert result["history"] == expected["history"]
    weights = read_sealed(store.weights_path(job.job_id))
    reference = read_sealed(JobStore(tmp_path / "reference" / "jobs").weights_path(job.job_id))
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_the_weights_check_counts_nan_and_inf_and_never_overflows():
    state = {"big": torch.full((4,), 3e38), "counts": torch.tensor([7]),
             "w": torch.tensor([1.0, math.nan, math.inf, -math.inf]), "b": torch.zeros(2)}
    assert nonfinite_tensors({"big": state["big"], "counts": state["counts"]}).item() == 0
    assert nonfinite_tensors(state).item() == 1
    fault = weights_fault(state)
    assert fault.describe("after step 3 (epoch 0)") == (
        "non-finite weights after step 3 (epoch 0): 3 of 10 values are NaN or inf, the first in w")
    assert weights_fault({"big": state["big"]}) is None


def test_the_weights_check_reads_nothing_back_until_asked():
    """On the meta device any host read raises: the count is device work only."""
    state = {name: torch.empty(3, 3, device="meta") for name in ("a", "b")}
    count = nonfinite_tensors(state)
    assert count.device.type == "meta" and count.shape == ()
