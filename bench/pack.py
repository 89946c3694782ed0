"""Packed distillation against the same jobs run one after another: wall time and images/s.

What is measured, in one run on one device, for each teacher -> student pair (``PAIRS``) and
each pack size K (``--ks``, default 1, 2, 4, 8): the wall time of K distillation jobs of that
pair run as one pack (``orchestrator.pack.run_pack``: one batch load and one teacher forward
per batch shared by the members) against the same K jobs run one after another
(``orchestrator.runner.run_job`` each), from the same trained teacher job, at the same torch
thread count. The K jobs are the first K of the ``--mix`` (``MIXES``), jobs of one teacher and
seed that share one ``pack_key``: ``methods``, distinct methods (KD, FitNet, CRD, MSDCRD,
StableKD) and method-setting variants (KD at T = 2 and 8, MSDCRD + KD); ``kd-sweep``, KD and a
sweep of its temperature. Wall times are whole job runs: building the
data and the networks, every epoch's evaluation and checkpoint, ``model.pt`` and
``result.json``.

The data is kdflow's ``synthetic`` dataset at CIFAR-100's shapes (32x32 images, 100 classes,
``--train-images`` training images, nothing to download); the recipe is CIFAR's (batch 64,
SGD) for ``--epochs`` epochs. The teacher job is trained once per pair (1 epoch; timing needs
no accurate teacher) and copied into a fresh job store for every timed run.

Per (pair, K): sequential and packed wall seconds, the speedup (sequential / packed), images/s
both ways (images: K x epochs x training images) and whether every packed job's final metrics
and history equal its sequential run's (on the CPU they must, bit for bit). Per pair: the
teacher forward's milliseconds per batch (eval mode, ``inference_mode``) and its share of a
solo KD job's wall time per step. Then the issue's target (K = 8 at least 2x faster than
sequential on the CPU) and, from the measured throughputs, a projection of a whole 240-epoch
CIFAR-100 study of 10 methods x 3 seeds of one pair (its teacher trained once) in device-hours,
packed (at the largest K's member-images/s) and sequential (at K = 1's). A markdown table is
printed and written next to the JSON record.

    python bench/pack.py                    # CPU, both pairs, ~10-15 min on 2 idle cores
    python bench/pack.py --mix kd-sweep --pairs resnet32x4->resnet8x4 --ks 8
    python bench/pack.py --small            # toy sizes (CI; about a minute on 2 idle cores)
    python bench/pack.py --device cuda      # the same on a GPU, with more training images
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step import device_name  # noqa: E402
from kdflow.methods.models import build_model  # noqa: E402
from kdflow.orchestrator.pack import pack_key, run_pack  # noqa: E402
from kdflow.orchestrator.runner import RunOptions, run_job  # noqa: E402
from kdflow.orchestrator.spec import JobSpec  # noqa: E402
from kdflow.orchestrator.store import JobStore  # noqa: E402
from kdflow.orchestrator.study import expand_study  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: CIFAR-100's shapes: side of the (square, RGB) images and classes.
IMAGE_SIZE, NUM_CLASSES = 32, 100
#: The issue's target: a pack of this many jobs at least ``TARGET_SPEEDUP`` times faster than
#: the same jobs run one after another, on the CPU.
TARGET_K, TARGET_SPEEDUP = 8, 2.0
#: The projected study: 240-epoch CIFAR-100 (50,000 training images), 10 methods x 3 seeds.
STUDY_EPOCHS, STUDY_IMAGES, STUDY_METHODS, STUDY_SEEDS = 240, 50_000, 10, 3
#: Epochs of the teacher job (timing needs no accurate teacher; a study refuses 0).
TEACHER_EPOCHS = 1
#: CRD's negatives: the published 16,384, capped at this fraction of the training images
#: (without replacement, K negatives need K images of other classes).
CRD_SHARE = 0.5


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair of the CIFAR zoo (``kdflow.methods.models``)."""

    teacher: str
    student: str

    @property
    def name(self) -> str:
        return f"{self.teacher}->{self.student}"


PAIRS: Tuple[Pair, ...] = (Pair("resnet32x4", "resnet8x4"), Pair("resnet20", "resnet8"))


@dataclass(frozen=True)
class Member:
    """One job of the packs: a method and the settings that set it apart from the method's
    study settings ({}: the method's own ``distill`` job; else an ablation of them)."""

    method: str
    ablated: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.method + "".join(f"[{k}={v}]" for k, v in self.ablated)

    def matches(self, spec: JobSpec) -> bool:
        if spec.method != self.method:
            return False
        if not self.ablated:
            return spec.stage == "distill"
        return spec.stage == "ablation" and all(spec.method_cfg.get(k) == v
                                                for k, v in self.ablated)


