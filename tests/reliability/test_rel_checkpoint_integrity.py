"""Issue 9, items 1 and 8: checkpoints carry a checksum and are loaded weights-only.

A truncated, bit-flipped, emptied or malicious newest checkpoint is detected before anything
in it is unpickled, reported (a warning naming the file and why, and a note in the job's
state), set aside as ``*.rejected``, and the previous checkpoint is used: the job still ends
exactly as if nothing had happened. A pickle that would create a file when unpickled is
refused and the file is never created. Donor (``init_from``) checkpoints and teacher weights
are checked the same way, and every method's checkpoint loads under ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from rel_checkpoint_jobs import QUIET, vanilla_job

from kdflow.orchestrator.checkpoint import (REJECTED_SUFFIX, checkpoint_path, encode,
                                            init_checkpoint_path, latest_checkpoint_path,
                                            read_sealed)
from kdflow.orchestrator.runner import JobFailed, run_job
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.status import status_table
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph, expand_study

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 8, 5
LATEST, PREVIOUS = 16, 15  # the two checkpoints a finished job keeps (saves at 5, 8, 10, 15, 16)


class PlantsAFile:
    """Unpickling this runs ``touch marker``: a stand-in for code smuggled into a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


@dataclasses.dataclass
class Unfinished:
    """A job whose training ended but whose final files were removed: run again, it resumes
    from its newest checkpoint. ``expected``/``weights``: what its uninterrupted run produced."""

    store: JobStore
    job: JobSpec
    expected: Dict[str, Any]
    weights: Dict[str, torch.Tensor]

    def checkpoint(self, step: int) -> Path:
        return checkpoint_path(self.store.checkpoint_dir(self.job.job_id), step)

    def assert_ends_as_expected(self) -> None:
        result = run_job(self.job, self.store, QUIET)
        assert result["history"] == self.expected["history"]
        assert result["metrics"] == self.expected["metrics"]
        weights = read_sealed(self.store.weights_path(self.job.job_id))
        assert all(torch.equal(weights[k], self.weights[k]) for k in self.weights)


