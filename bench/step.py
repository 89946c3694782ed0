"""Training-step throughput of the distillation methods, relative to the student alone.

What is measured: for each method (default ``vanilla``, ``kd``, ``fitnet``, ``crd``; teacher
``resnet32x4`` -> student ``resnet8x4``), images per second of one training step on batches of
random 32x32 inputs with random labels over 100 classes. A step is exactly what
``orchestrator.runner._train`` does per batch: the distiller's forward (under the bf16 autocast
switch), the sum of its weighted loss terms, ``zero_grad(set_to_none=True)``, ``backward`` and
an SGD step (lr 0.05, momentum 0.9, weight decay 5e-4) over ``learnable_parameters()``, with the
model and inputs in channels_last when ``--channels-last`` is given. Data loading is not timed:
a small pool of batches is made on the device before timing and cycled.

How: every method gets its published default settings (``parse_config(cls.Config, {})``), so
CRD keeps a memory bank of N = 50,000 rows and draws K = 16,384 negatives; its ``DataInfo`` holds
random labels over the 100 classes for the N samples, and each batch's ``index`` is N-distinct
sample ids. The teacher has random weights (speed does not depend on them); ``vanilla`` is built
without one. After ``--warmup`` untimed steps, ``--steps`` steps are timed with
``time.perf_counter`` (with ``torch.cuda.synchronize()`` before and after on GPU).

StableKD trains differently in each phase of its schedule, so it gets one row per phase of its
default schedule for the pair (``stablekd[decomposed]``, ``stablekd[partial]``,
``stablekd[end-to-end]`` for resnet8x4's three blocks): before timing, ``start_epoch`` is called
with an epoch inside that phase (of a ``PHASE_EPOCHS`` budget). ``row_names`` lists the rows.

Reported per row: images/s, ms/step, throughput as a fraction of the ``vanilla`` row, and peak
memory: on GPU ``torch.cuda.max_memory_allocated`` since that method was built (MiB); on CPU the
peak RSS of the whole process (``resource.getrusage``), a high-water mark that never decreases,
so later rows include earlier ones. A markdown table is printed and a JSON record is written.

    python bench/step.py                    # defaults (cuda if available, else cpu)
    python bench/step.py --threads 2        # CPU, 2 intra-op threads
    python bench/step.py --small            # a seconds-long smoke run (CI)
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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from methods.config import parse_config
from methods.distillers import DISTILLERS, DataInfo, Distiller
from methods.distillers.stablekd import RecompositionSchedule, StableKDConfig, resolve_num_blocks
from methods.models import build_model
from methods.models.blocks import default_num_blocks

NUM_CLASSES = 100
INPUT_SHAPE = (3, 32, 32)
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
DEFAULT_METHODS = ("vanilla", "kd", "fitnet", "crd", "msdcrd", "hsakd", "inverted_projection",
                   "spectral_reg", "stablekd")
DEFAULT_TEACHER, DEFAULT_STUDENT = "resnet32x4", "resnet8x4"
PHASE_EPOCHS = 1000
"""The epoch budget whose epochs are passed to ``start_epoch`` to enter each StableKD phase."""
DEFAULT_NUM_SAMPLES = 50_000
POOL_BATCHES = 4
BASELINE = "vanilla"
KD = "kd"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """Everything that decides what is measured (recorded in the JSON)."""

    device: str
    teacher: str
    student: str
    methods: List[str]
    batch_size: int
    warmup: int
    steps: int
    amp: str
    channels_last: bool
    threads: int
    num_samples: int
    crd_negatives: int
    num_classes: int = NUM_CLASSES
    input_shape: Tuple[int, int, int] = INPUT_SHAPE
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY


@dataclass
class Row:
    """One method's measurement; ``vs_student`` is images/s divided by the vanilla row's and
    ``time_vs_kd`` the step time divided by the KD row's (both None without that row)."""

    method: str
    images_per_s: float
    ms_per_step: float
    vs_student: Optional[float]
    time_vs_kd: Optional[float]
    peak_mem_mib: float
    final_loss: float
    learnable_params: int


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=None, help="images per step (64; --small: 8)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method names (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per method (3 on CPU, 20 on GPU; --small: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per method (20 on CPU, 200 on GPU; --small: 2)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="autocast mode, as the recipe's `amp` (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="as the recipe's `channels_last`")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--student", default=DEFAULT_STUDENT)
    p.add_argument("--num-samples", type=int, default=None,
                   help="N, the training-set size CRD's memory bank covers (50000; --small: 2048)")
    p.add_argument("--crd-negatives", type=int, default=None,
                   help="CRD's K negatives per sample (CRD default 16384; --small: 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/step-<device>-<date>[.cpu].json)")
    p.add_argument("--small", action="store_true",
                   help="CI smoke run: batch 8, 1 warm-up, 2 timed steps, K=256, N=2048 "
                        "(explicit flags still win)")
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on the device and on ``--small``."""
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    on_gpu = device == "cuda"
    crd_default = DISTILLERS.get("crd").Config().num_negatives

    def pick(value: Optional[int], small: int, normal: int) -> int:
        return value if value is not None else (small if args.small else normal)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        DISTILLERS.get(name, "--methods")
    return Settings(
        device=device, teacher=args.teacher, student=args.student, methods=methods,
        batch_size=pick(args.batch_size, 8, 64),
        warmup=pick(args.warmup, 1, 20 if on_gpu else 3),
        steps=pick(args.steps, 2, 200 if on_gpu else 20),
        amp=args.amp, channels_last=args.channels_last, threads=torch.get_num_threads(),
        num_samples=pick(args.num_samples, 2048, DEFAULT_NUM_SAMPLES),
        crd_negatives=pick(args.crd_negatives, 256, crd_default))


def make_data_info(s: Settings) -> DataInfo:
    labels = torch.randint(0, s.num_classes, (s.num_samples,), dtype=torch.int64)
    return DataInfo(num_samples=s.num_samples, labels=labels, num_classes=s.num_classes,
                    input_shape=tuple(s.input_shape))


def make_batches(s: Settings, info: DataInfo, device: torch.device) -> List[Batch]:
    """A few random batches on ``device``; each batch's ids are distinct, labels match DataInfo."""
    batches = []
    for _ in range(POOL_BATCHES):
        index = torch.randperm(s.num_samples)[: s.batch_size]
        x = torch.randn(s.batch_size, *s.input_shape)
        batches.append(Batch(x.to(device), info.labels[index].to(device), index.to(device)))
    return batches


