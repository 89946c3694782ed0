"""The job runner: the single entry point that runs one teacher or distillation job.

Every launcher (local worker processes, SLURM, Ray) calls :func:`run_job`, so a job behaves the
same wherever it runs. A job resumes from its newest checkpoint and, on CPU, ends with exactly
the weights and metrics of a run that was never interrupted, at the same torch thread count:
each launcher states that count in :attr:`RunOptions.threads`, the run uses it wherever it runs,
and ``result.json`` records it (``threads``). Its ``result.json`` (and its MLflow run's tags)
record its provenance: the code, versions and device that produced it
(:mod:`orchestrator.provenance`).

No job ends ``done`` with non-finite weights or metrics: before every checkpoint and before the
final weights are written, every parameter and buffer is checked (:mod:`orchestrator.loss_guard`,
one device reduction and one read), so a step that poisons the weights fails the job and the
checkpoints from before it stay usable.

With ``RunOptions.distributed`` (``world_size >= 2``) the process runs as one rank of a
multi-process job (:mod:`orchestrator.distributed`): each rank trains on its contiguous slice
of every global batch, the gradients are averaged over the ranks, and rank 0 alone writes the
job's files and talks to MLflow. Such a run resumes from its checkpoints too, but it is not
bit-identical to a single-process run (BatchNorm normalises over each rank's slice).
"""
from __future__ import annotations

import bisect
import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from kdflow.methods.config import parse_config
from kdflow.methods.distillers import DISTILLERS, Distiller
from kdflow.methods.tasks import SEGMENTATION
from kdflow.orchestrator.atomic import atomic_write, remove_partial_writes, write_json
from kdflow.orchestrator.checkpoint import (CheckpointRejected, checkpoint_path,
                                            init_checkpoint_path, load_latest_checkpoint,
                                            read_sealed, save_checkpoint, write_sealed)
from kdflow.orchestrator.data import Data, build_data, validate_dataset
from kdflow.orchestrator.distributed import ALONE, DistEnv, Ranks, process_group
from kdflow.orchestrator.fast_path import (FastPath, autocast, build_optimizer, resolve_fast_path,
                                           step_forward)
