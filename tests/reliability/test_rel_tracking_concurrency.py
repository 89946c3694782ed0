"""Sixteen jobs logging to MLflow at the same moment, through ``JobTracker`` in sixteen processes:
to the embedded SQLite store (one database file, 16 writers) and to a real `mlflow server`.
No run and no metric is lost, nothing is left unsent, and no lock error surfaces."""
from __future__ import annotations

import logging
import multiprocessing
import traceback
from pathlib import Path
from typing import Any, Dict, List


from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.study import expand_study
from kdflow.orchestrator.tracking import MLFLOW_METRIC_NAMES, JobTracker, RUN_TOKEN_TAG
from kdflow.orchestrator.tracking_outbox import Outbox
from tests.mlflow_server import MlflowServer

JOBS = 16
EPOCHS = 4
EXPERIMENT = "concurrent"


def epoch_metrics(job: int, epoch: int) -> Dict[str, float]:
    """What job number ``job`` logs at ``epoch``: values unique to the job and epoch."""
    return {"train/loss": 1.0 / (epoch + 1) + job, "val/top1": 10.0 * epoch + job / 100,
            "val/top5": 20.0 * epoch + job / 100, "lr": 0.05 / (job + 1)}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _log_job(uri: str, spec: JobSpec, job: int, job_dir: Path, start: Any, out: Any) -> None:
    """One process: wait for all sixteen, then log a whole job; put what happened on ``out``."""
    records = _Records()
    tracking_log = logging.getLogger("kdflow.orchestrator.tracking")
    tracking_log.addHandler(records)
    tracking_log.setLevel(logging.DEBUG)
    outcome: Dict[str, Any] = {"job": job}
    try:
        start.wait(timeout=300)
        tracker = JobTracker(uri, EXPERIMENT, spec, None, job_dir)
        for epoch in range(EPOCHS):
            tracker.log_metrics(epoch_metrics(job, epoch), step=epoch)
        result = job_dir / "result.json"
        result.write_text(f'{{"job": {job}}}')
        tracker.log_artifact(result)
        tracker.finish("FINISHED")
        outcome["run_id"] = tracker.run_id
    except Exception:
        outcome["error"] = traceback.format_exc()
    outcome["warnings"] = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    outcome["retries"] = sum("retrying" in r.getMessage() for r in records.records)
    out.put(outcome)


def log_sixteen_jobs_at_once(uri: str, root: Path, study: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Fork sixteen processes that each log one job of ``study`` to ``uri``; their outcomes."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  imported once, not in each child
    import mlflow.tracking  # noqa: F401
    study["methods"] = {"vanilla": {}}
    study["seeds"] = list(range(JOBS))
    specs = expand_study(study).jobs
    assert len(specs) == JOBS
    fork = multiprocessing.get_context("fork")
    start, out = fork.Barrier(JOBS), fork.Queue()
    procs = [fork.Process(target=_log_job, args=(uri, spec, job, root / f"job{job}", start, out))
             for job, spec in enumerate(specs)]
    for proc in procs:
        proc.start()
    outcomes = sorted((out.get(timeout=600) for _ in procs), key=lambda o: o["job"])
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * JOBS
    for outcome in outcomes:
        outcome["spec"] = specs[outcome["job"]]
    return outcomes


def assert_nothing_lost(uri: str, root: Path, outcomes: List[Dict[str, Any]]) -> None:
    from mlflow.tracking import MlflowClient

    assert [o.get("error") for o in outcomes] == [None] * JOBS
    assert [o["warnings"] for o in outcomes] == [[]] * JOBS
    assert [len(Outbox(root / f"job{o['job']}").read().pending) for o in outcomes] == [0] * JOBS
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == JOBS
    for outcome in outcomes:
        run = runs[outcome["run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["kdflow.job_id"] == outcome["spec"].job_id
        assert RUN_TOKEN_TAG in run.data.tags
        assert run.data.params["seed"] == str(outcome["spec"].seed)
        for name in epoch_metrics(0, 0):
            logged = MLFLOW_METRIC_NAMES.get(name, name)  # lr is train/lr in MLflow
            points = sorted(client.get_metric_history(run.info.run_id, logged),
                            key=lambda m: m.step)
            assert [(m.step, m.value) for m in points] == [
                (epoch, epoch_metrics(outcome["job"], epoch)[name]) for epoch in range(EPOCHS)]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]


def test_sixteen_jobs_log_at_once_to_the_embedded_sqlite_store(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcomes = log_sixteen_jobs_at_once(uri, tmp_path, study)
    assert_nothing_lost(uri, tmp_path, outcomes)


def test_sixteen_jobs_log_at_once_to_a_server(study, tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        outcomes = log_sixteen_jobs_at_once(server.uri, tmp_path, study)
        assert_nothing_lost(server.uri, tmp_path, outcomes)
    finally:
        server.stop()
