"""A job's training as an object with small steps, driven alike by a job run alone
(:func:`train_alone`, through :func:`orchestrator.runner.run_job`) and by a pack of jobs that
share one data pass and one teacher forward (:mod:`orchestrator.pack`).

A job resumes from its newest checkpoint and, on CPU, ends with exactly the weights and
metrics of a run that was never interrupted, at the same torch thread count. No job ends
``done`` with non-finite weights or metrics: before every checkpoint and before the final
weights are written, every parameter and buffer is checked (:mod:`orchestrator.loss_guard`,
one device reduction and one read), so a step that poisons the weights fails the job and the
checkpoints from before it stay usable.

Over several ranks (:class:`orchestrator.distributed.Ranks`) each rank trains on its
contiguous slice of every global batch, the gradients are averaged over the ranks, and rank 0
alone writes the job's files and talks to MLflow.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, Distiller
from kdflow.methods.tasks import SEGMENTATION
from kdflow.orchestrator.atomic import remove_partial_writes, write_json
from kdflow.orchestrator.checkpoint import (CheckpointRejected, checkpoint_path,
                                            init_checkpoint_path, load_latest_checkpoint,
                                            read_sealed, save_checkpoint, write_sealed)
from kdflow.orchestrator.data import Data, build_data, validate_dataset
from kdflow.orchestrator.data.loaders import Batch
from kdflow.orchestrator.distributed import ALONE, DistEnv, Ranks
from kdflow.orchestrator.evaluation import (VAL_SAMPLES, calibrate_batchnorm, evaluate,
                                            save_val_samples)
from kdflow.orchestrator.fast_path import (FastPath, build_optimizer, resolve_fast_path,
                                           step_forward)
from kdflow.orchestrator.loss_guard import TOTAL, LossGuard, nonfinite_tensors, weights_fault
from kdflow.orchestrator.metrics import primary_metric
from kdflow.orchestrator.progress import job_bar
from kdflow.orchestrator.provenance import job_provenance, provenance_tags, weights_fingerprint
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.tracking import JobTracker

#: In a multi-process run, the ranks compare the signals they received every this many steps
#: (and before each checkpoint): reading them back is the one host synchronisation of a step.
SIGNAL_CHECK_EVERY = 8


class JobInterrupted(Exception):
    """Raised after a preemption signal once the job's checkpoint is safely on disk.

    signum: the signal that stopped the run: this process's own or, in a multi-process run
            where another rank alone was signalled, the lowest-numbered one the ranks received.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> Tuple[Any, ...]:  # picklable, e.g. out of a worker process
        return type(self), (str(self), self.signum)


class JobFailed(Exception):
    """A job that cannot finish (a teacher without weights, a non-finite loss...)."""


@dataclass
class RunOptions:
    """Runtime-only settings of a job run (not part of the job id).

    distributed: this process's place in a multi-process run of the job (every rank calls
                 :func:`run_job` with its own); None, or a world of one, runs it here alone.
    on_epoch:    called on rank 0 after each epoch with the epoch's 0-based index and its
                 metrics (``val/top1`` or ``val/miou`` in percent, ``train/loss``...), once they are logged
                 and checkpointed (a hyperparameter search reports them from here).
    threads:     torch intra-op threads of the run, set for its duration (None: the process's
                 current count). Launchers state it (local: cores // workers; SLURM: the task's
                 CPUs; Ray: the job's ``num_cpus``) so that a job resumed elsewhere on the same
                 machine computes exactly what it would have.
    progress:    draw a tqdm bar over the job's steps; launchers turn it on only on a
                 terminal (:func:`kdflow.orchestrator.progress.progress_style`).
    progress_position: the bar's row, counted from the top of the bars (0: the first).
    """

    tracking_uri: Optional[str] = None
    experiment: str = "kdflow"
    progress: bool = True
    progress_position: int = 0
    distributed: Optional[DistEnv] = None
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None
    threads: Optional[int] = None



