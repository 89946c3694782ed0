"""Training-step throughput: kdflow's fast path against a plain loop and torchdistill.

What is measured, in one run on one device: images per second of training steps, data
loading included, for each case (teacher -> student at one input size and batch size), each
method and each implementation:

- ``kdflow``: the job's own step (``orchestrator.training.TrainStep``) with the recipe's speed
  switches at ``auto`` (on a GPU: bf16 autocast, channels_last, fused SGD; the teacher under
  ``inference_mode``; no host synchronisation), fed by kdflow's in-memory loader holding the
  whole uint8 training set on the device and augmenting there (``device_resident``);
- ``kdflow-fp32``: the same loop and loader with the switches off (fp32, NCHW, per-tensor
  SGD): what the loop and the data path give without changing the arithmetic;
- ``kdflow+compile``: the fast path with ``compile: default`` and ``cuda_graphs: true`` (not
  in the default set: compiling takes most of a minute per row);
- ``plain``: the reference repositories' loop (``bench/plain_loop.py``): a torchvision
  DataLoader over PIL images, fp32, ``loss.item()`` every step, the same distiller modules;
- ``torchdistill``: KD only, torchdistill's ``DistillationBox`` driven as its example script
  drives it (``bench/peer_torchdistill.py``), over the plain loop's DataLoader.

Cases (``CASES``): ``cifar-b64`` and ``cifar-b256`` (resnet32x4 -> resnet8x4, 32x32, 100
classes, 50,000 training images) and ``imagenet-b256`` (ResNet34 -> ResNet18, 224x224, 1,000
classes; a pool of ``IMAGENET_POOL`` stored 256x256 images: the plain loop random-resized-crops
them, kdflow's resident loader flips 224x224 ones: JPEG decoding is in neither, see
``bench/loader.py`` for FFCV). Images are random, labels random; teachers have random weights.
Methods get their published defaults (CRD: K = 16,384 negatives; its memory bank covers the
training set). StableKD has one row per phase of its default schedule.

Per row: images/s, ms/step, the ratio to the plain loop, model TFLOP/s and the fraction of the
device's measured peak (FLOPs per image counted with ``torch.utils.flop_counter`` on one step,
forward and backward; the peak is a timed 8192^3 bf16 matrix product on a GPU, fp32 2048^3 on
the CPU, where oneDNN's convolutions can outrun that product, so CPU rows may pass 100%), peak
memory (GPU: ``max_memory_allocated`` per row; CPU: the process's peak RSS,
cumulative) and, for CIFAR rows, the projected time of a 240-epoch run (steps of 50,000 images
at the measured step time; evaluation not counted). A markdown table is printed, then the
issue's targets, and a JSON record is written.

    python bench/step.py                 # everything on a GPU; cifar-b64 alone on the CPU
    python bench/step.py --small         # every row at toy size on the CPU (CI, ~2 min)
    python bench/step.py --cases cifar-b64 --methods kd --impls kdflow,plain
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plain_loop import (AverageMeter, PILArrayDataset, forever, plain_loader,  # noqa: E402
                              plain_step, train_transform)
from kdflow.methods.config import parse_config  # noqa: E402
from kdflow.methods.distillers import DISTILLERS, DataInfo, Distiller  # noqa: E402
from kdflow.methods.distillers.stablekd import (RecompositionSchedule, StableKDConfig,  # noqa: E402
                                         resolve_num_blocks)
from kdflow.methods.models import build_model  # noqa: E402
from kdflow.methods.models.blocks import default_num_blocks  # noqa: E402
from kdflow.orchestrator.data.tensor_loaders import TensorTrainLoader  # noqa: E402
from kdflow.orchestrator.fast_path import resolve_fast_path  # noqa: E402
from kdflow.orchestrator.loss_guard import TOTAL  # noqa: E402
from kdflow.orchestrator.recipe import Recipe  # noqa: E402
from kdflow.orchestrator.training import TrainStep  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
METHODS = ("vanilla", "kd", "crd", "msdcrd", "hsakd", "stablekd")
PLAIN, KDFLOW = "plain", "kdflow"
#: Implementation -> the recipe's speed switches of its kdflow step (None: not kdflow's step).
KDFLOW_SWITCHES: Dict[str, Dict[str, Any]] = {
    KDFLOW: {},
    "kdflow-fp32": {"amp": "none", "channels_last": False, "fused_optimizer": False},
    "kdflow+compile": {"compile": "default", "cuda_graphs": True},
}
IMPLS = (KDFLOW, "kdflow-fp32", "kdflow+compile", PLAIN, "torchdistill")
GPU_IMPLS = (KDFLOW, "kdflow-fp32", PLAIN, "torchdistill")
CPU_IMPLS = (KDFLOW, PLAIN, "torchdistill")
PHASE_EPOCHS = 1000
"""The epoch budget whose epochs are passed to ``start_epoch`` to enter each StableKD phase."""
IMAGENET_POOL = 2048
"""Stored images of the ImageNet-shaped cases (the whole set would not fit in host memory)."""
EPOCHS_PROJECTED = 240
CPU_CASE = "cifar-b64"
"""The one case a full-size CPU run measures by default (the others take hours there)."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One teacher -> student pair at one input size, batch size and training-set size.

    size: the network's input (pixels); stored: the stored images' side (pixels);
    num_samples: training images (CRD's memory bank rows, the epoch of the projection).
    """

    name: str
    teacher: str
    student: str
    size: int
    stored: int
    num_classes: int
    batch_size: int
    num_samples: int

    @property
    def cifar(self) -> bool:
        return self.size == self.stored


CASES: Dict[str, Case] = {c.name: c for c in (
    Case("cifar-b64", "resnet32x4", "resnet8x4", 32, 32, 100, 64, 50_000),
    Case("cifar-b256", "resnet32x4", "resnet8x4", 32, 32, 100, 256, 50_000),
    Case("imagenet-b256", "resnet34", "resnet18", 224, 256, 1000, 256, IMAGENET_POOL),
)}


@dataclass(frozen=True)
class Settings:
    """Everything that decides what is measured (recorded in the JSON)."""

    device: str
    cases: List[Case]
    methods: List[str]
    impls: List[str]
    warmup: int
    steps: int
    workers: int
    threads: int
    crd_negatives: Optional[int]


@dataclass
class Row:
    """One (case, method row, implementation) measurement.

    vs_plain: images/s over the plain loop's on the same case and method row (None without it);
    gflop_per_image: model FLOPs of a training step per image (forward and backward, 1e9);
    peak_fraction: achieved model FLOP/s over the device's measured peak;
    projected_min: minutes of an ``EPOCHS_PROJECTED``-epoch run at this step time (CIFAR).
    """

    case: str
    method: str
    impl: str
    batch_size: int
    images_per_s: float
    ms_per_step: float
    vs_plain: Optional[float]
    gflop_per_image: float
    tflops: float
    peak_fraction: float
    peak_mem_mib: float
    projected_min: Optional[float]
    final_loss: float


@dataclass
class CaseData:
    """A case's training set: (N, H, W, 3) uint8 images and (N,) int64 labels on the host."""

    images: np.ndarray
    labels: np.ndarray

    def info(self, case: Case) -> DataInfo:
        return DataInfo(num_samples=len(self.labels), labels=torch.from_numpy(self.labels),
                        num_classes=case.num_classes, input_shape=(3, case.size, case.size))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None,
                   help=f"comma-separated, of {', '.join(CASES)} (default: all on a GPU and "
                        f"with --small, {CPU_CASE} alone on the CPU)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (%(default)s)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated, of {', '.join(IMPLS)} (default: "
                        f"{','.join(GPU_IMPLS)} on a GPU, {','.join(CPU_IMPLS)} on the CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per row (10 on GPU, 3 on CPU; --small: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per row (50 on GPU, 10 on CPU; --small: 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes of the plain loop and torchdistill "
                        "(min(8, CPUs); --small: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--crd-negatives", type=int, default=None,
                   help="CRD's K (default: its published 16,384; --small: 64)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/step-<device>[-<label>]-<date>"
                        "[.cpu].json)")
    p.add_argument("--label", default="", help="a word for the default JSON name")
    p.add_argument("--small", action="store_true",
                   help="CI run: batch 8 (CIFAR) and 2 (ImageNet shapes), 256 training "
                        "images, 1 warm-up and 2 timed steps (explicit flags still win)")
    return p.parse_args(argv)


