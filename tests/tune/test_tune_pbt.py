"""`kdflow tune search.scheduler=pbt` on a real local Ray (2 CPUs): trials exploit each other
through jobs that record ``init_from``, the best settings still make a `kdflow run` line, and
PBT searches that cannot run are refused before Ray starts."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdflow.launch.cli import main

PBT = ["search=kd", "study=quick", "search.scheduler=pbt", "search.num_samples=4",
       "study.student_recipe.epochs=4", "study.student_recipe.lr_milestones=[3]",
       "search.pbt.perturbation_interval=1", "progress=false"]
FINISHED = re.compile(r"^trial (\w+) finished \[\d+/\d+\]: (\d+) epochs", re.M)


@pytest.fixture(scope="module")
def pbt_search(tmp_path_factory):
    """A 4-trial PBT search of KD on digits: (output dir, its output)."""
    out = tmp_path_factory.mktemp("pbt")
    run = subprocess.run([sys.executable, "-m", "kdflow.launch.cli", "tune", *PBT, f"output_dir={out}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run.stdout


def _specs(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "jobs").glob("*/spec.json")}


def test_pbt_trials_finish_and_an_exploited_trial_runs_a_job_from_its_donor(pbt_search):
    out, stdout = pbt_search
    assert [int(e) for _, e in FINISHED.findall(stdout)] == [4] * 4
    specs = _specs(out)
    exploited = {job_id: spec for job_id, spec in specs.items() if spec.get("init_from")}
    assert exploited, "no trial exploited another"
    for job_id, spec in exploited.items():
        donor, step = spec["init_from"].split("@")
        assert donor in specs and int(step) > 0
        if (out / "jobs" / job_id / "result.json").exists():
            assert json.loads((out / "jobs" / job_id / "result.json").read_text())["epochs"] == 4
    assert any((out / "jobs" / j / "result.json").exists() for j in exploited)


def test_pbt_best_settings_are_a_kdflow_run_line_and_name_their_lineage(pbt_search, capsys):
    out, stdout = pbt_search
    best = out / "tune" / "quick" / "kd"
    record = yaml.safe_load((best / "best.yaml").read_text())
    overrides = (best / "best.overrides").read_text().split()
    assert main(["run", "--dry-run", *overrides]) == 0
    plan = capsys.readouterr().out
    if record["init_from"] is None:
        assert "descends from another via PBT" not in stdout
        assert re.search(rf"^{record['job_id']}\s+distill\s+kd .* done ", plan, re.M), plan
    else:
        assert (f"note: the best trial descends from another via PBT (job {record['job_id']} "
                f"starts from job {record['init_from']})") in stdout
        assert record["job_id"] not in plan  # the settings alone give a job from scratch


@pytest.mark.parametrize("override, field", [
    ("search.search_alg=grid", "search.search_alg"),
    ("search.pbt.perturbation_interval=0", "search.pbt.perturbation_interval"),
    ("search.space={method:{temperature:{type:grid,values:[2,4]}}}", "search.space"),
])
def test_a_pbt_search_that_cannot_run_is_exit_2_before_ray_starts(tmp_path, capsys, override,
                                                                   field):
    import ray

    code = main(["tune", "search=kd", "study=quick", "search.scheduler=pbt", override,
                 f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`{field}`" in err and "No job was started" in err, err
    assert not ray.is_initialized() and not (tmp_path / "jobs").exists()


def test_a_best_trial_from_a_pbt_exploit_gets_settings_only_and_a_lineage_note(tmp_path, study):
    from kdflow.launch.tune import SearchConfig, SearchPlan, TrialRow, write_best
    from kdflow.orchestrator.spec import JobSpec
    from kdflow.orchestrator.store import JobStore
    from kdflow.orchestrator.study import JobGraph, expand_study

    base = next(j for j in expand_study(study).jobs if j.method == "kd")
    job = JobSpec(**{**base.to_json(), "init_from": f"{base.job_id}@12"})
    JobStore(tmp_path / "jobs").add(job)
    search = SearchConfig("kd", "kd", {}, scheduler="pbt")
    plan = SearchPlan(search, [], base, JobGraph("unit", [base]), str(tmp_path), "", ["study=quick"])
    row = TrialRow("t1", {"method.temperature": 2.5}, 80.0, 79.0, 4, job.job_id)
    message = write_best(plan, row)
    assert (f"note: the best trial descends from another via PBT (job {job.job_id} starts from "
            f"job {base.job_id}@12)") in message
    record = yaml.safe_load((plan.search_dir / "best.yaml").read_text())
    assert record["init_from"] == f"{base.job_id}@12"
    assert record["overrides"] == ["study=quick", "study.methods.kd.temperature=2.5"]