@dataclass
class _Progress:
    """Where a run stands: the next step to run and what has been accumulated so far."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0



def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)




def _teacher_classes(spec: JobSpec, store: JobStore, data: Data) -> int:
    """The class count of the teacher job's dataset: the student's, unless the teacher was
    trained on another dataset (cross-task distillation)."""
    teacher = store.spec(spec.teacher_job)
    if (teacher.dataset, teacher.dataset_cfg) == (spec.dataset, spec.dataset_cfg):
        return data.info.num_classes
    cfg = validate_dataset(teacher.dataset, teacher.dataset_cfg, f"{teacher.job_id}.dataset_cfg",
                           require_data=False)
    return cfg.class_count()


def _build_distiller(spec: JobSpec, store: JobStore, data: Data, device: torch.device) -> Distiller:
    cls = DISTILLERS.get(spec.method)
    cfg = parse_config(cls.Config, spec.method_cfg, f"{spec.job_id}.method_cfg")
    student = cls.build_student(cfg, spec.model, data.info.num_classes)
    teacher = None
    if spec.teacher_job:
        weights = store.weights_path(spec.teacher_job)
        if not weights.exists():
            raise JobFailed(f"teacher job {spec.teacher_job} has no weights at {weights}")
        teacher = cls.build_teacher(cfg, spec.teacher, _teacher_classes(spec, store, data))
        try:
            teacher.load_state_dict(read_sealed(weights))
        except CheckpointRejected as err:
            raise JobFailed(f"the weights of teacher job {spec.teacher_job} cannot be used: "
                            f"{err}; delete {store.job_dir(spec.teacher_job) / 'result.json'} "
                            f"to train that job again") from err
    return cls(student, teacher, cfg, data.info).to(device)


def load_donor_checkpoint(spec: JobSpec, store: JobStore) -> Dict[str, Any]:
    """The checkpoint ``spec.init_from`` names: the copy kept in the job's own ``init`` folder
    (a search puts it there) or else the donor job's own, whichever exists and is intact
    (:func:`orchestrator.checkpoint.read_sealed`); JobFailed if neither is."""
    donor, step = spec.donor
    rejected: List[CheckpointRejected] = []
    for path in (init_checkpoint_path(store.checkpoint_dir(spec.job_id), step),
                 checkpoint_path(store.checkpoint_dir(donor), step)):
        if not path.exists():
            continue
        try:
            state = read_sealed(path)
        except CheckpointRejected as err:
            rejected.append(err)
            continue
        store.add_notes(spec.job_id, *(f"donor checkpoint {bad.path} rejected, used {path}: "
                                       f"{bad.reason}" for bad in rejected))
        return state
    problem = "; ".join(map(str, rejected)) or (f"no checkpoint of that job at that step exists "
                                                f"(in {store.checkpoint_dir(donor)})")
    raise JobFailed(f"job {spec.job_id} starts from job {donor} at step {step}, but {problem}")


def _resume_state(spec: JobSpec, store: JobStore) -> Optional[Dict[str, Any]]:
    """Rank 0, under the job's lock: the contents of the job's newest usable checkpoint (None:
    there is none), once the temporary files of writes killed mid-way are deleted. Checkpoints
    that could not be used are added to the job's ``notes`` (and were logged)."""
    job_dir, ckpt_dir = store.job_dir(spec.job_id), store.checkpoint_dir(spec.job_id)
    remove_partial_writes(ckpt_dir)
    for name in (store.weights_path(spec.job_id).name, "result.json", VAL_SAMPLES):
        remove_partial_writes(job_dir, name)
    found = load_latest_checkpoint(ckpt_dir)
    start = f"resumed from {found.path.name}" if found.path else "started from scratch"
    store.add_notes(spec.job_id, *(f"checkpoint {bad.path.name} rejected, {start}: {bad.reason}"
                                   for bad in found.rejected))
    return found.state