def _names(text: str, known: Sequence[str], flag: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown {unknown or 'empty list'}; "
                         f"choose from {', '.join(known)}")
    return names


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on the device and on ``--small``."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"

    def pick(value: Optional[int], small: int, normal: int) -> int:
        return value if value is not None else (small if args.small else normal)

    default_cases = ",".join(CASES) if on_gpu or args.small else CPU_CASE
    cases = [CASES[n] for n in _names(args.cases or default_cases, list(CASES), "--cases")]
    if args.small:
        cases = [replace(c, batch_size=8 if c.cifar else 2, num_samples=256) for c in cases]
    impls = _names(args.impls or ",".join(GPU_IMPLS if on_gpu else CPU_IMPLS), IMPLS, "--impls")
    return Settings(
        device=device, cases=cases, methods=_names(args.methods, METHODS, "--methods"),
        impls=impls, warmup=pick(args.warmup, 1, 10 if on_gpu else 3),
        steps=pick(args.steps, 2, 50 if on_gpu else 10),
        workers=pick(args.workers, 0, min(8, os.cpu_count() or 1)),
        threads=torch.get_num_threads(),
        crd_negatives=(args.crd_negatives if args.crd_negatives is not None
                       else 64 if args.small else None))


def make_case_data(case: Case, seed: int = 0) -> CaseData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (case.num_samples, case.stored, case.stored, 3), dtype=np.uint8)
    return CaseData(images, rng.integers(0, case.num_classes, case.num_samples).astype(np.int64))


