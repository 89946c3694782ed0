"""Pure logic of the slurm launcher: settings, array grouping and dependencies (no sbatch)."""
from __future__ import annotations

import copy

import pytest

from kdflow.launch.slurm_config import parse_slurm_settings
from kdflow.launch.slurm_plan import dependency_levels, plan_arrays
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.study import expand_study


def _graph(study, **changes):
    study = copy.deepcopy(study)
    study.update(changes)
    return expand_study(study)


def test_one_array_per_stage_and_dependency_on_the_teacher_array(study):
    graph = _graph(study, seeds=[0, 1, 2], methods={"vanilla": {}, "kd": {}, "fitnet": {}})
    todo = {job.job_id for job in graph.jobs}
    settings = parse_slurm_settings({"name": "slurm"})
    plan = plan_arrays(graph, todo, {}, settings.stage_resources)
    # the student-alone jobs need no teacher: they start at once, in an array of their own
    assert [(a.stage, len(a.job_ids), a.after_arrays) for a in plan] == [
        ("teacher", 1, []), ("distill", 3, []), ("distill", 6, [0])]
    teacher = plan[0].job_ids[0]
    assert all(job.teacher_job in (None, teacher) for job in graph.jobs if job.stage == "distill")


def test_per_stage_resources_split_arrays_and_are_merged_over_defaults(study):
    graph = _graph(study, methods={"kd": {}}, ablations={"kd": {"temperature": [2.0, 8.0]}})
    settings = parse_slurm_settings({
        "resources": {"partition": "gpu", "mem_gb": 16},
        "stages": {"ablation": {"mem_gb": 4, "time_min": 30}}})
    plan = plan_arrays(graph, {j.job_id for j in graph.jobs}, {}, settings.stage_resources)
    assert [a.stage for a in plan] == ["teacher", "distill", "ablation"]
    ablation = plan[2].resources
    assert (ablation.partition, ablation.mem_gb, ablation.time_min) == ("gpu", 4, 30)
    assert plan[1].resources.mem_gb == 16 and plan[2].after_arrays == [0]
    flags = ablation.sbatch_flags()
    assert "--partition=gpu" in flags and "--mem=4096MB" in flags and "--time=30" in flags


def test_done_and_in_flight_needs_are_not_resubmitted(study):
    graph = _graph(study, seeds=[0, 1])
    teacher = next(j.job_id for j in graph.jobs if j.stage == "teacher")
    students = {j.job_id for j in graph.jobs if j.stage != "teacher"}
    settings = parse_slurm_settings({})
    in_flight = plan_arrays(graph, students, {teacher: "41_0"}, settings.stage_resources)
    assert len(in_flight) == 1 and in_flight[0].after_ids == ["41_0"] and not in_flight[0].after_arrays
    done = plan_arrays(graph, students, {}, settings.stage_resources)
    assert not done[0].after_ids and not done[0].after_arrays


def test_chained_teachers_get_increasing_levels(study):
    # HSAKD's frozen-backbone teacher needs the plain teacher: two teacher levels, two arrays
    graph = _graph(study, methods={"hsakd": {"teacher_mode": "frozen"}})
    levels = dependency_levels(graph, {j.job_id for j in graph.jobs})
    by_id = graph.by_id()
    assert sorted(levels.values()) == [0, 1, 2]
    for job_id, level in levels.items():
        assert all(levels[n] < level for n in by_id[job_id].needs)
    plan = plan_arrays(graph, set(levels), {}, parse_slurm_settings({}).stage_resources)
    assert [a.stage for a in plan] == ["teacher", "teacher", "distill"]
    assert [a.after_arrays for a in plan] == [[], [0], [1]]


@pytest.mark.parametrize("settings, field", [
    ({"resources": {"mem_gb": 0}}, "launcher.resources.mem_gb"),
    ({"resources": {"gpu": 1}}, "launcher.resources.gpu"),
    ({"stages": {"student": {}}}, "launcher.stages.student"),
    ({"stages": {"teacher": {"time_min": -5}}}, "launcher.stages.teacher.time_min"),
    ({"resources": {"time_min": 1, "signal_delay_s": 90}}, "launcher.resources.signal_delay_s"),
    ({"retries": -1}, "launcher.retries"),
])
def test_bad_launcher_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError) as err:
        parse_slurm_settings(settings)
    assert err.value.field == field