def make_teacher(cls: Type[Distiller], cfg: Any, s: Settings) -> Optional[nn.Module]:
    """The method's teacher (``build_teacher``) with random weights; None when it requests none."""
    if cls.teacher_request(cfg) is None:
        return None
    return cls.build_teacher(cfg, s.teacher, s.num_classes)


def build_distiller(method: str, s: Settings, info: DataInfo, device: torch.device) -> Distiller:
    """As the runner's ``_build_distiller`` (default method settings, random teacher weights)."""
    cls = DISTILLERS.get(method)
    overrides: Dict[str, Any] = {"num_negatives": s.crd_negatives} if method == "crd" else {}
    cfg = parse_config(cls.Config, overrides, f"bench.{method}")
    student = build_model(s.student, s.num_classes)
    distiller = cls(student, make_teacher(cls, cfg, s), cfg, info).to(device)
    if s.channels_last:
        distiller.to(memory_format=torch.channels_last)
    return distiller


def phase_plan(method: str, teacher: str, student: str) -> List[Tuple[str, Optional[int]]]:
    """The rows of ``method`` as (row name, epoch of ``PHASE_EPOCHS`` to pass to
    ``start_epoch``, None for no call): one row for most methods, one per phase of the default
    schedule for StableKD (``stablekd[<phase label>]``)."""
    if method != "stablekd":
        return [(method, None)]
    cfg = parse_config(StableKDConfig, {}, f"bench.{method}")
    n = resolve_num_blocks(cfg, default_num_blocks(build_model(teacher, NUM_CLASSES)),
                           default_num_blocks(build_model(student, NUM_CLASSES)))
    schedule = RecompositionSchedule(n, cfg.partitions, cfg.boundaries)
    return [(f"{method}[{label}]", schedule.first_epoch(phase, PHASE_EPOCHS))
            for phase, label in enumerate(schedule.phase_labels())]


def row_names(methods: Sequence[str], teacher: str = DEFAULT_TEACHER,
              student: str = DEFAULT_STUDENT) -> List[str]:
    """The ``method`` column of the rows measured for ``methods``, in order."""
    return [name for m in methods for name, _ in phase_plan(m, teacher, student)]


def make_step(distiller: Distiller, s: Settings,
              device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """The runner's per-batch work, as a closure ``step(batch) -> loss``."""
    optimizer = torch.optim.SGD(distiller.learnable_parameters(), lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay)

    def step(batch: Batch) -> torch.Tensor:
        x = batch.x
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.amp == "bf16"):
            _, terms = distiller(x, batch.y, batch.index)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


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