def _restart_schedule(optimizer: torch.optim.Optimizer,
                      schedule: torch.optim.lr_scheduler.MultiStepLR, recipe: Recipe,
                      epoch: int) -> None:
    """Put ``schedule`` (built from this job's recipe) and the learning rate of ``optimizer``
    (loaded from a donor) where this job's own schedule stands at the start of ``epoch``."""
    decay = recipe.lr_decay ** bisect.bisect_right(sorted(recipe.lr_milestones), epoch)
    for group, base_lr in zip(optimizer.param_groups, schedule.base_lrs):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * decay
    schedule.last_epoch = epoch
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def _schedule(optimizer: torch.optim.Optimizer, recipe: Recipe,
              steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's learning-rate schedule: stepped per epoch (``step``) or per optimizer step
    (``poly``: factor ``(1 - i / n) ** lr_power`` after step i of the job's n)."""
    if recipe.lr_schedule == "poly":
        total = max(1, recipe.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: max(0.0, 1 - i / total) ** recipe.lr_power)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, recipe.lr_milestones,
                                                gamma=recipe.lr_decay)


def _trainable_state(distiller: Distiller) -> Dict[str, torch.Tensor]:
    """The distiller's state without the (frozen, reloadable) teacher."""
    return {k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}


def _trained_modules(distiller: Distiller) -> List[nn.Module]:
    """The distiller's modules outside the (frozen) teacher."""
    frozen = set(distiller.teacher.modules()) if distiller.teacher is not None else set()
    return [m for m in distiller.modules() if m not in frozen]


class TrainStep:
    """The training step itself, as every job and ``bench/step.py`` run it: the forward
    (:func:`orchestrator.fast_path.step_forward`), zero_grad, backward, the gradients averaged
    over ``ranks``, the loss record (:class:`orchestrator.loss_guard.LossGuard`) and the
    optimizer step. ``optimizer`` is built from the recipe over the distiller's learnable
    parameters; ``guard`` watches the losses from global step ``next_step``."""

    def __init__(self, distiller: Distiller, recipe: Recipe, fast: FastPath,
                 device: torch.device, ranks: Ranks = ALONE) -> None:
        self.distiller, self.recipe, self.ranks = distiller, recipe, ranks
        self.optimizer = build_optimizer(distiller.learnable_parameters(), recipe, fast)
        self.forward = step_forward(distiller, device, fast)
        self.device = device
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.guard = LossGuard(0, device)

    def watch_from(self, next_step: int) -> None:
        """Start a new loss record at global step ``next_step`` (after a restore)."""
        self.guard = LossGuard(next_step, self.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, global_size: int,
                 received: List[int], read_signals: bool) -> Tuple[Dict[str, torch.Tensor], List[int]]:
        """One step on this rank's slice ``x`` (B, C, H, W), ``y``, ``index`` (B,) of a global
        batch of ``global_size`` samples. Returns the loss terms and their sum (``loss``), each
        summed over the global batch's samples (device scalars), and the preemption signals
        the ranks received (read when ``read_signals``; alone: ``received``)."""
        _, loss, terms = self.forward(x, y, index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rows = y.shape[0]  # samples: a segmentation batch's losses are per-pixel means
        sums, signals = self.ranks.reduce_step(
            self.params, {name: value.detach().float() * rows
                          for name, value in {TOTAL: loss, **terms}.items()},
            share=rows / global_size, received=received, read_signals=read_signals)
        self.guard.observe(sums)  # summed over the ranks: every rank sees the same record
        self.optimizer.step()
        return sums, signals


class JobTraining:
    """One job's training as small steps that a solo run (:func:`train_alone`) and a pack
    (:mod:`orchestrator.pack`) drive alike: :meth:`restore`, then per epoch
    :meth:`begin_epoch`, :meth:`step` on each batch and :meth:`end_epoch`, and :meth:`finish`.

    Construction seeds torch with the job's seed and builds the data (unless ``data`` is given:
    a pack shares one), the distiller, its optimizer and schedule, exactly as a job run alone
    does, so the same steps give the same numbers. Rank 0 alone writes the job's files.
    """

    def __init__(self, spec: JobSpec, store: JobStore, options: RunOptions,
                 tracker: Optional[JobTracker], ranks: Ranks = ALONE,
                 data: Optional[Data] = None, bar: bool = True) -> None:
        self.started = time.time()
        self.spec, self.store, self.options, self.tracker, self.ranks = (
            spec, store, options, tracker, ranks)
        self.recipe = recipe = parse_config(Recipe, spec.recipe, f"{spec.job_id}.recipe")
        self.device = device = ranks.device(select_device(recipe.device))
        self.fast = fast = resolve_fast_path(recipe, device)
        torch.manual_seed(spec.seed)
        self.data = data or build_data(spec.dataset, spec.dataset_cfg,
                                       f"{spec.job_id}.dataset_cfg", recipe.batch_size,
                                       spec.seed, device, fast.channels_last)
        ranks.check_batches(self.data.info.num_samples, recipe.batch_size)
        teacher_weights = (weights_fingerprint(store.weights_path(spec.teacher_job))
                           if spec.teacher_job else None)
        self.distiller = distiller = _build_distiller(spec, store, self.data, device)
        self.provenance = job_provenance(spec, device, teacher_weights) if ranks.is_main else {}
        if fast.channels_last:
            distiller.to(memory_format=torch.channels_last)
        self.train_step = TrainStep(distiller, recipe, fast, device, ranks)
        self.optimizer = self.train_step.optimizer
        if tracker:
            tracker.set_tags({"kdflow.device": device.type,
                              **{f"kdflow.fast_path.{k}": v for k, v in fast.record().items()},
                              **provenance_tags(self.provenance)})
        self.steps_per_epoch = self.data.train.steps_per_epoch
        self.schedule = _schedule(self.optimizer, recipe, self.steps_per_epoch)
        self.progress = _Progress()
        self.primary = primary_metric(self.data.info.task)
        self.saved_step: Optional[int] = None
        self.bar: Any = None
        self.want_bar = bar

    @property
    def guard(self) -> LossGuard:
        return self.train_step.guard

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def finished(self) -> bool:
        """True once every epoch of the recipe has run."""
        return self.progress.epoch >= self.recipe.epochs

    @property
    def position(self) -> Tuple[int, int]:
        """(epoch, step): the next batch this job trains on."""
        return self.progress.epoch, self.progress.step

    def restore(self) -> None:
        """Continue from the job's newest usable checkpoint or, for a job started from another
        job's checkpoint (``spec.init_from``), from that one; else from the start."""
        spec, store, ranks = self.spec, self.store, self.ranks
        checkpoint = ranks.from_main(_resume_state(spec, store) if ranks.is_main else None)
        donated = checkpoint is None and spec.donor is not None
        if donated:
            checkpoint = ranks.from_main(load_donor_checkpoint(spec, store) if ranks.is_main else None)
        if checkpoint is not None:
            self.distiller.load_state_dict(checkpoint["distiller"], strict=False)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if donated:
                _restart_schedule(self.optimizer, self.schedule, self.recipe,
                                  checkpoint["progress"]["epoch"])
            else:
                self.schedule.load_state_dict(checkpoint["schedule"])
            torch.set_rng_state(checkpoint["rng"])
            saved = checkpoint["progress"]
            self.progress = _Progress(**{**saved, "sums": {k: v.to(self.device)
                                                           for k, v in saved["sums"].items()}})
        if ranks.is_main:
            store.update_state(spec.job_id, resumed_step=self.progress.global_step if checkpoint else None)
        ranks.share_state(_trainable_state(self.distiller).values())
        self.train_step.watch_from(self.progress.global_step)
        if self.want_bar and self.options.progress and ranks.is_main:
            self.bar = job_bar(spec.title, self.recipe.epochs * self.steps_per_epoch,
                               self.progress.epoch * self.steps_per_epoch + self.progress.step,
                               self.options.progress_position)

    def begin_epoch(self) -> None:
        """Before the batches of the current epoch (also on resume mid-epoch)."""
        self.distiller.start_epoch(self.progress.epoch, self.recipe.epochs)
        self.distiller.train()

    def step(self, batch: Batch, received: List[int]) -> List[int]:
        """Train on ``batch`` (the batch at :attr:`position`; its tensors may already be on the
        device, as a pack moves them once): forward (the teacher's output may come from the
        pack's shared forward, :class:`methods.distillers.base.TeacherMemo`), backward, the
        gradients averaged over the ranks, the optimizer step; checkpoint when one is due.

        ``received``: the preemption signals this process got. Returns the signals the ranks
        received (read every ``SIGNAL_CHECK_EVERY`` steps and before checkpoints): the caller
        then checkpoints (:meth:`checkpoint`) and stops. JobFailed on a non-finite loss.
        """
        progress, recipe, device = self.progress, self.recipe, self.device
        x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
        global_size = min(recipe.batch_size,
                          self.data.info.num_samples - progress.step * recipe.batch_size)
        after = progress.global_step + 1
        checkpoint_due = after % recipe.checkpoint_every_steps == 0
        sums, signals = self.train_step(
            x, y, batch.index.to(device, non_blocking=True), global_size, received,
            read_signals=checkpoint_due or after % SIGNAL_CHECK_EVERY == 0)
        if recipe.lr_schedule == "poly":
            self.schedule.step()
        for name, value in sums.items():
            progress.sums[name] = progress.sums.get(name, 0) + value
        progress.seen += global_size
        progress.step += 1
        progress.global_step += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.guard.eager:
            _require_finite_loss(self.guard, progress.epoch)
        if checkpoint_due:
            self.checkpoint()
        return signals

    def checkpoint(self) -> None:
        """Every rank: check the loss record and the weights, then rank 0 writes the checkpoint
        of the current step (once per step). JobFailed instead when either is not finite, so
        no checkpoint holds poisoned weights."""
        progress = self.progress
        if self.saved_step == progress.global_step:
            return
        _require_finite_loss(self.guard, progress.epoch)
        _require_finite_weights(_trainable_state(self.distiller), self.ranks,
                                _after(progress.global_step, progress.epoch))
        if self.ranks.is_main:
            self._save()

    def _save(self) -> None:
        """Rank 0: write the checkpoint of the current step (its state, optimizer, schedule,
        RNG and accumulated progress)."""
        progress = self.progress
        save_checkpoint(self.store.checkpoint_dir(self.job_id), progress.global_step, {
            "distiller": _trainable_state(self.distiller),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "rng": torch.get_rng_state(),
            "progress": {"epoch": progress.epoch, "step": progress.step,
                         "global_step": progress.global_step, "history": progress.history,
                         "sums": {k: v.cpu() for k, v in progress.sums.items()},
                         "seen": progress.seen},
        })
        self.saved_step = progress.global_step

    def end_epoch(self) -> Dict[str, float]:
        """After the epoch's last batch: evaluate, log, step the schedule, checkpoint.

        Returns the epoch's metrics (``train/<term>`` per-sample means, ``val/<metric>`` in
        percent, ``lr``). The loss sums are already summed over the ranks; the ranks'
        BatchNorm statistics are averaged first, so every rank evaluates (its share of) the
        same network.
        """
        progress, distiller = self.progress, self.distiller
        _require_finite_loss(self.guard, progress.epoch)
        _require_finite_weights(_trainable_state(distiller), self.ranks,
                                _after(progress.global_step, progress.epoch))
        train = {f"train/{k}": (v / max(progress.seen, 1)).item() for k, v in progress.sums.items()}
        self.ranks.average_norms(_trained_modules(distiller))
        val = evaluate(distiller, self.data, self.device, self.fast, self.ranks)
        metrics = {**train, **{f"val/{k}": v for k, v in val.items()},
                   "lr": self.schedule.get_last_lr()[0]}
        progress.history.append({"epoch": progress.epoch, **metrics})
        if self.recipe.lr_schedule == "step":
            self.schedule.step()
        progress.epoch += 1
        progress.step = 0
        progress.sums = {}
        progress.seen = 0
        primary = self.primary
        if self.ranks.is_main:
            self.store.update_state(self.job_id, epoch=progress.epoch,
                                    last_metric=metrics[f"val/{primary}"])
        if self.tracker:
            self.tracker.log_metrics(metrics, step=progress.epoch - 1)
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}",
                                  primary: f"{metrics[f'val/{primary}']:.1f}"})
        if self.ranks.is_main:
            self._save()
            if self.options.on_epoch is not None:
                self.options.on_epoch(progress.epoch - 1, metrics)
        return metrics

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> Dict[str, Any]:
        """After the last epoch: check and write the job's weights and ``result.json`` (rank 0)
        and return the result. A job of zero epochs is its initial network, evaluated with
        BatchNorm statistics from one pass over the training split."""
        self.close_bar()
        spec, progress, data, distiller, ranks = (self.spec, self.progress, self.data,
                                                  self.distiller, self.ranks)
        if not progress.history:  # zero epochs: the initial weights are the result
            calibrate_batchnorm(distiller.student, data, self.device)
            val = evaluate(distiller, data, self.device, self.fast, ranks)
            progress.history.append({"epoch": 0, **{f"val/{k}": v for k, v in val.items()}})
        final = progress.history[-1]
        metrics = {k[len("val/"):]: v for k, v in final.items() if k.startswith("val/")}
        primary = self.primary
        result = {
            "job_id": spec.job_id, "stage": spec.stage, "method": spec.method,
            "teacher": spec.teacher, "student": spec.model, "dataset": spec.dataset,
            "seed": spec.seed, "epochs": self.recipe.epochs, "task": data.info.task,
            "metrics": {**metrics,
                        f"{primary}_best": max(h[f"val/{primary}"] for h in progress.history)},
            "history": progress.history,
            "wall_time_s": time.time() - self.started,
            "world_size": ranks.part[1],
            "threads": torch.get_num_threads(),
            "fast_path": self.fast.record(),
            "provenance": self.provenance,
        }
        exported = distiller.exported_model().state_dict()
        _require_finite_result(result["metrics"], exported, ranks,
                               _after(progress.global_step, max(progress.epoch - 1, 0)))
        job_dir = self.store.job_dir(spec.job_id)
        if ranks.is_main:
            write_sealed(self.store.weights_path(spec.job_id), exported)
            if data.info.task == SEGMENTATION:
                save_val_samples(distiller, data, self.device, self.fast, job_dir / VAL_SAMPLES)
            write_json(job_dir / "result.json", result)
        if self.tracker:
            self.tracker.log_artifact(job_dir / "result.json")
        return ranks.from_main(result)


