"""MLflow through a real `mlflow server` on 127.0.0.1: what a job logs arrives intact."""
from __future__ import annotations

import pytest

from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study
from tests.mlflow_server import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server with a SQLite store and proxied artifacts; yields its URI."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server.uri
    server.stop()


def test_job_logs_tags_params_metrics_and_result_to_server(study, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    study["methods"] = {"vanilla": {}}
    (job,) = expand_study(study).jobs
    store = JobStore(tmp_path / "jobs")
    options = RunOptions(tracking_uri=mlflow_server, experiment="server-study", progress=False)
    result = run_job(job, store, options)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("server-study")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id == store.state(job.job_id).mlflow_run_id
    assert run.data.tags["kdflow.job_id"] == job.job_id
    assert run.data.tags["kdflow.method"] == "vanilla"
    assert run.data.tags["kdflow.student"] == "resnet8"
    assert run.data.tags["kdflow.seed"] == "0"
    assert run.data.params["recipe.epochs"] == "2"
    assert run.data.tags["kdflow.device"] == "cpu"
    assert run.data.tags["kdflow.fast_path.bf16"] == "False"
    assert run.data.tags["kdflow.fast_path.compile_mode"] == "None"
    assert run.data.params["dataset_cfg.num_train"] == "128"
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in history] == [0, 1]
    assert [m.value for m in history] == [h["val/top1"] for h in result["history"]]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert "result.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