from kdflow.orchestrator.loss_guard import TOTAL, LossGuard, nonfinite_tensors, weights_fault
from kdflow.orchestrator.metrics import TASK_METRICS, primary_metric
from kdflow.orchestrator.progress import job_bar
from kdflow.orchestrator.provenance import job_provenance, provenance_tags, weights_fingerprint
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.tracking import JobTracker

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
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


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Within the block, torch runs ``threads`` intra-op threads (None: as it is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _preemption_flag() -> Iterator[List[int]]:
    """Within the block, SIGTERM / SIGUSR2 / SIGINT set a flag instead of killing the process.

    Off the main thread (a Ray Tune trial), where handlers cannot be installed, the flag is
    never set: the process's owner stops the run and the job resumes from its checkpoints.
    """
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


@torch.no_grad()
def evaluate(distiller: Distiller, data: Data, device: torch.device, fast: FastPath,
             ranks: Ranks = ALONE) -> Dict[str, float]:
    """The task's metrics (:mod:`orchestrator.metrics`, in percent) of ``distiller.predict``
    over the whole held-out split: top1/top5, or miou/pixel_acc.

    Over several ``ranks`` (which must hold the same network), rank r evaluates the batches
    ``i`` with ``i % world_size == r`` and the counts are summed: every rank returns the same.
    """
    distiller.eval()
    metrics = TASK_METRICS.get(data.info.task)(data.info.num_classes, device)
    for batch in data.val.batches(shard=ranks.part):
        x, y = batch.x.to(device), batch.y.to(device)
        with autocast(device, fast):
            logits = distiller.predict(x, y).float()
        metrics.update(logits, y)
    return metrics.result(ranks.sum(metrics.counts))


#: The file of a segmentation job's validation samples (:func:`save_val_samples`).
VAL_SAMPLES = "val_samples.pt"
#: Validation images a segmentation job keeps with their predictions (for the report's figure).
SAMPLE_IMAGES = 4


@torch.no_grad()
def save_val_samples(distiller: Distiller, data: Data, device: torch.device, fast: FastPath,
                     path: Path) -> None:
    """Write the first ``SAMPLE_IMAGES`` validation images of a segmentation job to ``path``:
    ``x`` (K, 3, H, W) float16 normalised images, ``y`` and ``pred`` (K, H, W) uint8 label maps
    (255 = ignore), ``index`` (K,) their positions in the split."""
    distiller.eval()
    batch = next(iter(data.val.batches()))
    x, y = batch.x[:SAMPLE_IMAGES].to(device), batch.y[:SAMPLE_IMAGES].to(device)
    with autocast(device, fast):
        pred = distiller.predict(x, y).float().argmax(dim=1)
    samples = {"x": x.half().cpu(), "y": y.to(torch.uint8).cpu(),
               "pred": pred.to(torch.uint8).cpu(), "index": batch.index[:SAMPLE_IMAGES].cpu()}
    atomic_write(path, lambda f: torch.save(samples, f))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, data: Data, device: torch.device) -> None:
    """Set BatchNorm running statistics to their averages over one pass of the training split.

    Only the statistics change, never a weight: an untrained (randomly initialised) network
    then behaves in eval mode as it does in train mode, instead of passing activations through
    with the default mean 0 / variance 1, which lets them grow without bound with depth.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the pass
    model.train()
    for batch in data.train.batches(0):
        model(batch.x.to(device))
    model.eval()


def run_job(spec: JobSpec, store: JobStore, options: RunOptions | None = None) -> Dict[str, Any]:
    """Run (or resume, or skip if finished) the job ``spec`` and return its ``result.json``.

    Raises :class:`JobInterrupted` after SIGTERM/SIGUSR2 (checkpoint written, state
    ``interrupted``) and :class:`JobFailed` or the original error otherwise (state ``failed``),
    among them non-finite weights or metrics (no ``model.pt``, no ``result.json``).
    ``options.threads`` torch threads run it (the count is restored afterwards).
    The job's lock is held throughout: a second process asked to run the same job (two sweep
    points sharing a teacher) waits, then finds it done.
    With ``options.distributed`` every rank of the job calls this: they join one process group,
    return the same result and raise together when any of them is signalled.
    """
    options = options or RunOptions()
    ranks = Ranks(options.distributed)
    with _torch_threads(options.threads):
        if ranks.env is None:
            with store.lock(spec):
                return _run(spec, store, options, ranks)
        recipe = parse_config(Recipe, spec.recipe, f"{spec.job_id}.recipe")
        with process_group(ranks.env, ranks.device(select_device(recipe.device))):
            with store.lock(spec) if ranks.is_main else contextlib.nullcontext():
                return _run(spec, store, options, ranks)


def _run(spec: JobSpec, store: JobStore, options: RunOptions, ranks: Ranks) -> Dict[str, Any]:
    """:func:`run_job` on ``ranks``: rank 0 keeps the job's state; all ranks train."""
    job_id = spec.job_id
    done = state = None
    if ranks.is_main:
        store.add(spec)
        store.complete_supersede(job_id)  # a re-run request cut short: finish setting aside
        done = store.result(job_id)
        if done is None:
            state = store.update_state(job_id, status="running", error=None,
                                       attempts=store.state(job_id).attempts + 1)
    done = ranks.from_main(done)
    if done is not None:
        return done
    tracker = None
    try:
        if options.tracking_uri and ranks.is_main:
            tracker = JobTracker(options.tracking_uri, options.experiment, spec, state.mlflow_run_id,
                                 store.job_dir(job_id),
                                 on_run=lambda run_id: store.update_state(job_id, mlflow_run_id=run_id))
        result = _train(spec, store, options, tracker, ranks)
    except JobInterrupted:
        if ranks.is_main:
            store.update_state(job_id, status="interrupted")
        if tracker:
            tracker.finish("KILLED")
        raise
    except BaseException as err:
        if ranks.is_main:
            store.update_state(job_id, status="failed", error=f"{type(err).__name__}: {err}")
        if tracker:
            tracker.finish("FAILED")
        raise
    if ranks.is_main:
        store.update_state(job_id, status="done",
                           last_metric=result["metrics"][primary_metric(result["task"])])
    if tracker:
        tracker.finish("FINISHED")
    return result


