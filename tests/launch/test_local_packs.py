"""The local launcher runs packs: in its worker processes and in this process, with each job's
numbers those of the job run alone, and a poisoned member failing alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from kdflow.launch.launchers import LocalLauncher
from kdflow.launch.local import run_local
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.pack import pack_id
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.status import status_table
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
#: hint_weight 1e39 overflows float32: FitNet's loss is inf from the first step.
POISONED = {"kd": {}, "crd": {"num_negatives": 32}, "msdcrd": {}, "fitnet": {"hint_weight": 1.0e39}}


def _solo(graph, root: Path) -> Dict[str, Any]:
    """Every job of ``graph`` run alone, in order, on one thread (teacher first)."""
    store = JobStore(root / "jobs")
    ends = {}
    for job in graph.jobs:
        try:
            ends[job.job_id] = run_job(job, store, RunOptions(progress=False, threads=1))
        except Exception as err:
            ends[job.job_id] = err
    return ends


def test_the_pack_setting_is_checked_before_anything_runs():
    assert LocalLauncher({"name": "local"}).pack == 8
    assert LocalLauncher({"name": "local", "pack": 1}).pack == 1
    with pytest.raises(ConfigError, match="launcher.pack.*launcher.pack=1"):
        LocalLauncher({"name": "local", "pack": 0})


def test_status_names_the_pack_of_each_running_job(study, tmp_path):
    study["methods"] = {"kd": {}, "fitnet": {}}
    graph = expand_study(study)
    store = JobStore(tmp_path)
    kd, fitnet = (j for j in graph.jobs if j.stage == "distill")
    for job in graph.jobs:
        store.add(job)
    name = pack_id([kd.job_id, fitnet.job_id])
    store.update_state(kd.job_id, status="running", pack=name)
    store.update_state(fitnet.job_id, status="failed", pack=name, error="x")
    lines = status_table(graph, store).splitlines()
    assert "pack" in lines[0].split()
    assert name in next(line for line in lines if line.startswith(kd.job_id))
    assert name not in next(line for line in lines if line.startswith(fitnet.job_id))
    store.update_state(kd.job_id, status="done")
    assert "pack" not in status_table(graph, store).splitlines()[0].split()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_local_packs_equal_solo_runs_and_a_poisoned_member_fails_alone(study, tmp_path, workers):
    study["methods"] = {"vanilla": {}, **POISONED}
    study["student_recipe"] = {**study["student_recipe"], "checkpoint_every_steps": 3}
    graph = expand_study(study)
    solo = _solo(graph, tmp_path / "alone")
    summary = run_local(graph, str(tmp_path / "packed"),
                        RunOptions(progress=False, threads=1), workers=workers, pack=8)
    store = JobStore(tmp_path / "packed" / "jobs")
    fitnet = next(j for j in graph.jobs if j.method == "fitnet")
    assert set(summary.failed) == {fitnet.job_id}
    assert "non-finite loss at step 0" in store.state(fitnet.job_id).error
    assert not store.weights_path(fitnet.job_id).exists()
    packed = [j for j in graph.jobs if j.stage == "distill" and j.teacher_job]
    groups: Dict[str, list] = {}
    for job in packed:
        groups.setdefault(store.state(job.job_id).pack, []).append(job.job_id)
    assert all(name == pack_id(ids) and len(ids) > 1 for name, ids in groups.items())
    # one worker: one pack of 4; two: split in two when the second worker is free then
    assert sorted(map(len, groups.values())) in ([[4]] if workers == 1 else [[4], [2, 2]])
    for job in graph.jobs:
        if job is fitnet:
            continue
        result = store.result(job.job_id)
        assert result["metrics"] == solo[job.job_id]["metrics"], job.title
        a = torch.load(tmp_path / "alone" / "jobs" / job.job_id / "model.pt")
        b = torch.load(store.weights_path(job.job_id))
        assert all(torch.equal(a[k], b[k]) for k in a), job.title
    # the next run leaves the finished jobs alone and fails the poisoned one again, alone
    again = run_local(graph, str(tmp_path / "packed"), RunOptions(progress=False, threads=1),
                      workers=workers, pack=8)
    assert set(again.failed) == {fitnet.job_id} and len(again.skipped) == len(graph.jobs) - 1


@pytest.mark.slow
def test_pack_one_runs_every_job_alone(study, tmp_path):
    study["methods"] = {"kd": {}, "fitnet": {}}
    graph = expand_study(study)
    summary = run_local(graph, str(tmp_path), RunOptions(progress=False, threads=1), workers=1,
                        pack=1)
    store = JobStore(tmp_path / "jobs")
    assert summary.ok and all(store.state(j.job_id).pack is None for j in graph.jobs)