def phase_plan(method: str, case: Case) -> List[Tuple[str, Optional[int]]]:
    """The rows of ``method`` as (row name, epoch of ``PHASE_EPOCHS`` to pass to
    ``start_epoch``, None for no call): one row for most methods, one per phase of the default
    schedule for StableKD (``stablekd[<phase label>]``)."""
    if method != "stablekd":
        return [(method, None)]
    cfg = parse_config(StableKDConfig, {}, f"bench.{method}")
    n = resolve_num_blocks(cfg, default_num_blocks(build_model(case.teacher, case.num_classes)),
                           default_num_blocks(build_model(case.student, case.num_classes)))
    schedule = RecompositionSchedule(n, cfg.partitions, cfg.boundaries)
    return [(f"{method}[{label}]", schedule.first_epoch(phase, PHASE_EPOCHS))
            for phase, label in enumerate(schedule.phase_labels())]


def row_names(methods: Sequence[str], case: Case = CASES["cifar-b64"]) -> List[str]:
    """The ``method`` column of the rows measured for ``methods`` on ``case``, in order."""
    return [name for m in methods for name, _ in phase_plan(m, case)]


def build_distiller(method: str, case: Case, s: Settings, info: DataInfo, epoch: Optional[int],
                    device: torch.device) -> Distiller:
    """As the runner's ``_build_distiller`` (default method settings, random teacher weights),
    in the phase of ``epoch`` (None: no ``start_epoch`` call)."""
    cls = DISTILLERS.get(method)
    overrides = ({"num_negatives": s.crd_negatives}
                 if method == "crd" and s.crd_negatives is not None else {})
    cfg = parse_config(cls.Config, overrides, f"bench.{method}")
    teacher = (cls.build_teacher(cfg, case.teacher, case.num_classes)
               if cls.teacher_request(cfg) is not None else None)
    distiller = cls(cls.build_student(cfg, case.student, case.num_classes), teacher, cfg,
                    info).to(device)
    if epoch is not None:
        distiller.start_epoch(epoch, PHASE_EPOCHS)
    distiller.train()
    return distiller


Step = Callable[[], torch.Tensor]
"""One training step on the implementation's next batch; returns the (device) loss."""


