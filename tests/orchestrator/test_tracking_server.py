"""MLflow through a real `mlflow server` on 127.0.0.1: what a job logs arrives intact."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.runner import RunOptions, run_job
from orchestrator.store import JobStore
from orchestrator.study import expand_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server with a SQLite store and proxied artifacts; yields its URI."""
    port = _free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


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
    assert run.data.params["dataset_cfg.num_train"] == "128"
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in history] == [0, 1]
    assert [m.value for m in history] == [h["val/top1"] for h in result["history"]]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert "result.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
