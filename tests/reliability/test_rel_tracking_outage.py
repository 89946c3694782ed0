"""Tracking outages: a real `mlflow server` stopped (and started again) while a job trains.

Training goes on; what could not be sent waits in the job's outbox and reaches MLflow at the
next epoch or through `kdflow sync`, every metric of every epoch exactly once.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import pytest

from kdflow.launch.cli import Session, main
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study
from kdflow.orchestrator.tracking import (MLFLOW_METRIC_NAMES, JobTracker, ensure_experiment,
                                          sync_job)
from kdflow.orchestrator.tracking_outbox import Outbox
from tests.mlflow_server import MlflowServer

EPOCHS = 5


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the module's outages (each test stops and restarts it; the experiments
    differ): starting one is the slow part of these tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def server(shared_server):
    """The shared server, running when the test starts (whatever the previous test left)."""
    if shared_server.proc is None:
        shared_server.start()
    return shared_server




def assert_tracked_once(uri: str, experiment: str, run_id: str,
                        history: List[Dict[str, float]]) -> None:
    """The experiment holds one FINISHED run, ``run_id``, with every metric of every epoch of
    ``history`` (result.json's) exactly once, and result.json as an artifact."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    names = [name for name in history[0] if name != "epoch"]
    assert {"train/loss", "val/top1", "lr"} <= set(names)
    for name in names:
        logged = MLFLOW_METRIC_NAMES.get(name, name)  # lr is train/lr in MLflow
        points = sorted(client.get_metric_history(run_id, logged), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(len(history))), name
        assert [m.value for m in points] == [epoch[name] for epoch in history], name
    assert "result.json" in {a.path for a in client.list_artifacts(run_id)}


def test_server_stopped_after_first_epoch_and_restarted_gets_every_metric_once(
        server, study, tmp_path, caplog):
    study["methods"] = {"vanilla": {}}
    study["student_recipe"].update(epochs=EPOCHS, lr_milestones=[3])
    (job,) = expand_study(study).jobs
    store = JobStore(tmp_path / "jobs")
    outbox = Outbox(store.job_dir(job.job_id))
    kept: Dict[int, int] = {}

    def outage(epoch: int, metrics: Dict[str, float]) -> None:
        kept[epoch] = len(outbox.read().pending)
        if epoch == 0:
            server.stop()  # epoch 0 is in MLflow; epochs 1 and 2 find the server down
        elif epoch == 2:
            server.start()  # epoch 3 sends the kept epochs first, then its own

    options = RunOptions(tracking_uri=server.uri, experiment="outage", progress=False,
                         on_epoch=outage)
    with caplog.at_level(logging.WARNING, logger="kdflow.orchestrator.tracking"):
        result = run_job(job, store, options)
    assert store.state(job.job_id).status == "done"
    assert kept == {0: 0, 1: 1, 2: 2, 3: 0, 4: 0}
    assert "training goes on" in caplog.text
    assert outbox.read().pending == []
    assert_tracked_once(server.uri, "outage", store.state(job.job_id).mlflow_run_id,
                        result["history"])


def test_server_down_to_the_end_then_kdflow_sync_sends_the_rest_once(server, tmp_path, capsys):
    overrides = ["study=smoke", f"study.student_recipe.epochs={EPOCHS}",
                 "study.student_recipe.lr_milestones=[3]", "progress=false",
                 f"output_dir={tmp_path / 'out'}", f"tracking_uri={server.uri}"]
    session = Session.compose(overrides)
    job = next(j for j in session.graph.jobs if (j.stage, j.method) == ("distill", "vanilla"))
    job_dir = session.store.job_dir(job.job_id)

    def outage(epoch: int, metrics: Dict[str, float]) -> None:
        if epoch == 0:
            server.stop()

    options = RunOptions(tracking_uri=server.uri, experiment=session.graph.study,
                         progress=False, on_epoch=outage)
    result = run_job(job, session.store, options)
    assert session.store.state(job.job_id).status == "done"
    pending = Outbox(job_dir).read().pending
    assert [(r["op"], r.get("step")) for r in pending] == [
        *[("metrics", epoch) for epoch in range(1, EPOCHS)], ("artifact", None),
        ("status", None)]

    assert main(["sync", *overrides]) == 1
    refused = capsys.readouterr().err
    assert "unreachable" in refused and server.uri in refused
    assert len(Outbox(job_dir).read().pending) == len(pending)

    server.start()
    assert main(["sync", *overrides]) == 0
    sent = capsys.readouterr().out
    assert f"sent {EPOCHS - 1} metrics (steps 1-{EPOCHS - 1}), 1 artifact, 1 status" in sent
    assert Outbox(job_dir).read().pending == []
    assert_tracked_once(server.uri, "smoke", session.store.state(job.job_id).mlflow_run_id,
                        result["history"])

    assert main(["sync", *overrides]) == 0
    assert "nothing to send" in capsys.readouterr().out
    assert_tracked_once(server.uri, "smoke", session.store.state(job.job_id).mlflow_run_id,
                        result["history"])


def test_server_down_from_the_start_creates_the_run_on_sync(server, study, tmp_path):
    """No run could be made at the start: the send `kdflow sync` makes creates it, and records
    its id in the job's state."""
    study["methods"] = {"vanilla": {}}
    (job,) = expand_study(study).jobs
    store = JobStore(tmp_path / "jobs")
    server.stop()
    result = run_job(job, store, RunOptions(tracking_uri=server.uri, experiment="late",
                                            progress=False))
    assert store.state(job.job_id).mlflow_run_id is None
    ops = [r["op"] for r in Outbox(store.job_dir(job.job_id)).read().pending]
    assert ops == ["create_run", "params", "tags", "metrics", "metrics", "artifact", "status"]
    server.start()
    report = sync_job(server.uri, store.job_dir(job.job_id), None,
                      lambda run_id: store.update_state(job.job_id, mlflow_run_id=run_id))
    assert report.error is None and len(report.sent) == len(ops)
    assert_tracked_once(server.uri, "late", store.state(job.job_id).mlflow_run_id,
                        result["history"])
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(server.uri).get_run(store.state(job.job_id).mlflow_run_id).data.tags
    assert (tags["kdflow.device"], tags["kdflow.fast_path.bf16"]) == ("cpu", "False")


def test_lost_acknowledgements_and_a_torn_line_send_nothing_twice(study, tmp_path, monkeypatch):
    """The outbox as a crash leaves it: calls that reached MLflow but whose acknowledgements
    never got to disk, and half a line. Sending again adds no second run and no metric twice."""
    monkeypatch.chdir(tmp_path)  # the embedded store keeps artifacts under ./mlruns
    study["methods"] = {"vanilla": {}}
    (job,) = expand_study(study).jobs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(uri, "crash")
    job_dir = tmp_path / "job"
    tracker = JobTracker(uri, "crash", job, None, job_dir)
    history = [{"epoch": e, "train/loss": 1.0 / (e + 1), "val/top1": 10.0 * e, "lr": 0.05}
               for e in range(3)]
    for epoch in history:
        tracker.log_metrics({k: v for k, v in epoch.items() if k != "epoch"}, step=epoch["epoch"])
    result = tmp_path / "result.json"
    result.write_text("{}")
    tracker.log_artifact(result)
    tracker.finish("FINISHED")
    run_id = tracker.run_id

    outbox = Outbox(job_dir)
    lines = outbox.path.read_text().splitlines()
    records = [line for line in lines if '"ack"' not in line]
    outbox.path.write_text("\n".join(records) + '\n{"seq": 99, "op": "metr')
    assert len(outbox.read().pending) == len(records) and outbox.read().torn == 1

    again = JobTracker(uri, "crash", job, None, job_dir)  # a restarted job: no run id in its state
    again.finish("FINISHED")
    assert again.run_id == run_id
    assert outbox.read().pending == []
    assert_tracked_once(uri, "crash", run_id, history)