#: The jobs of a pack of K, by ``--mix``: the first K of the mix. ``methods``: distinct methods
#: first, then setting variants (StableKD runs its own teacher forward, over its blocks);
#: ``kd-sweep``: KD and a temperature ablation, the members all reading one teacher forward.
MIXES: Dict[str, Tuple[Member, ...]] = {
    "methods": (
        Member("kd"), Member("fitnet"), Member("crd"), Member("msdcrd"), Member("stablekd"),
        Member("kd", (("temperature", 2.0),)), Member("kd", (("temperature", 8.0),)),
        Member("msdcrd", (("kd_weight", 1.0),)),
    ),
    "kd-sweep": (Member("kd"),) + tuple(Member("kd", (("temperature", t),))
                                        for t in (1.0, 2.0, 3.0, 5.0, 6.0, 8.0, 10.0)),
}
#: The most members a mix has.
MAX_MEMBERS = max(len(mix) for mix in MIXES.values())


@dataclass(frozen=True)
class Settings:
    """Everything that decides what is measured (recorded in the JSON).

    train_images, val_images: the synthetic splits' sizes; threads: torch intra-op threads of
    every run (packed and sequential alike); forward_reps: timed teacher forwards per pair.
    """

    device: str
    pairs: List[Pair]
    ks: List[int]
    epochs: int
    batch_size: int
    train_images: int
    val_images: int
    threads: int
    forward_reps: int
    mix: str = "methods"

    @property
    def members(self) -> Tuple[Member, ...]:
        """The jobs of the largest pack, in order (a pack of K runs the first K)."""
        return MIXES[self.mix]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_images / self.batch_size)

    @property
    def crd_negatives(self) -> int:
        return min(16_384, int(self.train_images * CRD_SHARE))


@dataclass
class Row:
    """One (pair, K) measurement. Seconds are wall-clock; images/s count K x epochs x training
    images; equal: every packed job's metrics and history equal its sequential run's;
    max_metric_diff: the largest absolute difference of a final metric (percent points)."""

    pair: str
    k: int
    members: List[str]
    images: int
    sequential_s: float
    packed_s: float
    speedup: float
    sequential_images_per_s: float
    packed_images_per_s: float
    equal: bool
    max_metric_diff: float


@dataclass
class PairTiming:
    """Per pair: the teacher job's wall seconds and images/s (``TEACHER_EPOCHS`` x training
    images), the teacher forward's ms per batch and its share of a solo KD job's wall time per
    step (None without a K = 1 row)."""

    pair: str
    teacher_s: float
    teacher_images_per_s: float
    teacher_forward_ms: float
    teacher_forward_share: Optional[float]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--pairs", default=None,
                   help=f"comma-separated teacher->student of {', '.join(x.name for x in PAIRS)}"
                        " (default: all)")
    p.add_argument("--ks", default=None, help="pack sizes, comma-separated (default 1,2,4,8)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every student job (1)")
    p.add_argument("--batch-size", type=int, default=None, help="64 (--small: 8)")
    p.add_argument("--train-images", type=int, default=None,
                   help="training images (CPU 640, GPU 10,000; --small: 8)")
    p.add_argument("--val-images", type=int, default=None,
                   help="validation images (CPU 200, GPU 2,000; --small: 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of every run (default: all cores)")
    p.add_argument("--work", type=Path, default=None,
                   help="an empty or new folder for the job stores, kept (default: a "
                        "temporary folder, removed)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/pack-<device>-<date>[.cpu].json); "
                        "the markdown table goes next to it (.md)")
    p.add_argument("--mix", choices=sorted(MIXES), default="methods",
                   help="the pack's jobs: distinct methods (default) or a KD temperature sweep")
    p.add_argument("--small", action="store_true",
                   help="CI run: 8 training and 8 validation images, batch 8, 1 epoch "
                        "(explicit flags win)")
    return p.parse_args(argv)


def _ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: integers, comma-separated, got {text!r}") from None
    bad = [v for v in values if not 1 <= v <= MAX_MEMBERS]
    if bad or not values:
        raise SystemExit(f"{flag}: each between 1 and {MAX_MEMBERS}, got {text!r}")
    return values


