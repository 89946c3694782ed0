"""What MLflow's UI shows of kdflow's runs (issue 20): experiments open on their runs, run
names tell sweep points and ablations apart, and the obvious columns (``val/top1``, method,
teacher, student, seed, dataset) are logged under those names."""
from __future__ import annotations

from pathlib import Path
from typing import List

from kdflow.launch.cli import Session
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, JobTracker,
                                          ensure_experiment, mark_experiments, mlflow_client,
                                          resolve_tracking_uri, run_name)


def _kd_jobs(*overrides: str) -> List[JobSpec]:
    """The KD jobs of study ``quick`` (seed 0) composed with ``overrides``."""
    graph = Session.compose(["study=quick", *overrides], require_data=False).graph
    return [job for job in graph.jobs if job.method == "kd" and job.seed == 0]


def test_a_new_experiment_is_marked_as_model_training(tmp_path: Path) -> None:
    uri = resolve_tracking_uri(None, tmp_path)
    experiment_id = ensure_experiment(uri, "study")
    tags = mlflow_client(uri).get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"


def test_an_older_experiment_is_marked_when_kdflow_uses_it_or_serves_it(tmp_path: Path) -> None:
    uri = resolve_tracking_uri(None, tmp_path)
    client = mlflow_client(uri)
    used = client.create_experiment("made-before-the-fix")
    served = client.create_experiment("served-only")
    ensure_experiment(uri, "made-before-the-fix")
    assert client.get_experiment(used).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(served).tags
    # what `kdflow server` does first (MLflow's own "Default" experiment has no kind either)
    assert sorted(mark_experiments(uri)) == ["Default", "served-only"]
    assert client.get_experiment(served).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert mark_experiments(uri) == []


def test_two_temperatures_give_two_run_names() -> None:
    (hot,) = _kd_jobs("study.methods.kd.temperature=8")
    (cool,) = _kd_jobs("study.methods.kd.temperature=2")
    (default,) = _kd_jobs()
    assert hot.title == cool.title  # the job title alone cannot tell them apart
    assert run_name(hot) == "kd [temperature=8] resnet14->resnet8 digits s0"
    assert run_name(cool) == "kd [temperature=2] resnet14->resnet8 digits s0"
    assert run_name(default) == "kd resnet14->resnet8 digits s0"  # KD's defaults: nothing added


def test_ablation_names_show_their_setting_once_with_other_chosen_settings() -> None:
    jobs = _kd_jobs("+study.ablations.kd.temperature=[2.0,8.0]", "study.methods.kd.kd_weight=0.5")
    names = sorted(run_name(job) for job in jobs)
    assert names == ["kd [temperature=2.0, kd_weight=0.5] resnet14->resnet8 digits s0",
                     "kd [temperature=4.0, kd_weight=0.5] resnet14->resnet8 digits s0",
                     "kd [temperature=8.0, kd_weight=0.5] resnet14->resnet8 digits s0"]


def test_a_logged_run_has_the_obvious_columns_under_their_names(tmp_path: Path) -> None:
    (job,) = _kd_jobs("study.methods.kd.temperature=8")
    uri = resolve_tracking_uri(None, tmp_path)
    tracker = JobTracker(uri, "quick", job, None, tmp_path / "job")
    for epoch in range(2):
        tracker.log_metrics({"train/loss": 1.0, "val/top1": 50.0 + epoch, "lr": 0.1}, step=epoch)
    tracker.finish("FINISHED")
    run = mlflow_client(uri).get_run(tracker.run_id)
    assert run.info.run_name == "kd [temperature=8] resnet14->resnet8 digits s0"
    assert run.data.metrics["val/top1"] == 51.0
    assert run.data.metrics["train/lr"] == 0.1 and "lr" not in run.data.metrics
    expected = {"method": "kd", "teacher": "resnet14", "student": "resnet8", "seed": "0",
                "dataset": "digits"}
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.params["model"] == "resnet8"  # the old name stays
    assert run.data.tags["kdflow.settings"] == "temperature=8"
    assert {k: run.data.tags[f"kdflow.{k}"] for k in expected} == expected


def test_a_tune_trial_name_shows_each_tuned_setting_once() -> None:
    from kdflow.launch.search_space import apply_settings

    (base,) = _kd_jobs()
    trial = apply_settings(base, {"method.temperature": 2.5, "method.kd_weight": 0.9})
    assert run_name(trial) == "kd [method.temperature=2.5, method.kd_weight=0.9] " \
                              "resnet14->resnet8 digits s0"
