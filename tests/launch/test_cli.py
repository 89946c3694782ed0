"""The `kdflow` command end to end: a whole study, re-runs, status, report, and bad input."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from kdflow.launch.cli import main
from kdflow.orchestrator.provenance import SOURCE_ROOT, weights_fingerprint

SMOKE = ["study=smoke", "progress=false", "launcher.workers=2"]


def _kdflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_smoke_study_runs_reports_and_reruns_as_skips(tmp_path):
    out = f"output_dir={tmp_path}"
    first = _kdflow("run", *SMOKE, out)
    assert first.returncode == 0, first.stderr
    assert "5 run, 0 skipped" in first.stdout  # 1 teacher + 4 methods x 1 seed
    assert "| KD |" in first.stdout and "| Teacher |" in first.stdout
    report = tmp_path / "reports" / "smoke"
    for name in ("report.md", "report.csv", "accuracy.png", "curves.png"):
        assert (report / name).stat().st_size > 0
    again = _kdflow("run", *SMOKE, out)
    assert again.returncode == 0 and "0 run, 5 skipped" in again.stdout
    status = _kdflow("status", "study=smoke", out)
    assert status.returncode == 0 and status.stdout.count(" done ") == 5

    db = sqlite3.connect(tmp_path / "mlflow.db")
    (experiment_id,) = db.execute("select experiment_id from experiments where name='smoke'").fetchone()
    runs = db.execute("select run_uuid, status from runs where experiment_id=?", (experiment_id,)).fetchall()
    assert len(runs) == 5 and {s for _, s in runs} == {"FINISHED"}
    tags = {k for (k,) in db.execute("select distinct key from tags")}
    assert {"kdflow.job_id", "kdflow.stage", "kdflow.method", "kdflow.teacher", "kdflow.student",
            "kdflow.dataset", "kdflow.seed"} <= tags
    metric_rows = db.execute("select count(*) from metrics where key='val/top1'").fetchone()[0]
    assert metric_rows == 3 + 4 * 2  # per epoch: teacher 3 epochs, students 2 each

    # provenance: in every result.json and, as tags, on every run
    results = {p.parent.name: json.loads(p.read_text())
               for p in tmp_path.glob("jobs/*/result.json")}
    in_git = (SOURCE_ROOT / ".git").exists()
    for result in results.values():
        provenance = result["provenance"]
        assert {"kdflow_version", "git_commit", "git_dirty", "code_digest", "code_files", "torch",
                "cuda", "cudnn", "device", "teacher_weights"} <= set(provenance)
        assert provenance["kdflow_version"] == "0.1.0" and provenance["torch"] == torch.__version__
        assert (len(provenance["git_commit"]) == 40) if in_git else provenance["git_commit"] is None
    teacher = next(job for job, r in results.items() if r["stage"] == "teacher")
    fingerprint = weights_fingerprint(tmp_path / "jobs" / teacher / "model.pt")
    read = {r["provenance"]["teacher_weights"] for r in results.values() if r["teacher"]}
    assert read == {fingerprint}
    run_tags: dict = {}
    for run, key, value in db.execute("select run_uuid, key, value from tags"):
        run_tags.setdefault(run, {})[key] = value
    for tags_of_run in run_tags.values():
        provenance = results[tags_of_run["kdflow.job_id"]]["provenance"]
        assert tags_of_run["kdflow.code_digest"] == provenance["code_digest"]
        assert tags_of_run["kdflow.version"] == "0.1.0"
        assert tags_of_run["kdflow.torch"] == torch.__version__
        if in_git:
            assert tags_of_run["mlflow.source.git.commit"] == provenance["git_commit"]
            assert tags_of_run["kdflow.git_dirty"] == str(provenance["git_dirty"])


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f"    {verb} " in text for verb in ("run", "status", "report"))


@pytest.mark.parametrize("overrides, field, allowed", [
    (["study=nostudy"], "study", "demo"),
    (["+study.methods.nomethod={}"], "study.methods.nomethod", "crd"),
    (["study.pairs=[{teacher: resnet20, student: resnet7}]"], "study.pairs[0].student", "wrn_40_2"),
    (["study=cifar100_baselines", "study.datasets.cifar100.root=/no/such/folder"],
     "study.datasets.cifar100.root", None),
    (["study.methods.kd.temperature=0"], "study.methods.kd.temperature", None),
    (["study.methods.kd.temperature=-1"], "study.methods.kd.temperature", None),
    (["study.student_recipe.lr=0"], "study.student_recipe.lr", None),
    (["study.methods.fitnet.hint_stage=5"], "study.methods.fitnet.hint_stage", None),
    (["study.methods.kd.temprature=2"], "study.methods.kd.temprature", None),
])
def test_bad_input_exits_2_naming_the_field_and_starts_nothing(tmp_path, capsys, overrides,
                                                                 field, allowed):
    code = main(["run", *overrides, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"`{field}`" in err
    if allowed:
        assert allowed in err
    assert "No job was started" in err
    assert not (tmp_path / "jobs").exists()


def test_benchmark_study_dry_run_without_data_and_clear_error_otherwise(tmp_path, capsys):
    args = ["study=cifar100_benchmark", f"data.root={tmp_path / 'no-cifar'}", f"output_dir={tmp_path}"]
    assert main(["run", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "plan for study cifar100_benchmark" in out and "dry run: nothing was started" in out
    for title in ("msdcrd wrn_40_2->wrn_16_2", "hsakd resnet32x4->ShuffleV2",
                  "inverted_projection [direction=standard] vgg13->vgg8", "spectral_reg resnet8x4"):
        assert title in out
    assert not (tmp_path / "jobs").exists()
    assert main(["run", *args]) == 2
    assert "`study.datasets.cifar100.root`" in capsys.readouterr().err


@pytest.mark.slow
def test_multirun_runs_one_study_per_point_and_shares_the_teacher(tmp_path):
    proc = _kdflow("run", "-m", *SMOKE, f"output_dir={tmp_path}", "study.methods.kd.temperature=2,8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("=== sweep point") == 2
    # point 1 runs 5 jobs; point 2 only its own KD job (teacher and the other students are shared)
    assert "5 run, 0 skipped" in proc.stdout and "1 run, 4 skipped" in proc.stdout
    reports = tmp_path / "reports" / "smoke"
    assert sorted(p.name for p in reports.iterdir()) == ["study.methods.kd.temperature=2",
                                                         "study.methods.kd.temperature=8"]
    assert all((p / "report.md").exists() for p in reports.iterdir())


@pytest.mark.slow
def test_multirun_validates_every_point_before_running_any(tmp_path):
    proc = _kdflow("run", "-m", *SMOKE, f"output_dir={tmp_path}", "study.methods.kd.temperature=2,-1")
    assert proc.returncode == 2 and "study.methods.kd.temperature" in proc.stderr
    assert not (tmp_path / "jobs").exists()
