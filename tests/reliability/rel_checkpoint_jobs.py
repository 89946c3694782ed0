"""A small job on generated data, and where it checkpoints, for the checkpoint fault tests
(crash resume, damaged checkpoints, full disk)."""
from __future__ import annotations

from typing import Any, Dict, List

from kdflow.orchestrator.checkpoint import read_sealed
from kdflow.orchestrator.runner import RunOptions
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
BATCH = 32


def vanilla_job(study: Dict[str, Any], epochs: int, steps_per_epoch: int,
                checkpoint_every: int) -> JobSpec:
    """The one job of ``study`` (the ``study`` fixture) reduced to the student alone, trained
    for ``epochs`` epochs of ``steps_per_epoch`` batches of BATCH generated 16x16 images, with a
    checkpoint every ``checkpoint_every`` steps and at each epoch's end (under a second)."""
    study["methods"] = {"vanilla": {}}
    study["datasets"]["synthetic"].update(num_train=steps_per_epoch * BATCH)
    study["student_recipe"] = {**study["student_recipe"], "epochs": epochs, "batch_size": BATCH,
                               "lr_milestones": [max(epochs - 1, 1)],
                               "checkpoint_every_steps": checkpoint_every}
    (job,) = expand_study(study).jobs
    return job


def saved_steps(epochs: int, steps_per_epoch: int, checkpoint_every: int) -> List[int]:
    """The global steps such a job checkpoints at, in order (a step that is both a multiple of
    ``checkpoint_every`` and an epoch's end is listed twice: it is written twice)."""
    steps = []
    for epoch in range(epochs):
        first = epoch * steps_per_epoch + 1
        steps += [g for g in range(first, first + steps_per_epoch) if g % checkpoint_every == 0]
        steps.append((epoch + 1) * steps_per_epoch)
    return steps


def checkpoint_steps(store: JobStore, job: JobSpec) -> List[int]:
    """The steps of the checkpoint files of ``job`` on disk, oldest first; each must pass its
    checksum and the weights-only loader."""
    paths = sorted(store.checkpoint_dir(job.job_id).glob("step-*.pt"))
    for path in paths:
        read_sealed(path)
    return [int(path.stem.split("-")[1]) for path in paths]