def measure(method: str, s: Settings, info: DataInfo, batches: List[Batch],
            device: torch.device, row_name: str, epoch: Optional[int]) -> Row:
    """Build ``method`` (entering the phase of ``epoch`` when not None), run warm-up then timed
    steps; images/s over the timed steps only."""
    release(device)
    distiller = build_distiller(method, s, info, device)
    if epoch is not None:
        distiller.start_epoch(epoch, PHASE_EPOCHS)
    distiller.train()
    step = make_step(distiller, s, device)
    for i in range(s.warmup):
        step(batches[i % len(batches)])
    sync(device)
    start = time.perf_counter()
    for i in range(s.steps):
        loss = step(batches[(s.warmup + i) % len(batches)])
    sync(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else peak_rss_mib())
    row = Row(method=row_name, images_per_s=s.steps * s.batch_size / elapsed,
              ms_per_step=1000 * elapsed / s.steps, vs_student=None, time_vs_kd=None,
              peak_mem_mib=peak,
              final_loss=float(loss.detach().float()),
              learnable_params=sum(p.numel() for p in distiller.learnable_parameters()))
    del distiller, step
    return row


def add_ratios(rows: List[Row]) -> None:
    base = next((r for r in rows if r.method == BASELINE), None)
    kd = next((r for r in rows if r.method == KD), None)
    for r in rows:
        r.vs_student = r.images_per_s / base.images_per_s if base is not None else None
        r.time_vs_kd = r.ms_per_step / kd.ms_per_step if kd is not None else None


def step_time_ratio(rows: List[Row], method: str, reference: str) -> Optional[float]:
    """ms/step of ``method`` over ``reference`` (e.g. MSDCRD over CRD); None if one is missing."""
    times = {r.method: r.ms_per_step for r in rows}
    return times[method] / times[reference] if method in times and reference in times else None


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


def default_out(device: torch.device, day: str) -> Path:
    """GPU: step-<gpu-slug>-<date>.json; CPU: step-cpu-<date>.cpu.json (git-ignored)."""
    if device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return RESULTS_DIR / f"step-{slug}-{day}.json"
    return RESULTS_DIR / f"step-cpu-{day}.cpu.json"


def markdown_table(rows: List[Row], s: Settings) -> str:
    mem = "peak GPU mem (MiB)" if s.device == "cuda" else "peak RSS, process (MiB)"
    lines = [f"| method | images/s | ms/step | throughput vs student | step time vs KD | {mem} |",
             "|---|---:|---:|---:|---:|---:|"]

    def ratio(value: Optional[float]) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for r in rows:
        lines.append(f"| {r.method} | {r.images_per_s:,.1f} | {r.ms_per_step:.1f} | "
                     f"{ratio(r.vs_student)} | {ratio(r.time_vs_kd)} | {r.peak_mem_mib:,.0f} |")
    return "\n".join(lines)


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
    """Measure every method, print the table and write the JSON record."""
    s = resolve_settings(args)
    device = torch.device(s.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    info = make_data_info(s)
    batches = make_batches(s, info, device)
    rows = [measure(m, s, info, batches, device, name, epoch) for m in s.methods
            for name, epoch in phase_plan(m, s.teacher, s.student)]
    add_ratios(rows)
    for r in rows:
        if not (math.isfinite(r.images_per_s) and math.isfinite(r.final_loss)):
            print(f"warning: {r.method} gave a non-finite result: {r}", file=sys.stderr)
    now = datetime.now().astimezone()
    out = args.out or default_out(device, now.date().isoformat())
    record = {
        "benchmark": "train_step",
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": now.isoformat(timespec="seconds"),
        "memory_note": ("torch.cuda.max_memory_allocated since the method was built"
                        if device.type == "cuda" else
                        "process-wide peak RSS (ru_maxrss), cumulative over rows"),
        "load_avg_1m_before": load_before,
        "settings": asdict(s),
        "rows": [asdict(r) for r in rows],
        "msdcrd_over_crd_step_time": step_time_ratio(rows, "msdcrd", "crd"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{s.teacher} -> {s.student}, batch {s.batch_size}, {s.steps} timed steps after "
          f"{s.warmup} warm-up, amp={s.amp}, channels_last={s.channels_last}, "
          f"threads={s.threads}, CRD N={s.num_samples} K={s.crd_negatives}")
    print(f"device: {record['device']}, torch {record['torch']}\n")
    print(markdown_table(rows, s))
    if record["msdcrd_over_crd_step_time"] is not None:
        print(f"\nMSDCRD / CRD step time: {record['msdcrd_over_crd_step_time']:.2f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
