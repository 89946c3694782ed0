"""``JobSpec.init_from``: its place in the job id, and a job started from a donor's checkpoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdflow.orchestrator.checkpoint import checkpoint_path, init_checkpoint_path, latest_checkpoint_path
from kdflow.orchestrator.runner import JobFailed, RunOptions, run_job
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
SPEC = JobSpec("distill", "kd", "resnet8", "digits", 0, {"temperature": 4.0}, {"n": 1},
               {"epochs": 2, "lr": 0.05}, teacher="resnet20", teacher_job="abc")


def test_a_spec_without_init_from_keeps_its_id_and_one_with_it_gets_another():
    assert SPEC.job_id == "8dcdc3cd52404a67"  # computed before init_from existed
    donated = dataclasses.replace(SPEC, init_from=f"{SPEC.job_id}@40")
    assert donated.job_id != SPEC.job_id
    assert donated.job_id != dataclasses.replace(SPEC, init_from=f"{SPEC.job_id}@41").job_id
    assert donated.donor == (SPEC.job_id, 40) and SPEC.donor is None
    assert donated.title.endswith(f" (from {SPEC.job_id[:8]})") and "from" not in SPEC.title
    assert JobSpec.from_json(donated.to_json()).job_id == donated.job_id


@pytest.fixture
def trained_donor(study, tmp_path):
    """A finished 2-epoch kd job, its teacher trained first: (store, job, its checkpoint step)."""
    study["student_recipe"] = {**study["student_recipe"], "epochs": 2, "lr_milestones": [3]}
    graph = expand_study(study)
    store = JobStore(tmp_path)
    run_job(next(j for j in graph.jobs if j.stage == "teacher"), store, QUIET)
    donor = next(j for j in graph.jobs if j.method == "kd")
    run_job(donor, store, QUIET)
    step = _step_of(latest_checkpoint_path(store.checkpoint_dir(donor.job_id)))
    return store, donor, step


def _step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def test_a_job_from_a_donor_continues_at_the_donors_epoch_with_its_own_settings(trained_donor):
    store, donor, step = trained_donor
    recipe = {**donor.recipe, "epochs": 3, "lr": 0.02, "lr_milestones": [1]}
    job = dataclasses.replace(donor, recipe=recipe,
                              method_cfg={**donor.method_cfg, "temperature": 2.0}, init_from=f"{donor.job_id}@{step}")
    result = run_job(job, store, QUIET)
    donor_history = store.result(donor.job_id)["history"]
    assert result["history"][:2] == donor_history and len(result["history"]) == 3
    assert result["history"][2]["lr"] == pytest.approx(0.02 * recipe.get("lr_decay", 0.1))
    assert store.state(job.job_id).resumed_step == step


def test_the_donors_checkpoint_kept_in_the_init_folder_outlives_the_donors(trained_donor):
    store, donor, step = trained_donor
    job = dataclasses.replace(donor, recipe={**donor.recipe, "epochs": 3},
                              init_from=f"{donor.job_id}@{step}")
    kept = init_checkpoint_path(store.checkpoint_dir(job.job_id), step)
    kept.parent.mkdir(parents=True)
    checkpoint_path(store.checkpoint_dir(donor.job_id), step).rename(kept)
    assert len(run_job(job, store, QUIET)["history"]) == 3


def test_a_missing_donor_checkpoint_fails_the_job_clearly(trained_donor):
    store, donor, step = trained_donor
    job = dataclasses.replace(donor, recipe={**donor.recipe, "epochs": 3},
                              init_from=f"{donor.job_id}@{step + 1}")
    with pytest.raises(JobFailed, match=f"starts from job {donor.job_id} at step {step + 1}"):
        run_job(job, store, QUIET)
    assert store.state(job.job_id).status == "failed"