def _pairs(text: Optional[str]) -> List[Pair]:
    if text is None:
        return list(PAIRS)
    known = {p.name: p for p in PAIRS}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--pairs: unknown {unknown or 'empty list'}; choose from "
                         f"{', '.join(known)}")
    return [known[n] for n in names]


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on the device and on ``--small``."""
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    def pick(value: Optional[int], small: int, cpu: int, cuda: int) -> int:
        return value if value is not None else small if args.small else cuda if gpu else cpu

    return Settings(
        device=args.device, pairs=_pairs(args.pairs),
        ks=_ints(args.ks or "1,2,4,8", "--ks"),
        epochs=args.epochs,
        batch_size=pick(args.batch_size, 8, 64, 64),
        train_images=pick(args.train_images, 8, 640, 10_000),
        val_images=pick(args.val_images, 8, 200, 2_000),
        threads=args.threads or os.cpu_count() or 1, mix=args.mix,
        forward_reps=2 if args.small else 50 if gpu else 10)


def study(pair: Pair, s: Settings) -> Dict[str, Any]:
    """The study whose jobs are measured: ``pair`` on synthetic CIFAR-100-shaped data, every
    method of ``s.members`` with its variants as ablations, one seed, a 1-epoch teacher."""
    recipe = {"epochs": s.epochs, "batch_size": s.batch_size, "lr_milestones": [],
              "checkpoint_every_steps": 10 ** 9, "device": s.device}
    methods: Dict[str, Dict[str, Any]] = {m.method: {} for m in s.members}
    if "crd" in methods:
        methods["crd"] = {"num_negatives": s.crd_negatives}
    ablations: Dict[str, Dict[str, List[Any]]] = {}
    for m in s.members:
        for key, value in m.ablated:
            ablations.setdefault(m.method, {}).setdefault(key, []).append(value)
    return {
        "name": "bench_pack",
        "datasets": {"synthetic": {"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE,
                                   "num_train": s.train_images, "num_val": s.val_images}},
        "pairs": [{"teacher": pair.teacher, "student": pair.student}],
        "seeds": [0], "teacher_seed": 0,
        "teacher_recipe": {**recipe, "epochs": TEACHER_EPOCHS},
        "student_recipe": recipe,
        "methods": methods, "ablations": ablations,
    }


def plan(pair: Pair, s: Settings) -> Tuple[JobSpec, List[JobSpec]]:
    """The pair's teacher job and the jobs of ``s.members``, in that order; they share one
    ``pack_key``."""
    graph = expand_study(study(pair, s))
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    members = [next(j for j in graph.jobs if m.matches(j)) for m in s.members]
    keys = {pack_key(j) for j in members}
    if len(keys) != 1 or None in keys:
        raise RuntimeError(f"{pair.name}: the members do not form one pack ({len(keys)} keys)")
    return teacher, members


def store_with_teacher(root: Path, teacher: JobSpec, trained: JobStore) -> JobStore:
    """A fresh job store at ``root`` holding a copy of the ``trained`` store's teacher job."""
    store = JobStore(root)
    store.add(teacher)
    shutil.copytree(trained.job_dir(teacher.job_id), store.job_dir(teacher.job_id),
                    dirs_exist_ok=True)
    return store


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_sequential(jobs: List[JobSpec], store: JobStore,
                     options: RunOptions) -> Tuple[float, Dict[str, Dict[str, Any]]]:
    """Wall seconds of ``jobs`` run one after another, and their results by job id."""
    start = time.perf_counter()
    results = {job.job_id: run_job(job, store, options) for job in jobs}
    return time.perf_counter() - start, results


def timed_pack(jobs: List[JobSpec], store: JobStore,
               options: RunOptions) -> Tuple[float, Dict[str, Dict[str, Any]]]:
    """Wall seconds of ``jobs`` run as one pack, and their results by job id; a member that
    failed raises its error."""
    start = time.perf_counter()
    ends = run_pack(jobs, store, options)
    wall = time.perf_counter() - start
    for outcome in ends.values():
        if isinstance(outcome, BaseException):
            raise outcome
    return wall, ends


def compare(sequential: Dict[str, Dict[str, Any]],
            packed: Dict[str, Dict[str, Any]]) -> Tuple[bool, float]:
    """(every job's metrics and history equal in both, the largest absolute difference of a
    final metric)."""
    equal, diff = True, 0.0
    for job_id, alone in sequential.items():
        other = packed[job_id]
        equal &= alone["metrics"] == other["metrics"] and alone["history"] == other["history"]
        diff = max([diff, *(abs(v - other["metrics"][k]) for k, v in alone["metrics"].items())])
    return equal, diff


