"""The embedded SQLite tracking store keeps its artifacts beside itself, whatever the working
directory (MLflow's default would be ``./mlruns`` under it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdflow.orchestrator.tracking import ensure_experiment, mlflow_client, resolve_tracking_uri


@pytest.mark.slow
def test_embedded_store_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    uri = resolve_tracking_uri(None, tmp_path / "outputs")
    before = os.getcwd()
    os.chdir(elsewhere)
    try:
        experiment_id = ensure_experiment(uri, "study")
        client = mlflow_client(uri)
        run = client.create_run(experiment_id)
        (tmp_path / "result.json").write_text("{}")
        client.log_artifact(run.info.run_id, str(tmp_path / "result.json"))
    finally:
        os.chdir(before)
    assert client.get_experiment(experiment_id).artifact_location == \
        (tmp_path / "outputs" / "mlartifacts").as_uri()
    assert list((tmp_path / "outputs" / "mlartifacts").rglob("result.json"))
    assert not any(elsewhere.iterdir())  # nothing written where kdflow was started