def test_missing_slurm_commands_are_a_config_error(monkeypatch, tmp_path):
    from kdflow.launch.slurm_queue import require_slurm

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        require_slurm()
    assert err.value.field == "launcher" and "sbatch" in str(err.value) and "launcher=local" in str(err.value)


class RecordedQueue:
    """squeue/sacct answers fixed in advance (reconcile is pure logic over them)."""

    def __init__(self, live, ended):
        self._live, self._ended = live, ended
        self.asked = []

    def live(self):
        return dict(self._live)

    def accounting(self, ids):
        self.asked.append(sorted(ids))
        return {i: self._ended[i] for i in ids if i in self._ended}


def test_reconcile_joins_the_store_with_squeue_and_sacct(study, tmp_path):
    import torch

    from kdflow.launch.slurm import reconcile
    from kdflow.launch.slurm_queue import QueueEntry
    from kdflow.orchestrator.atomic import write_json
    from kdflow.orchestrator.checkpoint import write_sealed
    from kdflow.orchestrator.store import JobStore

    graph = _graph(study, seeds=[0, 1, 2], methods={"vanilla": {}, "kd": {}})
    store = JobStore(tmp_path)
    jobs = [job.job_id for job in graph.jobs]
    for i, job_id in enumerate(jobs):
        store.add(graph.by_id()[job_id])
        store.record_submission(job_id, f"7_{i}")
    done, queued, running, lost, stuck, failed, never = jobs
    done_job = graph.by_id()[done]
    write_sealed(store.weights_path(done), {"w": torch.zeros(2)})
    write_json(store.job_dir(done) / "result.json", {
        "job_id": done, "stage": done_job.stage, "method": done_job.method,
        "teacher": done_job.teacher, "student": done_job.model, "dataset": done_job.dataset,
        "seed": done_job.seed, "epochs": 1, "wall_time_s": 1.0, "metrics": {"top1": 1.0}})
    store.update_state(running, status="running", attempts=1)
    store.update_state(lost, status="running", attempts=1)
    store.update_state(failed, status="failed", error="JobFailed: non-finite train/loss")
    (store.job_dir(never) / "submissions.json").unlink()
    queue = RecordedQueue(
        live={"7_1": QueueEntry("7_1", "PENDING", "Dependency"),
              "7_2": QueueEntry("7_2", "RUNNING", "None"),
              "7_4": QueueEntry("7_4", "PENDING", "DependencyNeverSatisfied")},
        ended={"7_3": QueueEntry("7_3", "OUT_OF_MEMORY", "0:125")})
    views = reconcile(graph, store, queue)
    assert {job: (v.status, v.scheduler_id) for job, v in views.items()} == {
        done: ("done", "7_0"), queued: ("queued", "7_1"), running: ("running", "7_2"),
        lost: ("lost", "7_3"), stuck: ("stuck", "7_4"), failed: ("failed", "7_5"),
        never: ("pending", "")}
    assert queue.asked == [["7_3"]]  # sacct only for the jobs squeue no longer shows
    assert "OUT_OF_MEMORY" in views[lost].note and "resubmits" in views[lost].note
    assert views[queued].note == "Dependency" and "non-finite" in views[failed].note


def test_a_packed_array_asks_for_a_job_s_time_limit_per_job_in_its_largest_task(study):
    graph = _graph(study, seeds=[0, 1, 2], methods={"vanilla": {}, "kd": {}, "fitnet": {}})
    todo = {job.job_id for job in graph.jobs}
    settings = parse_slurm_settings({"resources": {"time_min": 30}})
    plan = plan_arrays(graph, todo, {}, settings.stage_resources, pack=settings.pack)
    by_stage = {(a.stage, len(a.job_ids)): a for a in plan}
    packed = by_stage[("distill", 6)]
    assert sorted(map(len, packed.tasks)) == [2, 2, 2] and packed.resources.time_min == 60
    assert by_stage[("distill", 3)].resources.time_min == 30  # the students alone: one job a task
    assert settings.stage_resources("distill").time_min == 30  # the settings are unchanged
