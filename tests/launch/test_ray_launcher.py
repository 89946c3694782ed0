"""launcher=ray on a real local Ray: whole studies, re-runs, failures that block, bad settings."""
from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest
import ray

from kdflow.launch.cli import main
from kdflow.launch.ray_config import parse_ray_settings
from kdflow.launch.ray_engine import run_ray
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One embedded 2-CPU Ray for the module; run_ray uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_study_trains_the_teacher_once_and_a_rerun_skips_everything(tmp_path, study, local_ray):
    graph = expand_study(study)
    settings = parse_ray_settings({"name": "ray"})
    first = run_ray(graph, str(tmp_path), QUIET, settings)
    assert first.ok and len(first.done) == 3 and not first.skipped, first.render()
    store = JobStore(tmp_path / "jobs")
    teacher = next(job.job_id for job in graph.jobs if job.stage == "teacher")
    assert store.state(teacher).attempts == 1 and all(store.is_done(j) for j in first.done)
    again = run_ray(graph, str(tmp_path), QUIET, settings)
    assert again.ok and sorted(again.skipped) == sorted(first.done) and not again.done
    assert store.state(teacher).attempts == 1
    assert ray.is_initialized()  # a Ray started by the caller is left running


def test_a_failing_teacher_blocks_exactly_its_dependents_and_is_retried(tmp_path, study, local_ray):
    study["teacher_recipe"]["lr"] = 1e10  # non-finite loss: JobFailed
    graph = expand_study(study)
    summary = run_ray(graph, str(tmp_path), QUIET, parse_ray_settings({"name": "ray", "retries": 1}))
    store = JobStore(tmp_path / "jobs")
    teacher = next(job.job_id for job in graph.jobs if job.stage == "teacher")
    assert list(summary.failed) == [teacher] and "JobFailed" in summary.failed[teacher]
    assert store.state(teacher).attempts == 2  # run once more (from its checkpoint) before giving up
    dependents = [job.job_id for job in graph.jobs if teacher in job.needs]
    assert sorted(summary.blocked) == sorted(dependents) and dependents
    for job_id in dependents:
        state = store.state(job_id)
        assert state.status == "blocked" and teacher in state.error and state.attempts == 0
    assert [store.spec(j).method for j in summary.done] == ["vanilla"]


def test_jobs_asking_for_more_cpus_than_the_cluster_has_are_refused(tmp_path, study, local_ray):
    settings = parse_ray_settings({"name": "ray", "stages": {"teacher": {"num_cpus": 3}}})
    with pytest.raises(ConfigError) as err:
        run_ray(expand_study(study), str(tmp_path), QUIET, settings)
    assert err.value.field == "launcher.stages.teacher.num_cpus" and "has 2 in all" in str(err.value)
    assert not any(JobStore(tmp_path / "jobs").is_done(p.name) for p in (tmp_path / "jobs").iterdir())


@pytest.mark.parametrize("override, field", [
    ("launcher.resources.num_cpus=0", "launcher.resources.num_cpus"),
    ("launcher.resources.num_gpus=-1", "launcher.resources.num_gpus"),
    ("+launcher.stages.student={num_cpus: 1}", "launcher.stages.student"),
    ("launcher.stages.teacher.num_cpus=-2", "launcher.stages.teacher.num_cpus"),
    ("launcher.retries=-1", "launcher.retries"),
    ("launcher.num_cpus=0", "launcher.num_cpus"),
    ("+launcher.workers=2", "launcher.workers"),
])
def test_bad_settings_exit_2_naming_the_field_before_ray_starts(tmp_path, capsys, override, field):
    code = main(["run", "study=smoke", "launcher=ray", override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`{field}`" in err and "No job was started" in err
    assert not (tmp_path / "jobs").exists()


def test_num_cpus_with_an_address_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_ray_settings({"name": "ray", "address": "auto", "num_cpus": 2})
    assert err.value.field == "launcher.num_cpus"


def test_kdflow_run_with_the_ray_launcher_end_to_end(tmp_path):
    args = [sys.executable, "-m", "kdflow.launch.cli", "run", "study=smoke", "launcher=ray",
            "launcher.num_cpus=2", "progress=false", f"output_dir={tmp_path}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 run, 0 skipped" in proc.stdout and "| KD |" in proc.stdout
    assert (tmp_path / "reports" / "smoke" / "report.md").stat().st_size > 0