def train_alone(training: JobTraining, received: List[int]) -> Dict[str, Any]:
    """Drive ``training`` (restored) through its remaining epochs, batch by batch, and finish
    it. After a preemption signal (``received`` here, or on another rank) every rank
    checkpoints and :class:`JobInterrupted` is raised."""
    ranks = training.ranks
    try:
        while not training.finished:
            training.begin_epoch()
            epoch, step = training.position
            for batch in training.data.train.batches(epoch, step, shard=ranks.part):
                signals = training.step(batch, received)
                if signals:
                    training.checkpoint()
                    ranks.wait()  # no rank leaves before the checkpoint is on disk
                    raise interrupted(received, signals, training.progress.global_step)
            training.end_epoch()
    finally:
        training.close_bar()
    return training.finish()


def interrupted(received: List[int], anywhere: List[int], step: int) -> JobInterrupted:
    """The error of a run stopped after ``step`` by this process's signal (``received``) or,
    if it got none, by one another rank received (``anywhere``)."""
    if received:
        return JobInterrupted(f"signal {received[0]} at step {step}", received[0])
    return JobInterrupted(f"signal {anywhere[0]} to another rank at step {step}", anywhere[0])


def _require_finite_loss(guard: LossGuard, epoch: int) -> None:
    """JobFailed naming the first step (of ``epoch``) whose loss was NaN or infinite, if any:
    called before anything is checkpointed, so no checkpoint holds the poisoned weights."""
    fault = guard.first_fault()
    if fault is not None:
        raise JobFailed(fault.describe(epoch))


def _after(step: int, epoch: int) -> str:
    """Where a weights check stands: after global ``step`` (of 0-based ``epoch``)."""
    return f"after step {step} (epoch {epoch})"


def _require_finite_weights(state: Dict[str, torch.Tensor], ranks: Ranks, where: str) -> None:
    """JobFailed naming how many values of ``state`` (the weights about to be checkpointed or
    exported) are NaN or inf and the first tensor holding one, if any. Every rank calls it and
    they agree (the count is summed over them), so they fail together."""
    if not ranks.sum(nonfinite_tensors(state)).item():
        return
    fault = weights_fault(state)
    raise JobFailed(fault.describe(where) if fault else f"non-finite weights on another rank {where}")


def _require_finite_result(metrics: Dict[str, float], weights: Dict[str, torch.Tensor],
                           ranks: Ranks, where: str) -> None:
    """JobFailed if a final metric or a value of the exported ``weights`` is not finite: called
    before ``model.pt`` and ``result.json`` are written, so such a job is never done."""
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        listed = ", ".join(f"{name} = {value}" for name, value in bad.items())
        raise JobFailed(f"non-finite metrics {where}: {listed}")
    _require_finite_weights(weights, ranks, where)
