"""Packs on SLURM: each array task runs a pack of the distillation jobs of one teacher and batch
stream (``launcher.pack``), and every member ends exactly as the same job run alone.

On the real dev cluster: a pack's weights and metrics equal, bit for bit, the solo runs of its
jobs (in-process, at the task's torch thread count); a member poisoned through its config fails
alone, after its retries, while the others finish with their solo numbers; a pack stopped by
SIGUSR2 checkpoints every member at one step, is requeued as a whole and resumes together to
the solo results; ``kdflow status`` and ``kdflow cancel`` see each job under its task's id.
The first tests are the plan alone (no cluster).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from slurm_wait import wait_until
from test_launcher import dev_settings

from kdflow.launch.slurm import ACTIVE, JobView, Submission, cancel_study, reconcile, submit_study
from kdflow.launch.slurm_config import parse_slurm_settings
from kdflow.launch.slurm_plan import ArrayPlan, plan_arrays
from kdflow.launch.slurm_queue import SlurmQueue
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.pack import DEFAULT_PACK, pack_id
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph, expand_study

pytestmark = pytest.mark.slurm
CLUSTER = pytest.mark.usefixtures("slurm_cluster")

#: slurm_dev's cpus_per_task: the torch threads of every SLURM task, and so of the solo runs.
THREADS = 1
QUIET = RunOptions(progress=False)
#: Distillation methods that read the same teacher and batches: one pack.
METHODS = {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}, "msdcrd": {}}


def _graph(study: Dict[str, Any], methods: Dict[str, Any], seeds: Tuple[int, ...] = (0,),
           num_train: int = 128, epochs: int = 2) -> JobGraph:
    """The ``study`` fixture's study (resnet14 -> resnet8 on generated 16x16 images) with
    ``methods``, ``seeds``, ``num_train`` training images and students trained for ``epochs``."""
    study["methods"], study["seeds"] = copy.deepcopy(methods), list(seeds)
    study["datasets"]["synthetic"]["num_train"] = num_train
    study["student_recipe"].update(epochs=epochs, lr_milestones=[epochs - 1])
    return expand_study(study)


def _split(graph: JobGraph) -> Tuple[JobSpec, Dict[str, JobSpec]]:
    """The teacher job, and the distillation jobs by method."""
    teacher = next(job for job in graph.jobs if job.stage == "teacher")
    return teacher, {job.method: job for job in graph.jobs if job.stage != "teacher"}


def _run_on_slurm(graph: JobGraph, output: Path, timeout: float,
                  **settings: Any) -> Tuple[Submission, JobStore, Dict[str, JobView]]:
    """Submit ``graph`` with slurm_dev's settings updated by ``settings``; once no job of it is
    queued or running (``kdflow status``'s view), the submission, the store and that view."""
    submission = submit_study(graph, str(output), QUIET, dev_settings(**settings))
    store, queue = JobStore(output / "jobs"), SlurmQueue()

    def ended() -> Dict[str, JobView]:
        views = reconcile(graph, store, queue)
        return views if not any(view.status in ACTIVE for view in views.values()) else {}

    return submission, store, wait_until("every job to end", ended, timeout=timeout, interval=1)


def _solo(store: JobStore, teacher: JobSpec, jobs: List[JobSpec], root: Path) -> JobStore:
    """A store holding a copy of ``store``'s teacher job, where ``jobs`` ran alone, in this
    process, at the SLURM tasks' thread count."""
    solo = JobStore(root / "jobs")
    solo.add(teacher)
    shutil.copytree(store.job_dir(teacher.job_id), solo.job_dir(teacher.job_id), dirs_exist_ok=True)
    for job in jobs:
        run_job(copy.deepcopy(job), solo, RunOptions(progress=False, threads=THREADS))
    return solo


def _assert_as_alone(store: JobStore, solo: JobStore, job: JobSpec) -> None:
    """``job``'s weights (tensor by tensor), metrics and history equal its solo run's."""
    got, expected = store.result(job.job_id), solo.result(job.job_id)
    assert got["metrics"] == expected["metrics"], job.method
    assert got["history"] == expected["history"], job.method
    assert got["threads"] == expected["threads"] == THREADS
    a, b = torch.load(store.weights_path(job.job_id)), torch.load(solo.weights_path(job.job_id))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job.method


def _task_sizes(plan: List[ArrayPlan]) -> List[List[int]]:
    """Per array of ``plan``: the sizes of its tasks (packs), smallest first."""
    return [sorted(len(task) for task in array.tasks) for array in plan]


def test_each_array_task_runs_a_pack_of_one_teacher_and_batch_stream(study):
    graph = _graph(study, {"vanilla": {}, "kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}},
                   seeds=(0, 1))
    todo = {job.job_id for job in graph.jobs}
    settings = parse_slurm_settings({})
    plan = plan_arrays(graph, todo, {}, settings.stage_resources, settings.pack)
    # the teacher; the two student-alone jobs (no teacher: alone); per seed a pack of three
    assert [(a.stage, len(a.job_ids)) for a in plan] == [("teacher", 1), ("distill", 2),
                                                       ("distill", 6)]
    assert _task_sizes(plan) == [[1], [1, 1], [3, 3]]
    by_id = graph.by_id()
    for task in plan[2].tasks:
        assert len({(by_id[j].teacher_job, by_id[j].seed) for j in task}) == 1
    assert sorted(j for task in plan[2].tasks for j in task) == sorted(plan[2].job_ids)
    assert _task_sizes(plan_arrays(graph, todo, {}, settings.stage_resources, 2)) == \
        [[1], [1, 1], [1, 1, 2, 2]]
    # pack 1 is one job per task, as before packs
    assert _task_sizes(plan_arrays(graph, todo, {}, settings.stage_resources, 1)) == \
        [[1], [1, 1], [1] * 6]
    # a stage whose jobs run as two processes (torch.distributed) runs one job per task
    ddp = parse_slurm_settings({"pack": 4, "stages": {"distill": {"tasks_per_node": 2}}})
    assert _task_sizes(plan_arrays(graph, todo, {}, ddp.stage_resources, ddp.pack)) == \
        [[1], [1, 1], [1] * 6]


@pytest.mark.parametrize("value, fix", [
    (0, "set launcher.pack=1 to run every job alone"), (-2, "set launcher.pack=1"),
    (1.5, "set launcher.pack to a whole number"), (True, "set launcher.pack to a whole number"),
    ("four", "set launcher.pack to a whole number")])
def test_a_bad_pack_setting_names_launcher_pack_and_the_fix(value, fix):
    with pytest.raises(ConfigError) as err:
        parse_slurm_settings({"pack": value})
    assert err.value.field == "launcher.pack" and fix in err.value.fix, err.value
    assert parse_slurm_settings({"pack": None}).pack == DEFAULT_PACK
    assert parse_slurm_settings({"pack": 3}).pack == 3


@CLUSTER
def test_a_pack_on_slurm_equals_its_jobs_run_alone_bit_for_bit(study, tmp_path):
    graph = _graph(study, METHODS)
    teacher, students = _split(graph)
    submission, store, views = _run_on_slurm(graph, tmp_path / "slurm", timeout=240, pack=4)
    assert [(a.stage, a.jobs, a.tasks) for a in submission.arrays] == [("teacher", 1, 1),
                                                                       ("distill", 4, 1)]
    assert "4 distill jobs, after afterok:" in submission.render()
    assert submission.render().endswith(", packed into 1 task")
    assert {view.status for view in views.values()} == {"done"}, views
    task = {store.submissions(job.job_id)[-1] for job in students.values()}
    assert len(task) == 1 and {views[j.job_id].scheduler_id for j in students.values()} == task
    name = pack_id([job.job_id for job in students.values()])
    for job in students.values():
        state = store.state(job.job_id)
        assert (state.pack, state.attempts, state.scheduler_ids) == (name, 1, sorted(task)), state

    solo = _solo(store, teacher, list(students.values()), tmp_path / "solo")
    for job in students.values():
        _assert_as_alone(store, solo, job)


@CLUSTER
def test_a_poisoned_member_fails_alone_and_the_pack_finishes_as_alone(study, tmp_path):
    # float32 overflow: FitNet's hint loss is inf from step 0 on
    graph = _graph(study, {"kd": {}, "fitnet": {"hint_weight": 1.0e39}, "crd": {"num_negatives": 32}})
    teacher, students = _split(graph)
    _, store, views = _run_on_slurm(graph, tmp_path / "slurm", timeout=240, pack=3, retries=1)
    poisoned = students["fitnet"].job_id
    state = store.state(poisoned)
    assert views[poisoned].status == "failed" and state.status == "failed", state
    assert "non-finite loss" in state.error and "(after 2 attempts)" in state.error, state.error
    assert state.attempts == 2 and state.pack is None  # the retry ran it alone
    assert not store.weights_path(poisoned).exists() and store.result(poisoned) is None
    healthy = [students["kd"], students["crd"]]
    name = pack_id([job.job_id for job in students.values()])
    for job in healthy:
        assert views[job.job_id].status == "done"
        assert (store.state(job.job_id).pack, store.state(job.job_id).attempts) == (name, 1)

    solo = _solo(store, teacher, healthy, tmp_path / "solo")
    for job in healthy:
        _assert_as_alone(store, solo, job)


def _all_past_an_epoch(store: JobStore, jobs: List[JobSpec]) -> bool:
    """Whether every job of ``jobs`` runs and has finished its first epoch."""
    states = [store.state(job.job_id) for job in jobs]
    return all(s.status == "running" and s.epoch >= 1 for s in states)


@CLUSTER
def test_a_preempted_pack_checkpoints_together_and_resumes_to_the_solo_results(study,
                                                                                 tmp_path):
    # 24 steps per epoch, 4 epochs: about 4 s per epoch for the pack of three, and 12 s in which
    # to signal it once it has finished its first
    graph = _graph(study, {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}}, num_train=768,
                   epochs=4)
    teacher, students = _split(graph)
    jobs = list(students.values())
    output = tmp_path / "slurm"
    submit_study(graph, str(output), QUIET, dev_settings(pack=3))
    store = JobStore(output / "jobs")
    wait_until("the pack to finish an epoch", lambda: _all_past_an_epoch(store, jobs),
               timeout=240, interval=0.2)
    (task,) = {store.submissions(job.job_id)[-1] for job in jobs}
    # what SLURM sends before a time limit: the pack checkpoints, submitit requeues the task
    SlurmQueue().cancel([task], signal="USR2")
    wait_until("the requeued pack to finish", lambda: all(
        store.is_done(job.job_id) or store.state(job.job_id).status == "failed" for job in jobs),
        timeout=240, interval=1)

    states = [store.state(job.job_id) for job in jobs]
    assert all(s.status == "done" for s in states), states
    assert all(s.attempts == 2 and s.scheduler_ids == [task] for s in states), states
    assert all(store.submissions(job.job_id) == [task] for job in jobs)  # requeued, not resubmitted
    resumed = {s.resumed_step for s in states}
    assert len(resumed) == 1 and resumed.pop() > 0, states  # every member from one step
    assert {s.pack for s in states} == {pack_id([job.job_id for job in jobs])}

    solo = _solo(store, teacher, jobs, tmp_path / "solo")
    for job in jobs:
        _assert_as_alone(store, solo, job)


@CLUSTER
def test_status_and_cancel_see_the_jobs_of_a_pack_under_its_task(study, tmp_path):
    graph = _graph(study, METHODS, seeds=(0, 1))
    output = tmp_path / "slurm"
    held = dev_settings().resources
    settings = {"resources": {**held, "additional": {"hold": True}}}  # stays PENDING
    submission = submit_study(graph, str(output), QUIET, dev_settings(pack=4, **settings))
    assert [(a.jobs, a.tasks) for a in submission.arrays] == [(1, 1), (8, 2)]
    store = JobStore(output / "jobs")
    try:
        views = reconcile(graph, store, SlurmQueue())
        assert {view.status for view in views.values()} == {"queued"}, views
        tasks = {job.job_id: views[job.job_id].scheduler_id for job in graph.jobs}
        assert len(set(tasks.values())) == 3
        again = submit_study(graph, str(output), QUIET, dev_settings(pack=4, **settings))
        assert again.submitted == 0 and again.in_flight == len(graph.jobs)
    finally:
        cancelled = cancel_study(graph, store)
    assert cancelled == sorted(set(tasks.values()))
    assert not set(cancelled) & set(SlurmQueue().live())
    assert all(store.state(job.job_id).status == "cancelled" for job in graph.jobs)
