"""Packs: distillation jobs that read the same batches from the same teacher, run together.

kdflow's training batches depend only on the dataset, its settings, the seed, the batch size
and the epoch and step (:mod:`orchestrator.data`), and a distillation job's teacher is frozen.
Jobs that agree on all of those and on their teacher job (:func:`pack_key`) therefore read the
same batches and run the same teacher forward on them. A pack runs such jobs in one process, in
lockstep: one batch load (moved to the device once) and one teacher forward per batch
(:class:`methods.distillers.base.TeacherMemo`), then each member's own forward, loss, backward
and optimizer step through the same :class:`orchestrator.training.JobTraining` a job run alone
uses.

Packing is how jobs are executed, not what they are: job ids, folders, checkpoints,
``result.json`` and MLflow runs are those of the same jobs run alone, and on the CPU a packed
job's weights and metrics are bit-identical to its solo run. Each member keeps its own torch
RNG state (swapped in around each of its calls), as a process running it alone would have.

- A member that is already done is not run; the others are.
- A member that fails (a non-finite loss, an error in its loss) is marked failed with its
  reason, before any checkpoint of poisoned weights, and the others go on.
- A preemption signal checkpoints every member at the same step; the pack resumes together.
  Members resumed at different positions (one ran alone before) join the pack's batch stream
  where they stand, so every member computes exactly what it would have alone.
- While a member runs, its state names its pack (``JobState.pack``), shown by ``kdflow status``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from kdflow.methods.config import parse_config
from kdflow.methods.errors import ConfigError
from kdflow.methods.distillers.base import TeacherMemo
from kdflow.orchestrator.data.loaders import Batch
from kdflow.orchestrator.distributed import ALONE
from kdflow.orchestrator.progress import job_bar
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.runner import (begin_job, end_job, preemption_flag, run_job,
                                        torch_threads)
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.training import JobTraining, RunOptions, interrupted

#: The pack size of a launcher that states none: at most this many jobs share one teacher.
DEFAULT_PACK = 8
#: The share of a GPU's free memory (when a pack starts) its members may take.
GPU_MEMORY_SHARE = 0.8
#: How a member's run ended: its ``result.json`` or the error that ended it.
Outcome = Union[Dict[str, Any], BaseException]


def parse_pack_size(value: Any, field: str = "launcher.pack") -> int:
    """A launcher's ``pack`` setting: how many jobs at most share one teacher forward (1:
    every job alone); null means :data:`DEFAULT_PACK`. ConfigError naming ``field`` else."""
    if value is None:
        return DEFAULT_PACK
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be a positive integer or null, got {value!r}",
                          fix=f"set {field}=1 to run every job alone, or {field}={DEFAULT_PACK} "
                              "to let up to that many jobs share a teacher forward")
    return value


def pack_key(spec: JobSpec) -> Optional[Tuple[Any, ...]]:
    """What jobs of one pack must share: the teacher job, the dataset and its settings (data
    fraction and augmentation included), the seed, and the recipe's batch size, epochs,
    device and memory layout. None for a job that runs alone (a teacher, a method without a
    teacher)."""
    if spec.stage == "teacher" or not spec.teacher_job:
        return None
    recipe = parse_config(Recipe, spec.recipe, f"{spec.job_id}.recipe")
    return (spec.teacher_job, spec.dataset, json.dumps(spec.dataset_cfg, sort_keys=True),
            spec.seed, recipe.batch_size, recipe.epochs, recipe.device,
            str(recipe.channels_last))


def form_packs(specs: Sequence[JobSpec], size: int, slots: int = 1) -> List[List[JobSpec]]:
    """``specs`` grouped into packs of at most ``size`` jobs with one :func:`pack_key` (jobs
    without a key alone), in the order the jobs come. While there are fewer packs than
    ``slots`` (processes free to run them), the largest pack is split in two, so packing never
    leaves a free worker idle."""
    filling: Dict[Any, List[JobSpec]] = {}  # by key: the pack that jobs of that key join
    packs: List[List[JobSpec]] = []
    for spec in specs:
        key = pack_key(spec) if size > 1 else None
        current = filling.get(key) if key is not None else None
        if current is None or len(current) >= size:
            current = []
            packs.append(current)
            if key is not None:
                filling[key] = current
        current.append(spec)
    while len(packs) < slots:
        largest = max(range(len(packs)), key=lambda i: len(packs[i]), default=None)
        if largest is None or len(packs[largest]) < 2:
            break
        whole = packs[largest]
        half = (len(whole) + 1) // 2
        packs[largest:largest + 1] = [whole[:half], whole[half:]]
    return packs


def pack_id(job_ids: Sequence[str]) -> str:
    """A short name for the pack of ``job_ids``: ``pack-`` and 8 hex digits of their hash."""
    return "pack-" + hashlib.sha256(",".join(sorted(job_ids)).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class PackSavings:
    """What packing a set of jobs saves: ``packs`` of more than one job hold ``packed`` of the
    ``jobs``; a job with a teacher runs one teacher forward over the training set per epoch
    (``passes_alone`` such passes in all when every job runs alone), and a pack of k runs one
    for all k, saving ``passes_saved``."""

    jobs: int
    packs: int
    packed: int
    passes_saved: int
    passes_alone: int

    def render(self) -> str:
        share = self.passes_saved / max(self.passes_alone, 1)
        return (f"packs: {self.packed} of {self.jobs} jobs run in {self.packs} packs sharing a "
                f"teacher forward; {self.passes_saved:,} of {self.passes_alone:,} teacher passes "
                f"over the training set saved ({share:.0%})")


def pack_savings(specs: Sequence[JobSpec], size: int) -> PackSavings:
    """:class:`PackSavings` of running ``specs`` in packs of at most ``size``."""
    packs = [p for p in form_packs(specs, size) if len(p) > 1]

    def passes(spec: JobSpec) -> int:
        return int(spec.recipe.get("epochs", 0))

    return PackSavings(jobs=len(specs), packs=len(packs), packed=sum(len(p) for p in packs),
                       passes_saved=sum(passes(p[0]) * (len(p) - 1) for p in packs),
                       passes_alone=sum(passes(s) for s in specs if pack_key(s) is not None))


@dataclass
class _Member:
    """One job of a running pack: its training and its own torch RNG state(s)."""

    training: JobTraining
    rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor] = None
    alive: bool = True

    @property
    def job_id(self) -> str:
        return self.training.job_id

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Within the block torch draws from this member's generator(s), as if alone."""
        device = self.training.device
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(device)