def _train(spec: JobSpec, store: JobStore, options: RunOptions, tracker: Optional[JobTracker],
           ranks: Ranks) -> Dict[str, Any]:
    started = time.time()
    recipe = parse_config(Recipe, spec.recipe, f"{spec.job_id}.recipe")
    device = ranks.device(select_device(recipe.device))
    fast = resolve_fast_path(recipe, device)
    torch.manual_seed(spec.seed)
    data = build_data(spec.dataset, spec.dataset_cfg, f"{spec.job_id}.dataset_cfg",
                      recipe.batch_size, spec.seed, device, fast.channels_last)
    ranks.check_batches(data.info.num_samples, recipe.batch_size)
    teacher_weights = (weights_fingerprint(store.weights_path(spec.teacher_job))
                       if spec.teacher_job else None)
    distiller = _build_distiller(spec, store, data, device)
    provenance = job_provenance(spec, device, teacher_weights) if ranks.is_main else {}
    if fast.channels_last:
        distiller.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(distiller.learnable_parameters(), recipe, fast)
    forward = step_forward(distiller, device, fast)
    if tracker:
        tracker.set_tags({"kdflow.device": device.type,
                          **{f"kdflow.fast_path.{k}": v for k, v in fast.record().items()},
                          **provenance_tags(provenance)})
    steps = data.train.steps_per_epoch
    schedule = _schedule(optimizer, recipe, steps)
    progress = _Progress()
    ckpt_dir = store.checkpoint_dir(spec.job_id)
    checkpoint = ranks.from_main(_resume_state(spec, store) if ranks.is_main else None)
    donated = checkpoint is None and spec.donor is not None
    if donated:
        checkpoint = ranks.from_main(load_donor_checkpoint(spec, store) if ranks.is_main else None)
    if checkpoint is not None:
        distiller.load_state_dict(checkpoint["distiller"], strict=False)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if donated:
            _restart_schedule(optimizer, schedule, recipe, checkpoint["progress"]["epoch"])
        else:
            schedule.load_state_dict(checkpoint["schedule"])
        torch.set_rng_state(checkpoint["rng"])
        progress = _Progress(**{**checkpoint["progress"],
                                "sums": {k: v.to(device) for k, v in checkpoint["progress"]["sums"].items()}})
    if ranks.is_main:
        store.update_state(spec.job_id, resumed_step=progress.global_step if checkpoint else None)
    ranks.share_state(_trainable_state(distiller).values())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    guard = LossGuard(progress.global_step, device)

    def save() -> None:  # rank 0 only
        save_checkpoint(ckpt_dir, progress.global_step, {
            "distiller": _trainable_state(distiller), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
            "progress": {"epoch": progress.epoch, "step": progress.step,
                         "global_step": progress.global_step, "history": progress.history,
                         "sums": {k: v.cpu() for k, v in progress.sums.items()},
                         "seen": progress.seen},
        })

    primary = primary_metric(data.info.task)
    bar = _progress_bar(spec, options, total=recipe.epochs * steps,
                        initial=progress.epoch * steps + progress.step) if ranks.is_main else None
    with _preemption_flag() as preempted:
        while progress.epoch < recipe.epochs:
            distiller.start_epoch(progress.epoch, recipe.epochs)
            distiller.train()
            for batch in data.train.batches(progress.epoch, progress.step, shard=ranks.part):
                x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
                global_size = min(recipe.batch_size,
                                  data.info.num_samples - progress.step * recipe.batch_size)
                _, loss, terms = forward(x, y, batch.index.to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                rows = y.shape[0]  # samples: a segmentation batch's losses are per-pixel means
                after = progress.global_step + 1
                checkpoint_due = after % recipe.checkpoint_every_steps == 0
                sums, signals = ranks.reduce_step(
                    params, {name: value.detach().float() * rows
                             for name, value in {TOTAL: loss, **terms}.items()},
                    share=rows / global_size, received=preempted,
                    read_signals=checkpoint_due or after % SIGNAL_CHECK_EVERY == 0)
                guard.observe(sums)  # summed over the ranks: every rank sees the same record
                optimizer.step()
                if recipe.lr_schedule == "poly":
                    schedule.step()
                for name, value in sums.items():
                    progress.sums[name] = progress.sums.get(name, 0) + value
                progress.seen += global_size
                progress.step += 1
                progress.global_step += 1
                if bar is not None:
                    bar.update(1)
                if guard.eager or signals or checkpoint_due:
                    _require_finite_loss(guard, progress.epoch)
                if signals or checkpoint_due:
                    _require_finite_weights(_trainable_state(distiller), ranks,
                                            _after(progress.global_step, progress.epoch))
                if signals:
                    if ranks.is_main:
                        save()
                    ranks.wait()  # no rank leaves before the checkpoint is on disk
                    raise _interrupted(preempted, signals, progress.global_step)
                if checkpoint_due and ranks.is_main:
                    save()
            _require_finite_loss(guard, progress.epoch)
            _require_finite_weights(_trainable_state(distiller), ranks,
                                    _after(progress.global_step, progress.epoch))
            metrics = _end_epoch(progress, distiller, data, device, fast, recipe, schedule, ranks)
            if ranks.is_main:
                store.update_state(spec.job_id, epoch=progress.epoch,
                                   last_metric=metrics[f"val/{primary}"])
            if tracker:
                tracker.log_metrics(metrics, step=progress.epoch - 1)
            if bar is not None:
                bar.set_postfix({"loss": f"{metrics['train/loss']:.3f}",
                                 primary: f"{metrics[f'val/{primary}']:.1f}"})
            if ranks.is_main:
                save()
                if options.on_epoch is not None:
                    options.on_epoch(progress.epoch - 1, metrics)
    if bar is not None:
        bar.close()
    if not progress.history:  # zero epochs: the initial weights are the result
        calibrate_batchnorm(distiller.student, data, device)
        val = evaluate(distiller, data, device, fast, ranks)
        progress.history.append({"epoch": 0, **{f"val/{k}": v for k, v in val.items()}})
    final = progress.history[-1]
    metrics = {k[len("val/"):]: v for k, v in final.items() if k.startswith("val/")}
    result = {
        "job_id": spec.job_id, "stage": spec.stage, "method": spec.method,
        "teacher": spec.teacher, "student": spec.model, "dataset": spec.dataset,
        "seed": spec.seed, "epochs": recipe.epochs, "task": data.info.task,
        "metrics": {**metrics,
                    f"{primary}_best": max(h[f"val/{primary}"] for h in progress.history)},
        "history": progress.history,
        "wall_time_s": time.time() - started,
        "world_size": ranks.part[1],
        "threads": torch.get_num_threads(),
        "fast_path": fast.record(),
        "provenance": provenance,
    }
    exported = distiller.exported_model().state_dict()
    _require_finite_result(result["metrics"], exported, ranks,
                           _after(progress.global_step, max(progress.epoch - 1, 0)))
    if ranks.is_main:
        weights = store.weights_path(spec.job_id)
        write_sealed(weights, exported)
        if data.info.task == SEGMENTATION:
            save_val_samples(distiller, data, device, fast,
                             store.job_dir(spec.job_id) / VAL_SAMPLES)
        write_json(store.job_dir(spec.job_id) / "result.json", result)
    if tracker:
        tracker.log_artifact(store.job_dir(spec.job_id) / "result.json")
    return ranks.from_main(result)


def _interrupted(received: List[int], anywhere: List[int], step: int) -> JobInterrupted:
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


def _end_epoch(progress: _Progress, distiller: Distiller, data: Data, device: torch.device,
               fast: FastPath, recipe: Recipe, schedule: torch.optim.lr_scheduler.LRScheduler,
               ranks: Ranks) -> Dict[str, float]:
    """Evaluate, record the epoch's metrics, step the LR schedule and reset the accumulators.

    The loss sums are already summed over the ranks; the ranks' BatchNorm statistics are
    averaged first, so every rank evaluates (its share of) the same network.
    """
    train = {f"train/{k}": (v / max(progress.seen, 1)).item() for k, v in progress.sums.items()}
    ranks.average_norms(_trained_modules(distiller))
    val = evaluate(distiller, data, device, fast, ranks)
    metrics = {**train, **{f"val/{k}": v for k, v in val.items()},
               "lr": schedule.get_last_lr()[0]}
    progress.history.append({"epoch": progress.epoch, **metrics})
    if recipe.lr_schedule == "step":
        schedule.step()
    progress.epoch += 1
    progress.step = 0
    progress.sums = {}
    progress.seen = 0
    return metrics


def _progress_bar(spec: JobSpec, options: RunOptions, total: int, initial: int) -> Any:
    """The job's bar over its ``total`` steps (None when ``options.progress`` is off)."""
    if not options.progress:
        return None
    return job_bar(spec.title, total, initial, options.progress_position)


def run_job_in_store(output_dir: str, job_id: str, options: RunOptions) -> Dict[str, Any]:
    """Worker entry point: load the spec of ``job_id`` from the store at ``output_dir``."""
    store = JobStore(Path(output_dir) / "jobs")
    return run_job(store.spec(job_id), store, options)
