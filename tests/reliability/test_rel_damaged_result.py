"""Issue 18, item 3: a damaged ``result.json`` is not trusted.

A result that does not parse, lacks a required key, names another job, or sits beside a
missing or damaged ``model.pt`` makes its job not done: it is set aside as
``result.json.rejected`` with a warning and a note in the job's state, ``kdflow status`` and
``kdflow report`` say so in one line, and the next run resumes the job from its last
checkpoint and ends with the same result. The check reads each file once per version.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from rel_checkpoint_jobs import QUIET, vanilla_job

from kdflow.orchestrator.runner import run_job
from kdflow.orchestrator.status import status_table
from kdflow.orchestrator.store import JobStore, result_problem
from kdflow.orchestrator.study import JobGraph

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 8, 5
LAST_CHECKPOINT = EPOCHS * STEPS_PER_EPOCH


def _truncate_result(folder: Path) -> None:
    path = folder / "result.json"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _drop_metrics(folder: Path) -> None:
    record = json.loads((folder / "result.json").read_text())
    del record["metrics"]
    (folder / "result.json").write_text(json.dumps(record))


def _other_job(folder: Path) -> None:
    record = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**record, "job_id": "0" * 16}))


def _remove_weights(folder: Path) -> None:
    (folder / "model.pt").unlink()


def _flip_a_weights_bit(folder: Path) -> None:
    data = bytearray((folder / "model.pt").read_bytes())
    data[random.Random(3).randrange(len(data) // 4, len(data) // 2)] ^= 0x04
    (folder / "model.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_truncate_result, "not readable JSON"),
    (_drop_metrics, "missing metrics"),
    (_other_job, "it records job '0000000000000000', not this one"),
    (_remove_weights, "model.pt is missing"),
    (_flip_a_weights_bit, "model.pt fails its checksum"),
])
def test_a_damaged_result_is_set_aside_noted_and_the_job_resumes_from_its_checkpoint(
        study, tmp_path, caplog, damage: Callable[[Path], None], reason: str) -> None:
    job = vanilla_job(study, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    store = JobStore(tmp_path / "jobs")
    expected = run_job(job, store, QUIET)
    folder = store.job_dir(job.job_id)
    damage(folder)

    table = status_table(JobGraph("unit", [job]), store).splitlines()
    assert " pending " in next(line for line in table if line.startswith(job.job_id))
    assert f"  {job.job_id} (survived): result.json was damaged ({reason}" in "\n".join(table)
    assert not store.is_done(job.job_id) and store.result(job.job_id) is None
    assert (folder / "result.json.rejected").exists() and not (folder / "result.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdflow.store"]
    assert len(warnings) == 1 and reason in warnings[0] and "set aside" in warnings[0]
    state = store.state(job.job_id)
    assert state.status == "pending" and reason in state.notes[-1]

    result = run_job(job, store, QUIET)
    assert store.state(job.job_id).resumed_step == LAST_CHECKPOINT  # no epoch trained again
    assert result["metrics"] == expected["metrics"] and result["history"] == expected["history"]
    assert store.is_done(job.job_id) and store.state(job.job_id).status == "done"


def test_each_file_version_is_verified_once(study, tmp_path) -> None:
    job = vanilla_job(study, 1, 2, 2)
    store = JobStore(tmp_path / "jobs")
    run_job(job, store, QUIET)
    result_problem.cache_clear()
    for _ in range(3):
        assert store.is_done(job.job_id) and store.result(job.job_id)["job_id"] == job.job_id
    assert result_problem.cache_info().misses == 1
    weights = store.weights_path(job.job_id)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert store.is_done(job.job_id)
    assert result_problem.cache_info().misses == 2  # a changed file is verified again


def _kdflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_status_report_and_run_say_so_in_one_line_instead_of_a_traceback(tmp_path) -> None:
    common = ["study=smoke", "progress=false", "launcher.workers=2", f"output_dir={tmp_path}"]
    assert _kdflow("run", *common).returncode == 0
    results = sorted(tmp_path.glob("jobs/*/result.json"))
    before = {path.parent.name: json.loads(path.read_text())["metrics"] for path in results}
    _truncate_result(results[0].parent)
    _remove_weights(results[1].parent)

    report = _kdflow("report", *common)
    assert report.returncode == 0 and "Traceback" not in report.stderr
    lines = report.stderr.strip().splitlines()
    assert len(lines) == 2 and all("was damaged" in line and "set aside" in line for line in lines)
    status = _kdflow("status", *common)
    assert status.returncode == 0 and status.stderr == ""
    assert status.stdout.count(" pending ") == 2 and "3 done, 2 pending" in status.stdout
    assert status.stdout.count("(survived): result.json was damaged") == 2

    again = _kdflow("run", *common)
    assert again.returncode == 0 and "2 run, 3 skipped" in again.stdout
    after = {path.parent.name: json.loads(path.read_text())["metrics"]
             for path in tmp_path.glob("jobs/*/result.json")}
    assert after == before