@dataclass
class _Pack:
    """The members of a running pack and how each one's run has ended so far."""

    store: JobStore
    members: List[_Member] = field(default_factory=list)
    ends: Dict[str, Outcome] = field(default_factory=dict)

    @property
    def live(self) -> List[_Member]:
        return [m for m in self.members if m.alive]

    def end(self, member: _Member, outcome: Outcome) -> None:
        """Record ``member``'s end (a result or an error) and drop it from the pack."""
        training = member.training
        training.close_bar()
        training.distiller.teacher_memo = None
        if isinstance(outcome, BaseException):
            end_job(training.spec, self.store, training.tracker, ALONE, error=outcome)
        else:
            end_job(training.spec, self.store, training.tracker, ALONE, result=outcome)
        member.alive = False
        self.ends[member.job_id] = outcome

    def each(self, members: Sequence[_Member], call: Callable[[JobTraining], Any]) -> None:
        """``call(member.training)`` for each live member of ``members``, under its own RNG;
        a member whose call raises ends failed with that error, the others go on."""
        for member in members:
            if not member.alive:
                continue
            try:
                with member.own_rng():
                    call(member.training)
            except Exception as err:
                self.end(member, err)


def run_pack(specs: Sequence[JobSpec], store: JobStore,
             options: RunOptions | None = None) -> Dict[str, Outcome]:
    """Run (or resume, or skip where finished) the jobs ``specs`` of one :func:`pack_key` as a
    pack; each job's outcome by job id: its ``result.json``, or the error that ended it
    (:class:`JobInterrupted` after a preemption signal, once every member's checkpoint is on
    disk). Each job's state, files and MLflow run are those of :func:`run_job`; one job is
    simply run alone. Every member's lock is held throughout (taken in job-id order)."""
    options = options or RunOptions()
    if len(specs) == 1:
        try:
            return {specs[0].job_id: run_job(specs[0], store, options)}
        except Exception as err:
            return {specs[0].job_id: err}
    if options.distributed is not None and options.distributed.world_size > 1:
        raise ValueError("a pack runs in one process: run a multi-process job alone (pack: 1)")
    keys = {pack_key(spec) for spec in specs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a pack's jobs must share one teacher job, dataset, seed and batch "
                         f"stream; got {len(keys)} different ones")
    name = pack_id([spec.job_id for spec in specs])
    ends: Dict[str, Outcome] = {}
    with torch_threads(options.threads), contextlib.ExitStack() as locks:
        for spec in sorted(specs, key=lambda s: s.job_id):
            locks.enter_context(store.lock(spec))
        with preemption_flag() as received:
            waiting = list(specs)
            while waiting and not received:  # a wave: the members the device's memory holds
                pack = _Pack(store)
                memo = TeacherMemo()
                waiting = _start_members(pack, waiting, options, name, memo)
                try:
                    _lockstep(pack, memo, received, options)
                except BaseException as err:
                    for member in pack.live:
                        pack.end(member, err)
                    raise
                ends.update(pack.ends)
            for spec in waiting:  # a signal before their wave began: nothing of theirs ran
                ends[spec.job_id] = interrupted(received, received, 0)
    return {spec.job_id: ends[spec.job_id] for spec in specs}


