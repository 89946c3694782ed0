"""`kdflow tune` end to end on a real local Ray (2 CPUs): ASHA search, MLflow nesting, the best
settings as a `kdflow run` line, resuming after a restart and after Ctrl-C, and bad spaces."""
from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from kdflow.launch.cli import main

SEARCH = ["search=kd", "study=quick", "study.student_recipe.epochs=4",
          "study.student_recipe.lr_milestones=[3]", "search.asha.grace_period=1", "progress=false"]
FINISHED = re.compile(r"^trial (\w+) finished \[\d+/\d+\]: (\d+) epochs", re.M)


def _kdflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=600)


def _attempts(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["attempts"]
            for p in (out / "jobs").glob("*/state.json")}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """An 8-trial ASHA search of KD on digits: (output dir, the first run's output)."""
    out = tmp_path_factory.mktemp("tune")
    first = _kdflow("tune", *SEARCH, f"output_dir={out}")
    assert first.returncode == 0, first.stdout + first.stderr
    return out, first.stdout


def test_asha_search_stops_some_trials_early_and_nests_runs_in_mlflow(searched):
    out, stdout = searched
    epochs = [int(e) for _, e in FINISHED.findall(stdout)]
    assert len(epochs) == 8
    assert max(epochs) == 4 and min(epochs) < 4  # ASHA stopped some trials
    assert "| trial | settings | best val/top1 | last val/top1 | epochs |" in stdout
    db = sqlite3.connect(out / "mlflow.db")
    (experiment,) = db.execute("select experiment_id from experiments "
                               "where name='quick-tune-kd'").fetchone()
    runs = {r for (r,) in db.execute("select run_uuid from runs where experiment_id=?", (experiment,))}
    parents = db.execute("select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall()
    (parent,) = {value for _, value in parents}
    assert parent in runs and len(parents) == 8 and {r for r, _ in parents} == runs - {parent}
    trial_metrics = db.execute("select count(*) from metrics where key='val/top1' and run_uuid "
                               "in (select run_uuid from tags where key='mlflow.parentRunId')")
    assert trial_metrics.fetchone()[0] == sum(epochs)
    # the search's run shows the best trial: its val/top1 and its settings
    (best,) = db.execute("select value from metrics where key='val/top1' and run_uuid=?",
                         (parent,)).fetchone()
    (top,) = db.execute("select max(value) from metrics where key='val/top1' and run_uuid "
                        "in (select run_uuid from tags where key='mlflow.parentRunId')").fetchone()
    assert best == pytest.approx(top)
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (parent,)).fetchall())
    assert {"best.method.temperature", "best.method.kd_weight", "best.job_id"} <= set(tags)
    params = dict(db.execute("select key, value from params where run_uuid=?", (parent,)))
    assert (params["method"], params["student"], params["dataset"]) == ("kd", "resnet8", "digits")


def test_best_settings_are_a_kdflow_run_line_that_reuses_the_trial(searched, capsys):
    out, _ = searched
    best = out / "tune" / "quick" / "kd"
    overrides = (best / "best.overrides").read_text().split()
    assert any(o.startswith("study.methods.kd.temperature=") for o in overrides)
    assert main(["run", "--dry-run", *overrides]) == 0
    job_id = re.search(r"job_id: (\w+)", (best / "best.yaml").read_text()).group(1)
    plan = capsys.readouterr().out
    assert re.search(rf"^{job_id}\s+distill\s+kd .* done ", plan, re.M), plan


def test_running_the_same_search_again_reruns_no_trial(searched):
    out, _ = searched
    before = _attempts(out)
    again = _kdflow("tune", *SEARCH, f"output_dir={out}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the search" in again.stdout
    assert not FINISHED.findall(again.stdout)
    assert _attempts(out) == before


def _new_search(stdout: str) -> str:
    """The name a run printed its search under (``search kd-1a2b3c4d: tuning ...``)."""
    return re.search(r"^search (\S+): tuning", stdout, re.M).group(1)


def test_a_changed_search_and_more_trials_are_new_searches_not_the_old_one(searched, capsys):
    out, _ = searched
    old_best = out / "tune" / "quick" / "kd" / "best.overrides"
    before = old_best.read_text()
    two_epochs = ["search=kd", "study=quick", "search.num_samples=2", "progress=false",
                  f"output_dir={out}"]  # quick's own 2 epochs, not the 4 of SEARCH
    changed = _kdflow("tune", *two_epochs)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "job.recipe.epochs 4 -> 2" in changed.stdout and "resuming" not in changed.stdout
    epochs = [int(e) for _, e in FINISHED.findall(changed.stdout)]
    assert len(epochs) == 2 and max(epochs) <= 2  # its own trials, at its own epochs
    assert old_best.read_text() == before and "study.student_recipe.epochs=4" in before
    name = _new_search(changed.stdout)
    folder = out / "tune" / "quick" / name
    assert main(["run", "--dry-run", *(folder / "best.overrides").read_text().split()]) == 0
    job_id = re.search(r"job_id: (\w+)", (folder / "best.yaml").read_text()).group(1)
    assert re.search(rf"^{job_id}\s+distill\s+kd .* done ", capsys.readouterr().out, re.M)

    more = _kdflow("tune", *two_epochs, "search.num_samples=3")  # Tune cannot add trials
    assert more.returncode == 0, more.stdout + more.stderr
    assert "cannot change the number of trials" in more.stdout
    assert _new_search(more.stdout) not in (name, "kd")
    assert len(FINISHED.findall(more.stdout)) == 3


def test_interrupted_search_resumes_with_the_remaining_trials_only(tmp_path):
    args = ["tune", *SEARCH, "search.num_samples=6", f"output_dir={tmp_path}"]
    driver = subprocess.Popen([sys.executable, "-m", "kdflow.launch.cli", *args], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first: List[str] = []
    for line in driver.stdout:
        match = FINISHED.match(line)
        if match:
            first.append(match.group(1))
            if len(first) == 2:
                driver.send_signal(signal.SIGINT)
                break
    rest = driver.communicate(timeout=300)[0]
    first += [m.group(1) for m in FINISHED.finditer(rest)]  # trials ending while it stops
    assert driver.returncode == 1, rest
    assert "search incomplete" in rest
    second = _kdflow(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = [t for t, _ in FINISHED.findall(second.stdout)]
    assert sorted(first + resumed) == sorted(set(first + resumed)) and len(first + resumed) == 6


@pytest.mark.parametrize("override, field", [
    ("+search.space.method.tempreature={type:uniform,low:1,high:2}", "search.space.method.tempreature"),
    ("search.space.method.kd_weight.values=[]", "search.space.method.kd_weight.values"),
    ("search.scheduler=hyperband", "search.scheduler"),
])
def test_bad_search_is_exit_2_before_ray_starts(tmp_path, capsys, override, field):
    import ray

    code = main(["tune", "search=kd", "study=quick", override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`{field}`" in err and "No job was started" in err
    assert not ray.is_initialized() and not (tmp_path / "jobs").exists()