def kdflow_step(distiller: Distiller, case: Case, data: CaseData, device: torch.device,
                switches: Dict[str, Any]) -> Step:
    """The job's own step (:class:`orchestrator.training.TrainStep`: forward, zero_grad,
    backward, loss sums, loss guard, SGD step), plus the device sums of the terms a job keeps,
    over kdflow's device-resident loader, with the recipe's speed ``switches`` (those not given
    at their defaults: ``auto``, not compiled). Returns the step's mean loss (device scalar)."""
    recipe = parse_config(Recipe, {"lr": LR, **switches}, "bench.recipe")
    fast = resolve_fast_path(recipe, device)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    if not case.cifar:  # kdflow feeds ImageNet through FFCV; here: a resident 224 px centre cut
        off = (case.stored - case.size) // 2
        images = images[:, :, off:off + case.size, off:off + case.size]
    loader = TensorTrainLoader(images.contiguous(), torch.from_numpy(data.labels), MEAN, STD,
                               case.batch_size, 0, device, pad=4 if case.cifar else 0,
                               hflip=True, resident=True, channels_last=fast.channels_last)
    if fast.channels_last:
        distiller.to(memory_format=torch.channels_last)
    train_step = TrainStep(distiller, recipe, fast, device)
    train_step.guard.eager = False  # as on a GPU: the record is read before checkpoints only
    sums: Dict[str, torch.Tensor] = {}

    def epochs():
        epoch = 0
        while True:
            yield from loader.batches(epoch)
            epoch += 1

    batches = epochs()

    def step() -> torch.Tensor:
        batch = next(batches)
        rows = batch.y.shape[0]
        values, _ = train_step(batch.x, batch.y, batch.index, rows, [], read_signals=False)
        for name, v in values.items():
            sums[name] = sums.get(name, 0) + v
        return values[TOTAL] / rows

    return step


def plain_dataset(case: Case, data: CaseData) -> PILArrayDataset:
    return PILArrayDataset(data.images, data.labels,
                           train_transform(case.size, case.stored, MEAN, STD))


def plain_loop_step(distiller: Distiller, case: Case, data: CaseData, device: torch.device,
                    workers: int) -> Step:
    """The reference repositories' step over a torchvision DataLoader (``bench/plain_loop``)."""
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    batches = forever(plain_loader(plain_dataset(case, data), case.batch_size, workers))
    losses, top1 = AverageMeter(), AverageMeter()

    def step() -> torch.Tensor:
        return torch.tensor(plain_step(distiller, optimizer, next(batches), device, losses, top1))

    return step


def torchdistill_step(distiller: Distiller, case: Case, data: CaseData, device: torch.device,
                      workers: int) -> Step:
    """torchdistill's KD on the plain loop's data, with kdflow KD's T, weights and SGD."""
    from bench.peer_torchdistill import build_kd_box, iter_steps

    cfg = distiller.cfg
    dataset = _WithoutIndex(plain_dataset(case, data))
    box = build_kd_box(distiller.teacher, distiller.student, dataset,
                       batch_size=case.batch_size, num_workers=workers, device=device,
                       temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                       kd_weight=cfg.kd_weight, lr=LR, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY)

    steps = iter_steps(box, device)

    def step() -> torch.Tensor:
        return torch.tensor(next(steps)[1])

    return step