@pytest.fixture
def unfinished(study, tmp_path) -> Unfinished:
    job = vanilla_job(study, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    store = JobStore(tmp_path / "jobs")
    expected = run_job(job, store, QUIET)
    weights = read_sealed(store.weights_path(job.job_id))
    (store.job_dir(job.job_id) / "result.json").unlink()
    store.weights_path(job.job_id).unlink()
    return Unfinished(store, job, expected, weights)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    spot = random.Random(7).randrange(len(data) // 4, 3 * len(data) // 4)
    data[spot] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "truncated or not a kdflow checkpoint"),
    (_flip_a_bit, "checksum mismatch"),
    (_empty, "empty file"),
])
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(
        unfinished: Unfinished, damage: Callable[[Path], None], reason: str, caplog) -> None:
    latest = unfinished.checkpoint(LATEST)
    damage(latest)
    with caplog.at_level(logging.WARNING, logger="kdflow.orchestrator.checkpoint"):
        unfinished.assert_ends_as_expected()
    state = unfinished.store.state(unfinished.job.job_id)
    assert state.resumed_step == PREVIOUS and state.status == "done"
    (note,) = state.notes
    assert note.startswith(f"checkpoint {latest.name} rejected, resumed from "
                           f"{unfinished.checkpoint(PREVIOUS).name}: {reason}")
    assert any(str(latest) in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert latest.with_name(latest.name + REJECTED_SUFFIX).exists()  # set aside, never read again
    shown = status_table(JobGraph("unit", [unfinished.job]), unfinished.store)
    assert f"{unfinished.job.job_id} (survived): {note}" in shown  # kdflow status tells


def _sealed_pickle(marker: Path) -> bytes:
    """A checkpoint-shaped archive with a valid checksum whose pickle plants ``marker``."""
    return encode({"distiller": {}, "progress": PlantsAFile(marker)})


def _plain_pickle(marker: Path) -> bytes:
    return pickle.dumps({"progress": PlantsAFile(marker)})


@pytest.mark.parametrize("malicious, unpickle, reason", [
    (_sealed_pickle, lambda data: torch.load(io.BytesIO(data), weights_only=False),
     "unsafe: refused by torch.load(weights_only=True)"),
    (_plain_pickle, pickle.loads, "truncated or not a kdflow checkpoint"),
])
def test_a_malicious_pickle_in_place_of_the_latest_checkpoint_is_refused(
        unfinished: Unfinished, tmp_path, malicious, unpickle, reason) -> None:
    live = tmp_path / "planted-by-the-control"
    unpickle(malicious(live))
    assert live.exists(), "the payload does not work: the test would prove nothing"
    marker = tmp_path / "planted-by-the-checkpoint"
    latest = unfinished.checkpoint(LATEST)
    latest.write_bytes(malicious(marker))
    unfinished.assert_ends_as_expected()
    assert not marker.exists()
    state = unfinished.store.state(unfinished.job.job_id)
    assert state.resumed_step == PREVIOUS
    (note,) = state.notes
    assert f"checkpoint {latest.name} rejected" in note and reason in note


def test_with_every_checkpoint_damaged_the_job_starts_over_and_says_so(unfinished) -> None:
    for step in (LATEST, PREVIOUS):
        _flip_a_bit(unfinished.checkpoint(step))
    unfinished.assert_ends_as_expected()
    state = unfinished.store.state(unfinished.job.job_id)
    assert state.resumed_step is None
    assert [note.split(":")[0] for note in state.notes] == [
        f"checkpoint {unfinished.checkpoint(step).name} rejected, started from scratch"
        for step in (LATEST, PREVIOUS)]


def test_a_checkpoint_written_before_checksums_still_loads(unfinished, caplog) -> None:
    latest = unfinished.checkpoint(LATEST)
    torch.save(read_sealed(latest), latest)  # the format every checkpoint had before
    with caplog.at_level(logging.WARNING, logger="kdflow.orchestrator.checkpoint"):
        unfinished.assert_ends_as_expected()
    state = unfinished.store.state(unfinished.job.job_id)
    assert state.resumed_step == LATEST and state.notes == []
    assert any("has no checksum" in r.getMessage() for r in caplog.records)


def test_sealed_files_stay_plain_torch_archives(unfinished) -> None:
    latest = unfinished.checkpoint(LATEST)
    assert torch.load(latest, weights_only=True).keys() == read_sealed(latest).keys()


def test_a_damaged_donor_copy_falls_back_to_the_donors_own_checkpoint(unfinished) -> None:
    unfinished.assert_ends_as_expected()
    donor = unfinished.job
    job = dataclasses.replace(donor, recipe={**donor.recipe, "epochs": EPOCHS + 1},
                              init_from=f"{donor.job_id}@{LATEST}")
    store = unfinished.store
    kept = init_checkpoint_path(store.checkpoint_dir(job.job_id), LATEST)
    kept.parent.mkdir(parents=True)
    shutil.copyfile(unfinished.checkpoint(LATEST), kept)
    _flip_a_bit(kept)
    assert len(run_job(job, store, QUIET)["history"]) == EPOCHS + 1
    state = store.state(job.job_id)
    assert state.resumed_step == LATEST
    (note,) = state.notes
    assert note.startswith(f"donor checkpoint {kept} rejected, used "
                           f"{unfinished.checkpoint(LATEST)}: checksum mismatch")

    both = dataclasses.replace(job, init_from=f"{donor.job_id}@{PREVIOUS}")
    _flip_a_bit(unfinished.checkpoint(PREVIOUS))
    with pytest.raises(JobFailed, match=f"at step {PREVIOUS}, but checkpoint .* checksum mismatch"):
        run_job(both, store, QUIET)
    assert store.state(both.job_id).status == "failed"


def test_damaged_teacher_weights_fail_the_student_clearly(study, tmp_path) -> None:
    study["methods"] = {"kd": {}}
    graph = expand_study(study)
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    student = next(j for j in graph.jobs if j.stage == "distill")
    store = JobStore(tmp_path)
    run_job(teacher, store, QUIET)
    _flip_a_bit(store.weights_path(teacher.job_id))
    with pytest.raises(JobFailed, match=f"weights of teacher job {teacher.job_id} cannot be used"):
        run_job(student, store, QUIET)
    error = store.state(student.job_id).error
    assert "checksum mismatch" in error and "result.json to train that job again" in error


SEG_RECIPE = {"epochs": 1, "batch_size": 16, "lr": 0.05, "lr_schedule": "poly",
              "lr_milestones": [], "device": "cpu"}


def _every_method_study(study: Dict[str, Any]) -> Dict[str, Any]:
    """``study`` with every classification method, one epoch of two steps per job."""
    study["methods"] = {name: {} for name in (
        "vanilla", "kd", "fitnet", "msdcrd", "hsakd", "inverted_projection", "spectral_reg",
        "stablekd")}
    study["methods"]["crd"] = {"num_negatives": 16}
    study["datasets"]["synthetic"].update(num_train=64, num_val=32)
    for recipe in ("teacher_recipe", "student_recipe"):
        study[recipe] = {**study[recipe], "epochs": 1, "lr_milestones": [1]}
    return study


def _segmentation_study() -> Dict[str, Any]:
    return {"name": "seg", "seeds": [0],
            "datasets": {"synthetic_seg": {"num_train": 32, "num_val": 16, "image_size": 32}},
            "pairs": [{"teacher": "deeplabv3_resnet8", "student": "fcn_resnet8"}],
            "methods": {"vanilla": {}, "seg_kd": {}, "lad": {}},
            "teacher_recipe": dict(SEG_RECIPE), "student_recipe": dict(SEG_RECIPE)}


@pytest.mark.slow
def test_every_methods_checkpoint_loads_weights_only_and_resumes(study, tmp_path) -> None:
    """Everything a checkpoint holds (weights, buffers such as CRD's memory bank and StableKD's
    phase, SGD state, step and poly schedules, RNG state, progress) passes the weights-only
    loader: each job, its result removed, resumes from its last checkpoint to the same result."""
    store = JobStore(tmp_path)
    jobs = [*expand_study(_every_method_study(study)).jobs,
            *expand_study(_segmentation_study()).jobs]
    assert {job.method for job in jobs} >= {"crd", "stablekd", "hsakd_teacher", "lad", "seg_kd"}
    for job in jobs:
        first = run_job(job, store, QUIET)
        latest = latest_checkpoint_path(store.checkpoint_dir(job.job_id))
        assert read_sealed(latest).keys() == {"distiller", "optimizer", "schedule", "rng",
                                              "progress"}
        (store.job_dir(job.job_id) / "result.json").unlink()
        again = run_job(job, store, QUIET)
        assert store.state(job.job_id).resumed_step == int(latest.stem.split("-")[1])
        assert again["history"] == first["history"], job.title