def teacher_forward_ms(pair: Pair, s: Settings, device: torch.device) -> float:
    """Milliseconds of one teacher forward on a batch of (batch_size, 3, 32, 32) random
    images, in eval mode under ``inference_mode`` (mean of ``forward_reps`` after 2)."""
    model = build_model(pair.teacher, NUM_CLASSES).to(device).eval()
    x = torch.randn(s.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(s.forward_reps):
            model(x)
        sync(device)
    return 1000 * (time.perf_counter() - start) / s.forward_reps


def measure_pair(pair: Pair, s: Settings, work: Path,
                 options: RunOptions) -> Tuple[List[Row], PairTiming]:
    """Train the pair's teacher once, then per K time the first K members run one after
    another and as one pack, each in a fresh store holding the teacher."""
    teacher, members = plan(pair, s)
    trained = JobStore(work / "teacher")
    start = time.perf_counter()
    run_job(teacher, trained, options)
    teacher_s = time.perf_counter() - start
    rows: List[Row] = []
    for k in s.ks:
        jobs = members[:k]
        seq_s, alone = timed_sequential(jobs, store_with_teacher(work / f"seq-{k}", teacher,
                                                                 trained), options)
        pack_s, packed = timed_pack(jobs, store_with_teacher(work / f"pack-{k}", teacher,
                                                             trained), options)
        equal, diff = compare(alone, packed)
        images = k * s.epochs * s.train_images
        rows.append(Row(pair=pair.name, k=k, members=[m.label for m in s.members[:k]],
                        images=images, sequential_s=seq_s, packed_s=pack_s,
                        speedup=seq_s / pack_s, sequential_images_per_s=images / seq_s,
                        packed_images_per_s=images / pack_s, equal=equal,
                        max_metric_diff=diff))
        print(f"  {pair.name} K={k}: sequential {seq_s:.1f} s, packed {pack_s:.1f} s, "
              f"{'equal' if equal else 'DIFFERENT'}", file=sys.stderr, flush=True)
    forward_ms = teacher_forward_ms(pair, s, torch.device(s.device))
    solo = next((r for r in rows if r.k == 1), None)
    share = (forward_ms / 1000 / (solo.sequential_s / (s.epochs * s.steps_per_epoch))
             if solo else None)
    timing = PairTiming(pair=pair.name, teacher_s=teacher_s,
                        teacher_images_per_s=TEACHER_EPOCHS * s.train_images / teacher_s,
                        teacher_forward_ms=forward_ms, teacher_forward_share=share)
    return rows, timing


def projection(rows: List[Row], timing: PairTiming) -> Dict[str, Any]:
    """Projected device-hours of a ``STUDY_EPOCHS``-epoch study of ``STUDY_METHODS`` methods x
    ``STUDY_SEEDS`` seeds on ``STUDY_IMAGES`` images for one pair: its teacher (at the measured
    teacher images/s) plus every student job, packed (at the largest K's packed images/s) and
    sequential (at K = 1's sequential images/s, else the smallest K's)."""
    mine = sorted((r for r in rows if r.pair == timing.pair), key=lambda r: r.k)
    jobs = STUDY_METHODS * STUDY_SEEDS
    student_images = jobs * STUDY_EPOCHS * STUDY_IMAGES
    teacher_h = STUDY_EPOCHS * STUDY_IMAGES / timing.teacher_images_per_s / 3600
    largest, smallest = mine[-1], mine[0]
    return {
        "pair": timing.pair, "jobs": jobs, "epochs": STUDY_EPOCHS, "images": STUDY_IMAGES,
        "teacher_h": teacher_h, "packed_k": largest.k,
        "packed_h": teacher_h + student_images / largest.packed_images_per_s / 3600,
        "sequential_h": teacher_h + student_images / smallest.sequential_images_per_s / 3600,
    }


def target(rows: List[Row]) -> Dict[str, Any]:
    """The issue's target per pair: K = ``TARGET_K`` packed >= ``TARGET_SPEEDUP`` x sequential
    (None where K = ``TARGET_K`` was not measured)."""
    out: Dict[str, Any] = {}
    for r in rows:
        if r.k == TARGET_K:
            out[r.pair] = {"speedup": r.speedup, "met": r.speedup >= TARGET_SPEEDUP}
    return out


def default_out(device: torch.device, day: str) -> Path:
    """GPU: pack-<gpu-slug>-<date>.json; CPU: pack-cpu-<date>.cpu.json (git-ignored)."""
    if device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return RESULTS_DIR / f"pack-{slug}-{day}.json"
    return RESULTS_DIR / f"pack-cpu-{day}.cpu.json"


def markdown(rows: List[Row], timings: List[PairTiming], projections: List[Dict[str, Any]],
             goal: Dict[str, Any], s: Settings, device: str) -> str:
    """The tables and lines printed and written next to the JSON."""
    lines = [f"device: {device}; torch {torch.__version__}; {s.threads} torch threads in every "
             f"run; {s.epochs} epoch(s) of {s.train_images:,} synthetic 32x32 images, 100 "
             f"classes, batch {s.batch_size}, {s.val_images:,} validation images; CRD "
             f"negatives {s.crd_negatives:,}", "",
             "| pair | K | sequential s | packed s | speedup | sequential images/s | "
             "packed images/s | packed = sequential |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.pair} | {r.k} | {r.sequential_s:.1f} | {r.packed_s:.1f} | "
                     f"{r.speedup:.2f} | {r.sequential_images_per_s:,.0f} | "
                     f"{r.packed_images_per_s:,.0f} | "
                     f"{'yes' if r.equal else f'NO (max diff {r.max_metric_diff:.3g})'} |")
    lines += ["", "members, in order: " + ", ".join(m.label for m in s.members), "",
              "| pair | teacher job s | teacher fwd ms/batch | share of a solo KD job's s/step |",
              "|---|---:|---:|---:|"]
    for t in timings:
        share = "-" if t.teacher_forward_share is None else f"{t.teacher_forward_share:.0%}"
        lines.append(f"| {t.pair} | {t.teacher_s:.1f} | {t.teacher_forward_ms:.1f} | {share} |")
    lines.append("")
    for pair, g in goal.items():
        lines.append(f"target K = {TARGET_K} >= {TARGET_SPEEDUP:.0f}x sequential, {pair}: "
                     f"{g['speedup']:.2f}x, {'met' if g['met'] else 'NOT met'}")
    if not goal:
        lines.append(f"target K = {TARGET_K} >= {TARGET_SPEEDUP:.0f}x: K = {TARGET_K} not "
                     "measured")
    lines.append(f"results of packed and sequential runs equal: "
                 f"{'yes' if all(r.equal for r in rows) else 'NO'}")
    lines.append("")
    unit = "GPU-hours" if s.device == "cuda" else f"hours of these {s.threads} CPU threads"
    for p in projections:
        lines.append(f"projected from this run's throughput: a {p['epochs']}-epoch CIFAR-100 "
                     f"study of {STUDY_METHODS} methods x {STUDY_SEEDS} seeds, {p['pair']}: "
                     f"{p['packed_h']:,.1f} {unit} packed (every student job at K = "
                     f"{p['packed_k']}'s packed images/s) against {p['sequential_h']:,.1f} "
                     f"sequential (teacher {p['teacher_h']:,.1f} h in both)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    s = resolve_settings(args)
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"--work: {args.work} is not empty (finished jobs would not run again)")
    work = args.work or Path(tempfile.mkdtemp(prefix="kdflow-bench-pack-"))
    try:
        return run(args, s, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, s: Settings, work: Path) -> int:
    """Measure every pair and K, print the tables, the target and the projection, and write
    the JSON record and the markdown copy."""
    device = torch.device(s.device)
    options = RunOptions(progress=False, threads=s.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: List[Row] = []
    timings: List[PairTiming] = []
    for i, pair in enumerate(s.pairs):
        pair_rows, timing = measure_pair(pair, s, work / f"pair-{i}", options)
        rows += pair_rows
        timings.append(timing)
    projections = [projection(rows, t) for t in timings]
    goal = target(rows)
    now = datetime.now().astimezone()
    out = args.out or default_out(device, now.date().isoformat())
    name = device_name(device)
    record = {
        "benchmark": "pack",
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": now.isoformat(timespec="seconds"),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "settings": {**asdict(s), "pairs": [p.name for p in s.pairs],
                     "crd_negatives": s.crd_negatives},
        "members": [m.label for m in s.members],
        "rows": [asdict(r) for r in rows],
        "pairs": [asdict(t) for t in timings],
        "equal": all(r.equal for r in rows),
        "target": goal,
        "projection": projections,
    }
    table = markdown(rows, timings, projections, goal, s, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