def _start_members(pack: _Pack, specs: Sequence[JobSpec], options: RunOptions, name: str,
                   memo: TeacherMemo) -> List[JobSpec]:
    """Begin each job (skip the done ones), build and restore its training; the first builds
    the data every member then shares. On a GPU, members start while the device's free memory
    holds one more (:func:`member_bytes`); the jobs left waiting are returned, for a later
    wave."""
    data = None
    room: Optional[int] = None
    for index, spec in enumerate(specs):
        if room is not None and len(pack.members) >= room:
            return list(specs[index:])
        try:
            done, tracker = begin_job(spec, pack.store, options, ALONE, pack=name)
        except Exception as err:
            pack.ends[spec.job_id] = err
            continue
        if done is not None:
            pack.ends[spec.job_id] = done
            continue
        try:
            training = JobTraining(spec, pack.store, options, tracker, ALONE, data=data, bar=False)
            training.restore()
        except Exception as err:
            end_job(spec, pack.store, tracker, ALONE, error=err)
            pack.ends[spec.job_id] = err
            continue
        data = training.data
        training.distiller.teacher_memo = memo
        cuda = training.device.type == "cuda"
        pack.members.append(_Member(training, torch.get_rng_state(),
                                    torch.cuda.get_rng_state(training.device) if cuda else None))
        if room is None:
            room = members_room(training)
    return []


def members_room(first: JobTraining) -> Optional[int]:
    """How many members a pack whose ``first`` member has just started may hold: on a GPU,
    that one and as many more as ``GPU_MEMORY_SHARE`` of the free memory holds
    (:func:`member_bytes`); on the CPU no limit (None)."""
    if first.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(first.device)
    return 1 + int(free * GPU_MEMORY_SHARE) // member_bytes(first)


def member_bytes(training: JobTraining) -> int:
    """An estimate, in bytes, of the device memory one more member of ``training``'s kind
    takes: its trainable weights three times (weights, gradients, SGD momentum), its own
    teacher copy, and twice the activations of its student over a batch (kept for backward,
    and their gradients), from the outputs of the student's modules for one image."""
    distiller = training.distiller
    learnable = sum(p.numel() * p.element_size() for p in distiller.learnable_parameters())
    teacher = 0 if distiller.teacher is None else sum(
        t.numel() * t.element_size()
        for t in [*distiller.teacher.parameters(), *distiller.teacher.buffers()])
    per_image = activation_bytes(distiller.student, training.data.info.input_shape,
                                 training.device)
    return 3 * learnable + teacher + 2 * per_image * training.recipe.batch_size


@torch.no_grad()
def activation_bytes(model: torch.nn.Module, input_shape: Tuple[int, int, int],
                     device: torch.device) -> int:
    """Bytes of the outputs of every module of ``model`` for one (C, H, W) image of zeros, in
    eval mode (no statistic changes, no random draw), the mode restored afterwards."""
    total = 0

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    was_training = model.training
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def _lockstep(pack: _Pack, memo: TeacherMemo, received: List[int], options: RunOptions) -> None:
    """Train the live members to their end, one batch at a time for all of them."""
    if not pack.members:
        return
    first = pack.members[0].training
    data, device, steps = first.data, first.device, first.steps_per_epoch
    total = first.recipe.epochs * steps
    done_steps = min(m.training.progress.global_step for m in pack.members)
    bar = (job_bar(f"pack of {len(pack.members)}: {first.spec.title}", total, done_steps,
                   options.progress_position) if options.progress else None)
    try:
        while True:
            going = [m for m in pack.live if not m.training.finished]
            if not going:
                break
            epoch = min(m.training.progress.epoch for m in going)
            cohort = [m for m in going if m.training.progress.epoch == epoch]
            pack.each(cohort, lambda t: t.begin_epoch())
            start = min((m.training.progress.step for m in cohort if m.alive), default=steps)
            for step, batch in enumerate(data.train.batches(epoch, start), start):
                here = [m for m in cohort if m.alive and m.training.progress.step == step]
                if not any(m.alive for m in cohort):
                    break
                if here:
                    batch = Batch(*(t.to(device, non_blocking=True) for t in batch))
                    memo.begin(batch.x)
                    pack.each(here, lambda t: t.step(batch, received))
                if received:
                    _interrupt(pack, received)
                    return
                if bar is not None:
                    bar.update(1)
            memo.begin(None)
            pack.each(cohort, lambda t: t.end_epoch())
        for member in pack.live:
            try:
                with member.own_rng():
                    result = member.training.finish()
            except Exception as err:
                pack.end(member, err)
            else:
                pack.end(member, result)
    finally:
        memo.begin(None)
        if bar is not None:
            bar.close()


def _interrupt(pack: _Pack, received: List[int]) -> None:
    """After a preemption signal: checkpoint every live member at the step it stands at (the
    same step for all that were in step), and end each interrupted."""
    for member in pack.live:
        try:
            with member.own_rng():
                member.training.checkpoint()
        except Exception as err:
            pack.end(member, err)
            continue
        pack.end(member, interrupted(received, received, member.training.progress.global_step))


def run_pack_in_store(output_dir: str, job_ids: Sequence[str],
                      options: RunOptions) -> Dict[str, Outcome]:
    """Worker entry point: :func:`run_pack` of the jobs ``job_ids`` of the store at
    ``output_dir``."""
    store = JobStore(Path(output_dir) / "jobs")
    return run_pack([store.spec(job_id) for job_id in job_ids], store, options)

