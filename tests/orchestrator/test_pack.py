"""Packs: jobs of one teacher and batch stream run in lockstep, each exactly as it runs alone."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from kdflow.methods.distillers.base import TeacherMemo
from kdflow.orchestrator.pack import form_packs, pack_id, pack_key, pack_savings, run_pack
from kdflow.orchestrator.runner import JobFailed, JobInterrupted, RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.training import JobTraining
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
#: KD, FitNet, CRD and two seed-paper methods that distil from the same plain teacher.
PACKED = {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}, "msdcrd": {}, "stablekd": {}}


def _graph(study: Dict[str, Any], methods: Dict[str, Any], **recipe: Any):
    study["methods"] = {"vanilla": {}, **methods}
    study["student_recipe"] = {**study["student_recipe"], **recipe}
    return expand_study(study)


def _teacher_and_students(graph):
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    return teacher, [j for j in graph.jobs if j.stage == "distill" and j.teacher_job]


def _stores(tmp_path: Path, teacher, solo_jobs) -> Tuple[JobStore, JobStore, Dict[str, Any]]:
    """Two job stores holding the same trained ``teacher`` job: ``alone``, where each of
    ``solo_jobs`` has been run alone (their results by id), and a fresh ``packed`` one."""
    alone, packed = JobStore(tmp_path / "alone"), JobStore(tmp_path / "packed")
    run_job(teacher, alone, QUIET)
    packed.add(teacher)
    shutil.copytree(alone.job_dir(teacher.job_id), packed.job_dir(teacher.job_id),
                    dirs_exist_ok=True)
    return alone, packed, {s.job_id: run_job(s, alone, QUIET) for s in solo_jobs}


@pytest.fixture
def memos(monkeypatch) -> List[TeacherMemo]:
    """Every TeacherMemo the test's packs create, in order."""
    made: List[TeacherMemo] = []
    init = TeacherMemo.__init__

    def recorded(self: TeacherMemo) -> None:
        init(self)
        made.append(self)

    monkeypatch.setattr(TeacherMemo, "__init__", recorded)
    return made


def _weights(store: JobStore, job_id: str) -> Dict[str, torch.Tensor]:
    return torch.load(store.weights_path(job_id))


def _same_numbers(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return a["metrics"] == b["metrics"] and a["history"] == b["history"]


def test_packs_group_jobs_of_one_teacher_seed_and_stream(study):
    study["seeds"] = [0, 1]
    graph = _graph(study, {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}, "spectral_reg": {}})
    jobs = [j for j in graph.jobs if j.stage != "teacher"]
    packs = form_packs(jobs, size=8)
    by_size = sorted(len(p) for p in packs)
    # per seed: kd, fitnet, crd share a teacher; vanilla and spectral_reg have none
    assert by_size == [1, 1, 1, 1, 3, 3]
    for pack in packs:
        assert len({pack_key(j) for j in pack}) == 1
        assert len({j.seed for j in pack}) == 1
    assert all(len(p) == 1 for p in form_packs(jobs, size=1))
    assert sorted(len(p) for p in form_packs(jobs, size=2)) == [1, 1, 1, 1, 1, 1, 2, 2]
    # two seeds' packs of 3 and one free worker more: the largest pack is split
    assert sorted(len(p) for p in form_packs([j for j in jobs if pack_key(j)], 8, slots=3)) == [1, 2, 3]
    assert pack_id([j.job_id for j in packs[0]]) == pack_id([j.job_id for j in reversed(packs[0])])


def test_jobs_with_another_batch_stream_do_not_share_a_pack(study):
    graph = _graph(study, {"kd": {}})
    teacher, (kd,) = _teacher_and_students(graph)
    other = _graph(study, {"kd": {}}, batch_size=16)
    _, (kd16,) = _teacher_and_students(other)
    assert pack_key(kd) != pack_key(kd16) and pack_key(teacher) is None
    with pytest.raises(ValueError, match="must share one teacher job"):
        run_pack([kd, kd16], JobStore("/nonexistent"), QUIET)


def test_savings_count_the_teacher_passes_a_pack_does_not_repeat(study):
    graph = _graph(study, {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}})
    jobs = [j for j in graph.jobs if j.stage != "teacher"]
    savings = pack_savings(jobs, 8)
    epochs = study["student_recipe"]["epochs"]
    assert (savings.packs, savings.packed, savings.jobs) == (1, 3, 4)
    assert (savings.passes_saved, savings.passes_alone) == (2 * epochs, 3 * epochs)
    assert "3 of 4 jobs run in 1 packs" in savings.render() and "(67%)" in savings.render()
    assert pack_savings(jobs, 1).passes_saved == 0