class _WithoutIndex(torch.utils.data.Dataset):
    """(image, label) items of a (image, label, index) dataset: torchdistill's sample layout."""

    def __init__(self, dataset: PILArrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x, y, _ = self.dataset[i]
        return x, y


def make_step(impl: str, distiller: Distiller, case: Case, data: CaseData, s: Settings,
              device: torch.device) -> Step:
    if impl in KDFLOW_SWITCHES:
        return kdflow_step(distiller, case, data, device, KDFLOW_SWITCHES[impl])
    if impl == PLAIN:
        return plain_loop_step(distiller, case, data, device, s.workers)
    return torchdistill_step(distiller, case, data, device, s.workers)


def applies(impl: str, method: str) -> bool:
    """torchdistill runs the KD rows only (the peer's method, configured like kdflow's)."""
    return impl != "torchdistill" or method == "kd"


def flops_per_image(distiller: Distiller, case: Case, device: torch.device) -> float:
    """Model FLOPs of one fp32 training step (forward and backward) per image, counted by
    ``torch.utils.flop_counter`` on one batch of ``case.batch_size`` random images."""
    b = case.batch_size
    x = torch.randn(b, 3, case.size, case.size, device=device)
    y = torch.randint(0, case.num_classes, (b,), device=device)
    index = torch.arange(b, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        _, terms = distiller(x, y, index)
        sum(terms.values()).backward()
    distiller.zero_grad(set_to_none=True)
    return counter.get_total_flops() / b


def measured_peak_flops(device: torch.device) -> Tuple[float, str]:
    """The device's dense matrix-product rate (FLOP/s): bf16 8192^3 on a GPU (mean of 10
    after 3 warm-ups), fp32 2048^3 on the CPU (mean of 5 after 1)."""
    gpu = device.type == "cuda"
    n, dtype, warm, reps = (8192, torch.bfloat16, 3, 10) if gpu else (2048, torch.float32, 1, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warm):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
    return rate, f"{'bf16' if gpu else 'fp32'} {n}x{n}x{n} matrix product"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """Process-wide peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(case: Case, method: str, row: str, epoch: Optional[int], impl: str, s: Settings,
            data: CaseData, device: torch.device, peak: float, gflop: Optional[float]) -> Row:
    """Build the distiller, count its GFLOP per image unless ``gflop`` already holds them
    (every implementation of a row does the same arithmetic), run warm-up then timed steps of
    ``impl``."""
    release(device)
    torch.manual_seed(0)
    distiller = build_distiller(method, case, s, data.info(case), epoch, device)
    if gflop is None:
        gflop = flops_per_image(distiller, case, device) / 1e9
    step = make_step(impl, distiller, case, data, s, device)
    for _ in range(s.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(s.steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - start
    images_per_s = s.steps * case.batch_size / elapsed
    ms = 1000 * elapsed / s.steps
    tflops = gflop * images_per_s / 1e3
    projected = (EPOCHS_PROJECTED * math.ceil(case.num_samples / case.batch_size) * ms / 60e3
                 if case.cifar else None)
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
           else peak_rss_mib())
    result = Row(case=case.name, method=row, impl=impl, batch_size=case.batch_size,
                 images_per_s=images_per_s, ms_per_step=ms, vs_plain=None,
                 gflop_per_image=gflop, tflops=tflops, peak_fraction=tflops * 1e12 / peak,
                 peak_mem_mib=mem, projected_min=projected, final_loss=float(loss.float()))
    del distiller, step
    return result


def add_ratios(rows: List[Row]) -> None:
    plain = {(r.case, r.method): r.images_per_s for r in rows if r.impl == PLAIN}
    for r in rows:
        base = plain.get((r.case, r.method))
        r.vs_plain = r.images_per_s / base if base else None


def targets(rows: List[Row]) -> Dict[str, Any]:
    """The issue's targets, read off the rows: kdflow >= 3x the plain loop on cifar-b64 KD,
    ahead of torchdistill on every row both ran, and a 240-epoch cifar-b64 KD run < 15 min."""
    by = {(r.case, r.method, r.impl): r for r in rows}
    kd, plain = by.get(("cifar-b64", "kd", KDFLOW)), by.get(("cifar-b64", "kd", PLAIN))
    peers = [(r, by[(r.case, r.method, "torchdistill")]) for r in rows
             if r.impl == KDFLOW and (r.case, r.method, "torchdistill") in by]
    return {
        "cifar_b64_kd_vs_plain": kd.images_per_s / plain.images_per_s if kd and plain else None,
        "ahead_of_torchdistill": (all(a.images_per_s > b.images_per_s for a, b in peers)
                                  if peers else None),
        "vs_torchdistill": {f"{a.case}/{a.method}/{a.impl}": a.images_per_s / b.images_per_s
                            for a, b in peers},
        "cifar_b64_kd_240_epochs_min": kd.projected_min if kd else None,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_out(device: torch.device, day: str, label: str = "") -> Path:
    """GPU: step-<gpu-slug>[-<label>]-<date>.json; CPU: step-cpu[-<label>]-<date>.cpu.json
    (git-ignored)."""
    tag = f"-{label}" if label else ""
    if device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return RESULTS_DIR / f"step-{slug}{tag}-{day}.json"
    return RESULTS_DIR / f"step-cpu{tag}-{day}.cpu.json"


def markdown_table(rows: List[Row], device: torch.device) -> str:
    mem = "peak GPU mem (MiB)" if device.type == "cuda" else "peak RSS, process (MiB)"
    lines = [f"| case | method | impl | images/s | ms/step | vs plain | GFLOP/img | TFLOP/s | "
             f"% of peak | {mem} | {EPOCHS_PROJECTED} epochs (min) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def opt(value: Optional[float], fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    for r in rows:
        lines.append(f"| {r.case} | {r.method} | {r.impl} | {r.images_per_s:,.0f} | "
                     f"{r.ms_per_step:.2f} | {opt(r.vs_plain, '.2f')} | {r.gflop_per_image:.2f} | "
                     f"{r.tflops:.2f} | {100 * r.peak_fraction:.1f} | {r.peak_mem_mib:,.0f} | "
                     f"{opt(r.projected_min, '.1f')} |")
    return "\n".join(lines)


def targets_text(t: Dict[str, Any]) -> str:
    def opt(value: Optional[float], fmt: str) -> str:
        return format(value, fmt) if value is not None else "not measured"

    ahead = t["ahead_of_torchdistill"]
    return "\n".join([
        f"kdflow / plain loop, cifar-b64 KD: {opt(t['cifar_b64_kd_vs_plain'], '.2f')} "
        f"(target >= 3x on an H100)",
        f"kdflow ahead of torchdistill on every row: "
        f"{'not measured' if ahead is None else ('yes' if ahead else 'no')} "
        f"({', '.join(f'{k} {v:.2f}x' for k, v in t['vs_torchdistill'].items()) or '-'})",
        f"projected {EPOCHS_PROJECTED}-epoch cifar-b64 KD run: "
        f"{opt(t['cifar_b64_kd_240_epochs_min'], '.1f')} min (target < 15 on an H100)",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """Measure every row, print the table and the targets, and write the JSON record."""
    s = resolve_settings(args)
    device = torch.device(s.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    peak, peak_how = measured_peak_flops(device)
    rows: List[Row] = []
    for case in s.cases:
        data = make_case_data(case)
        for method in s.methods:
            for name, epoch in phase_plan(method, case):
                gflop = None
                for impl in (i for i in s.impls if applies(i, method)):
                    r = measure(case, method, name, epoch, impl, s, data, device, peak, gflop)
                    rows.append(r)
                    gflop = r.gflop_per_image
                    print(f"  {case.name} {name} {impl}: {r.images_per_s:,.0f} images/s",
                          file=sys.stderr, flush=True)
    add_ratios(rows)
    for r in rows:
        if not (math.isfinite(r.images_per_s) and math.isfinite(r.final_loss)):
            print(f"warning: a non-finite result: {r}", file=sys.stderr)
    goal = targets(rows)
    now = datetime.now().astimezone()
    out = args.out or default_out(device, now.date().isoformat(), args.label)
    fast = resolve_fast_path(parse_config(Recipe, {}, "bench.recipe"), device)
    record = {
        "benchmark": "train_step",
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": now.isoformat(timespec="seconds"),
        "peak_flops": peak,
        "peak_how": peak_how,
        "kdflow_fast_path": fast.record(),
        "memory_note": ("torch.cuda.max_memory_allocated per row" if device.type == "cuda"
                        else "process-wide peak RSS (ru_maxrss), cumulative over rows"),
        "load_avg_1m_before": load_before,
        "settings": {**asdict(s), "cases": [asdict(c) for c in s.cases]},
        "rows": [asdict(r) for r in rows],
        "targets": goal,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"device: {record['device']}, torch {record['torch']}; peak {peak / 1e12:.1f} TFLOP/s "
          f"({peak_how}); {s.steps} timed steps after {s.warmup} warm-up; DataLoader workers "
          f"{s.workers}; kdflow switches {fast.record()}\n")
    print(markdown_table(rows, device))
    print("\n" + targets_text(goal))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
