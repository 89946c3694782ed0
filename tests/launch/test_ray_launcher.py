"""launcher=ray on a real local Ray: whole studies, re-runs, failures that block, bad settings,
and packs whose jobs end exactly as they would alone."""
from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any, Dict, Iterator, List

import pytest
import ray
import torch

from kdflow.launch.cli import main
from kdflow.launch.ray_config import parse_ray_settings
from kdflow.launch.ray_engine import plan_packs, run_ray
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.pack import pack_id
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.spec import JobSpec
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
    ("launcher.pack=0", "launcher.pack"),
])
def test_bad_settings_exit_2_naming_the_field_before_ray_starts(tmp_path, capsys, override, field):
    code = main(["run", "study=smoke", "launcher=ray", override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`{field}`" in err and "No job was started" in err
    assert not (tmp_path / "jobs").exists()


def test_pack_is_a_setting_null_meaning_eight():
    assert parse_ray_settings({"name": "ray", "pack": None}).pack_size == 8
    assert parse_ray_settings({"name": "ray", "pack": 3}).pack_size == 3
    with pytest.raises(ConfigError) as err:
        parse_ray_settings({"name": "ray", "pack": 0})
    assert err.value.field == "launcher.pack" and "pack=1" in str(err.value)


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


#: Three distillation methods that read the same batches from the same teacher.
PACKED = {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}}


def _students(graph) -> List[JobSpec]:
    return [job for job in graph.jobs if job.stage == "distill"]


def _packs_of(plan: List[List[JobSpec]]) -> List[List[str]]:
    return [["teacher" if job.stage == "teacher" else f"{job.method} s{job.seed}" for job in pack]
            for pack in plan]


def test_ready_jobs_are_packed_and_split_to_fill_the_cluster(study):
    study["methods"] = {"vanilla": {}, **PACKED}
    jobs = expand_study(study).jobs
    cores = {"CPU": 2.0}

    def plan(**settings: Any) -> List[List[str]]:
        return _packs_of(plan_packs(jobs, parse_ray_settings({"name": "ray", **settings}), cores))

    # the teacher and vanilla need nothing; the three jobs that need the teacher fill both cores
    assert plan() == [["teacher"], ["vanilla s0"], ["kd s0", "fitnet s0"], ["crd s0"]]
    # a job holding both cores: one pack of all three, which shares the two threads
    assert plan(stages={"distill": {"num_cpus": 2}}) == [
        ["teacher"], ["vanilla s0"], ["kd s0", "fitnet s0", "crd s0"]]
    assert plan(pack=1) == [["teacher"], ["vanilla s0"], ["kd s0"], ["fitnet s0"], ["crd s0"]]
    study["seeds"] = [0, 1]
    jobs = expand_study(study).jobs
    assert plan(pack=3)[-2:] == [["kd s0", "fitnet s0", "crd s0"], ["kd s1", "fitnet s1", "crd s1"]]


def _run_packed(tmp_path, study: Dict[str, Any]):
    """``study`` (two seeds: a pack of three students per seed, one per core) run on Ray with
    ``pack: 3``; its graph, summary and store."""
    study["seeds"] = [0, 1]
    graph = expand_study(study)
    summary = run_ray(graph, str(tmp_path / "out"), QUIET,
                      parse_ray_settings({"name": "ray", "pack": 3}))
    return graph, summary, JobStore(tmp_path / "out" / "jobs")


def _packs_by_seed(students: List[JobSpec]) -> Dict[int, List[str]]:
    """The job ids of each seed's pack of three."""
    return {seed: [s.job_id for s in students if s.seed == seed] for seed in (0, 1)}


def _alone(ray_store: JobStore, tmp_path, graph, students: List[JobSpec]) -> JobStore:
    """``students`` run alone in this process (1 torch thread, as in their Ray task: one CPU
    each) into a store holding a copy of the teacher job's folder from ``ray_store``."""
    alone = JobStore(tmp_path / "alone")
    teacher = next(job for job in graph.jobs if job.stage == "teacher")
    alone.add(teacher)
    shutil.copytree(ray_store.job_dir(teacher.job_id), alone.job_dir(teacher.job_id),
                    dirs_exist_ok=True)
    for spec in students:
        run_job(spec, alone, RunOptions(progress=False, threads=1))
    return alone


def _assert_same_as_alone(packed: JobStore, alone: JobStore, spec: JobSpec) -> None:
    a, b = torch.load(alone.weights_path(spec.job_id)), torch.load(packed.weights_path(spec.job_id))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), spec.title
    ra, rb = alone.result(spec.job_id), packed.result(spec.job_id)
    assert (ra["metrics"], ra["history"]) == (rb["metrics"], rb["history"]), spec.title
    assert rb["threads"] == ra["threads"] == 1


def test_packs_run_as_one_task_each_and_every_job_ends_as_it_would_alone(
        tmp_path, study, local_ray):
    study["methods"] = dict(PACKED)
    graph, summary, packed = _run_packed(tmp_path, study)
    assert summary.ok and len(summary.done) == 7, summary.render()
    students = _students(graph)
    for pack in _packs_by_seed(students).values():
        assert len(pack) == 3 and {packed.state(j).pack for j in pack} == {pack_id(pack)}
    alone = _alone(packed, tmp_path, graph, students)
    for spec in students:
        assert packed.state(spec.job_id).attempts == 1
        _assert_same_as_alone(packed, alone, spec)


def test_a_failing_member_fails_alone_and_the_rest_of_its_pack_ends_as_alone(
        tmp_path, study, local_ray):
    study["methods"] = {**PACKED, "fitnet": {"hint_weight": 1.0e39}}  # inf in float32: step 0
    graph, summary, packed = _run_packed(tmp_path, study)
    students = _students(graph)
    packs = _packs_by_seed(students)
    poisoned = [s for s in students if s.method == "fitnet"]
    healthy = [s for s in students if s.method != "fitnet"]
    assert sorted(summary.failed) == sorted(s.job_id for s in poisoned), summary.render()
    assert not summary.blocked and len(summary.done) == 5
    for spec in poisoned:
        state = packed.state(spec.job_id)
        assert state.status == "failed" and "non-finite loss" in state.error
        assert (state.attempts, state.pack) == (2, None)  # retried once, alone: the rest was done
        assert not packed.weights_path(spec.job_id).exists()
    alone = _alone(packed, tmp_path, graph, healthy)
    for spec in healthy:
        state = packed.state(spec.job_id)
        assert (state.attempts, state.pack) == (1, pack_id(packs[spec.seed]))
        _assert_same_as_alone(packed, alone, spec)