@pytest.mark.slow
def test_packed_jobs_equal_the_same_jobs_run_alone_bit_for_bit(study, tmp_path, memos):
    graph = _graph(study, PACKED, checkpoint_every_steps=3)
    teacher, students = _teacher_and_students(graph)
    assert len(students) == len(PACKED) and len({pack_key(s) for s in students}) == 1
    alone, packed, solo = _stores(tmp_path, teacher, students)

    torch.manual_seed(123)  # the pack must not depend on the process's RNG state
    ends = run_pack(students, packed, QUIET)
    for spec in students:
        result = ends[spec.job_id]
        assert isinstance(result, dict), f"{spec.method}: {result!r}"
        assert _same_numbers(result, solo[spec.job_id]), spec.method
        a, b = _weights(alone, spec.job_id), _weights(packed, spec.job_id)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), spec.method
        assert sorted(p.name for p in packed.checkpoint_dir(spec.job_id).iterdir()) == \
            sorted(p.name for p in alone.checkpoint_dir(spec.job_id).iterdir())
        state = packed.state(spec.job_id)
        assert (state.status, state.attempts) == ("done", 1)
        assert state.pack == pack_id([s.job_id for s in students])
    # one teacher forward per batch for the four feature readers, one for StableKD's blocks
    (memo,) = memos
    steps = len(solo[students[0].job_id]["history"]) * -(-study["datasets"]["synthetic"]["num_train"]
                                                          // study["student_recipe"]["batch_size"])
    assert memo.computed == 2 * steps and memo.reused == (len(students) - 2) * steps
    # finished members are not run again
    again = run_pack(students, packed, QUIET)
    assert all(again[s.job_id] == packed.result(s.job_id) for s in students)
    assert all(packed.state(s.job_id).attempts == 1 for s in students)


@pytest.mark.slow
def test_a_failing_member_fails_alone_and_the_others_finish_as_alone(study, tmp_path, monkeypatch):
    from kdflow.methods.distillers.fitnet import FitNet
    from kdflow.methods.distillers.msdcrd import MSDCRD

    graph = _graph(study, {"kd": {}, "fitnet": {}, "msdcrd": {}, "crd": {"num_negatives": 32}},
                   checkpoint_every_steps=3)
    teacher, students = _teacher_and_students(graph)
    healthy = [s for s in students if s.method in ("kd", "crd")]
    poisoned = next(s for s in students if s.method == "fitnet")
    broken = next(s for s in students if s.method == "msdcrd")
    alone, packed, solo = _stores(tmp_path, teacher, healthy)

    calls = {"fitnet": 0, "msdcrd": 0}
    fitnet_forward, msdcrd_forward = FitNet.forward, MSDCRD.forward

    def nan_from_step_4(self, x, y, index):
        calls["fitnet"] += 1
        logits, terms = fitnet_forward(self, x, y, index)
        if calls["fitnet"] > 4:
            terms = {**terms, "loss_hint": terms["loss_hint"] * float("nan")}
        return logits, terms

    def error_at_step_2(self, x, y, index):
        calls["msdcrd"] += 1
        if calls["msdcrd"] == 3:
            raise RuntimeError("the loss broke")
        return msdcrd_forward(self, x, y, index)

    monkeypatch.setattr(FitNet, "forward", nan_from_step_4)
    monkeypatch.setattr(MSDCRD, "forward", error_at_step_2)
    ends = run_pack(students, packed, QUIET)

    assert isinstance(ends[poisoned.job_id], JobFailed)
    state = packed.state(poisoned.job_id)
    assert state.status == "failed" and "non-finite loss at step 4 (epoch 1): loss_hint = nan" in state.error
    assert not packed.weights_path(poisoned.job_id).exists()
    kept = sorted(p.name for p in packed.checkpoint_dir(poisoned.job_id).glob("step-*"))
    assert kept == ["step-000000003.pt", "step-000000004.pt"]  # none after the poisoned step
    assert isinstance(ends[broken.job_id], RuntimeError)
    assert packed.state(broken.job_id).error == "RuntimeError: the loss broke"
    for spec in healthy:
        assert _same_numbers(ends[spec.job_id], solo[spec.job_id]), spec.method
        a, b = _weights(alone, spec.job_id), _weights(packed, spec.job_id)
        assert all(torch.equal(a[k], b[k]) for k in a), spec.method
        assert packed.state(spec.job_id).status == "done"


@pytest.mark.slow
def test_an_interrupted_pack_checkpoints_together_and_resumes_to_the_solo_result(
        study, tmp_path, monkeypatch):
    study["datasets"]["synthetic"].update(num_train=320)
    graph = _graph(study, {"kd": {}, "crd": {"num_negatives": 32}, "stablekd": {}},
                   checkpoint_every_steps=100)
    teacher, students = _teacher_and_students(graph)
    alone, packed, solo = _stores(tmp_path, teacher, students)

    real_step = JobTraining.step
    steps = itertools.count(1)

    def signalled_mid_batch_13(self, batch, received):
        out = real_step(self, batch, received)
        if next(steps) == 13 * len(students) - 1:  # the pack's 13th batch, one member to go
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(JobTraining, "step", signalled_mid_batch_13)
    ends = run_pack(students, packed, QUIET)
    monkeypatch.undo()
    assert all(isinstance(ends[s.job_id], JobInterrupted) for s in students)
    for spec in students:
        found = sorted(p.name for p in packed.checkpoint_dir(spec.job_id).glob("step-*"))
        assert found[-1] == "step-000000013.pt", (spec.method, found)  # the same step for all
        assert packed.state(spec.job_id).status == "interrupted"

    resumed = run_pack(students, packed, QUIET)
    for spec in students:
        assert packed.state(spec.job_id).resumed_step == 13
        assert _same_numbers(resumed[spec.job_id], solo[spec.job_id]), spec.method
        a, b = _weights(alone, spec.job_id), _weights(packed, spec.job_id)
        assert all(torch.equal(a[k], b[k]) for k in a), spec.method


@pytest.mark.slow
def test_members_resumed_at_different_steps_join_the_stream_where_they_stand(study, tmp_path):
    """A job interrupted alone (at step 7) and one never started share a pack: each ends as
    it would alone."""
    graph = _graph(study, {"kd": {}, "fitnet": {}}, checkpoint_every_steps=7)
    teacher, students = _teacher_and_students(graph)
    alone, packed, solo = _stores(tmp_path, teacher, students)
    ahead = students[0]
    packed.add(ahead)
    first_ckpt = alone.checkpoint_dir(ahead.job_id) / "step-000000007.pt"
    packed.checkpoint_dir(ahead.job_id).mkdir(parents=True, exist_ok=True)
    shutil.copy(first_ckpt, packed.checkpoint_dir(ahead.job_id) / first_ckpt.name)
    ends = run_pack(students, packed, QUIET)
    assert packed.state(ahead.job_id).resumed_step == 7
    for spec in students:
        assert _same_numbers(ends[spec.job_id], solo[spec.job_id]), spec.method


def test_activation_bytes_count_every_module_output_and_change_nothing():
    from torch import nn

    from kdflow.orchestrator.pack import activation_bytes

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    got = activation_bytes(model, (3, 8, 8), torch.device("cpu"))
    conv = 4 * 8 * 8 * 4  # float32 bytes of one image's map
    assert got == 3 * conv + conv + 10 * 4 + 10 * 4  # conv, bn, relu, flatten, linear, the whole
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_a_pack_larger_than_its_room_runs_in_waves_with_the_solo_results(study, tmp_path,
                                                                         monkeypatch, memos):
    """On a GPU a pack holds as many members as the free memory does (members_room); the rest
    run in a later wave. Here the room is set to 2 for a pack of 3."""
    import kdflow.orchestrator.pack as pack_module

    graph = _graph(study, {"kd": {}, "fitnet": {}, "crd": {"num_negatives": 32}})
    teacher, students = _teacher_and_students(graph)
    alone, packed, solo = _stores(tmp_path, teacher, students)
    monkeypatch.setattr(pack_module, "members_room", lambda first: 2)
    ends = run_pack(students, packed, QUIET)
    assert len(memos) == 2 and memos[0].reused > 0 and memos[1].reused == 0  # waves of 2 and 1
    for spec in students:
        assert _same_numbers(ends[spec.job_id], solo[spec.job_id]), spec.method
