"""Real-data GPU check: He et al. (2016)'s CIFAR-10 recipe and a KD student on real images.

Runs the study ``cifar10_he2016`` (``configs/study/cifar10_he2016.yaml``, recipe
``configs/recipe/he2016.yaml``) through ``kdflow run``, the command users run, on the real
CIFAR-10 images of :mod:`bench.real_data` (the 60,000-image JPEG archive, quality 75, built into
torchvision's pickled layout), then prints a table (model, method, recipe, epochs, top-1, He et
al.'s number, wall time, device) and writes it as JSON into ``bench/results/``:
``real-cifar-<gpu>[-<label>]-<date>.json`` on a GPU (commit these),
``real-cifar-cpu[-<label>]-<date>.cpu.json`` on the CPU (ignored by git).

Three jobs: the ResNet-56 teacher, the ResNet-20 alone, the ResNet-20 with Hinton KD from the
ResNet-56 (T=4, 0.1 CE + 0.9 KD; configs/method/kd.yaml). The recipe is the paper's (Sec. 4.2):
SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations,
stop at 64k: with kdflow's 391 steps per epoch (the last partial batch kept), 164 epochs with
milestones [82, 123]. ``--epochs E`` runs the schedule scaled to E epochs (milestones at the same
fractions, 1/2 and 3/4, of the run); the table says which.

What differs from the paper (the paper's ResNet-20 reaches 91.25 % top-1, ResNet-56 93.03 %,
on the original PNG-quality images; these JPEGs at quality 75 run a little lower):

- kdflow's ``resnet20``/``resnet56`` (``methods/models/cifar_resnet.py``) are RepDistiller's:
  He's 6n+2 layout (3x3 stem, three stages of n BasicBlocks at 16/32/64 filters, strides
  1/2/2, global average pooling, linear classifier), but the two stage transitions use a
  projection shortcut (1x1 conv, stride 2, + BatchNorm: the paper's option B) where the
  paper's CIFAR nets use parameter-free identity shortcuts with zero-padded channels (option
  A). 272,474 parameters for ResNet-20 (paper: 0.27M), 855,770 for ResNet-56 (0.85M). Init:
  kaiming-normal (fan_out) convolutions, as the paper's [13].
- Inputs are normalised per channel (CIFAR-10's mean and std), not by subtracting the
  per-pixel mean; the crop pads with black (zeros before normalisation), not with the mean.
- All 50,000 training images are trained on (the paper fixed its schedule on a 45k/5k split);
  top-1 is on the 10,000 test images at the last epoch (``top1_best``, the best epoch, is in
  the JSON too).
- On a GPU the fast path is on: bf16 autocast, channels_last, fused SGD, and with
  ``--compile default`` (the default on CUDA) ``torch.compile`` with CUDA graphs.

Timing. No GPU was lent to the task that wrote this script, so the default size is an
estimate, chosen to fit a 10-minute device run: on an H100 with the fast path, about
1 / 2.5 / 1.5 s per epoch for the ResNet-20 / ResNet-56 / KD jobs, taken 2.5x slower to be safe
(2.5 / 6 / 4 s; the three jobs share one GPU: the teacher and the ResNet-20 alone run side by
side, KD after the teacher), plus about 30 s to build the data cache and 2 x 90 s of
compilation on the critical path. The paper's full 164 epochs (about 164 x 12.5 s = 35 min by
that estimate) do not fit, so the default is ``DEFAULT_EPOCHS`` = 30 epochs, milestones
[15, 23]: 4-5 min at the expected speed; at the safe one (30 x 12.5 + 210 s, ~10 min) the
``--time-limit`` of ``bench/gpu_real.sh`` (450 s) stops the study (its jobs checkpoint) and the
table is still written, unfinished jobs marked with their epochs and last top-1. Each row's
seconds per epoch are in the JSON, to size the next run.

    python bench/real_cifar.py                      # GPU: the default (scaled) schedule
    python bench/real_cifar.py --epochs 164         # the paper's full schedule (~35 min)
    python bench/real_cifar.py --device cpu --cpus 1 --epochs 2 --train-fraction 0.2 \\
        --batch-size 32 --teacher resnet20 --student resnet8 \\
        --archive orchestrator/data/assets/cifar10_sample.tar.xz    # CPU smoke (~1.5 min)

``bench/gpu_real.sh`` is the one command for a lent GPU machine (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import real_data  # noqa: E402

STUDY = "cifar10_he2016"
RESULTS_DIR = REPO / "bench" / "results"
#: He et al. (2016) Table 6, CIFAR-10 test top-1 (%) = 100 - error; ResNet-110: best of 5 runs.
PAPER_TOP1 = {"resnet20": 91.25, "resnet32": 92.49, "resnet44": 92.83, "resnet56": 93.03,
              "resnet110": 93.57}
#: The paper's schedule in kdflow epochs of 391 steps (64k, 32k, 48k iterations at batch 128).
PAPER_EPOCHS, PAPER_MILESTONES = 164, (82, 123)
#: The default run: the schedule scaled to fit one 10-minute GPU run (module docstring).
DEFAULT_EPOCHS = 30


def scaled_milestones(epochs: int) -> List[int]:
    """The paper's milestones at the same fractions (1/2, 3/4) of an ``epochs``-epoch run:
    whole epochs >= 1, increasing (those at or after ``epochs`` are never reached)."""
    first = max(1, math.floor(PAPER_MILESTONES[0] * epochs / PAPER_EPOCHS + 0.5))
    second = max(first + 1, math.floor(PAPER_MILESTONES[1] * epochs / PAPER_EPOCHS + 0.5))
    return [first, second]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"epochs of every job; the milestones scale with it "
                        f"(default {DEFAULT_EPOCHS}; the paper's schedule is {PAPER_EPOCHS})")
    p.add_argument("--teacher", default="resnet56", help="teacher model (default resnet56)")
    p.add_argument("--student", default="resnet20", help="student model (default resnet20)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="share of the training split every job trains on (default 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override the recipe's batch size of 128 (CPU smoke runs)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--compile", choices=("auto", "none", "default", "max-autotune"),
                   default="auto", help="torch.compile of the step, with CUDA graphs on a GPU "
                                        "(auto: default on CUDA, none on the CPU)")
    p.add_argument("--archive", type=Path, default=None,
                   help="the JPEG tar (default: $KDFLOW_CIFAR10_JPG, else ../shared's full "
                        "archive, else the 12,000-image sample kdflow ships)")
    p.add_argument("--cpus", type=int, default=None,
                   help="run kdflow on this many of the allowed cores (its jobs' threads and "
                        "workers follow); default all")
    p.add_argument("--workers", type=int, default=None, help="kdflow's launcher.workers")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="kdflow's output_dir (default: a new folder under the temp dir); "
                        "finished jobs found there are not run again")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which the study is stopped (SIGTERM: jobs checkpoint) "
                        "and the table written with what finished")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/real-cifar-<device>[-<label>]-"
                        "<date>.json, .cpu.json on the CPU)")
    p.add_argument("--label", default="", help="a word for the default JSON name")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    return args


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def recipe_text(epochs: int, milestones: Sequence[int], batch_size: Optional[int]) -> str:
    """How the run's schedule relates to the paper's, for the table."""
    batch = f", batch {batch_size} (paper: 128)" if batch_size not in (None, 128) else ""
    if epochs == PAPER_EPOCHS:
        return f"He et al. 2016, full: {epochs} ep, lr 0.1 /10 at {list(milestones)}{batch}"
    return (f"He et al. 2016 scaled x{epochs / PAPER_EPOCHS:.2f}: {epochs} of {PAPER_EPOCHS} ep, "
            f"lr 0.1 /10 at {list(milestones)}{batch}")


def kdflow_command(args: argparse.Namespace, device: str, data_root: Path,
                   output_dir: Path) -> List[str]:
    """``kdflow run study=cifar10_he2016 ...`` with this run's overrides."""
    milestones = scaled_milestones(args.epochs)
    compile_mode = args.compile if args.compile != "auto" else (
        "default" if device == "cuda" else "none")
    cmd = [sys.executable, "-m", "kdflow.launch.cli", "run", f"study={STUDY}", f"data.root={data_root}",
           f"output_dir={output_dir}", "progress=false",
           f"study.pairs=[{{teacher: {args.teacher}, student: {args.student}}}]"]
    if args.train_fraction != 1.0:
        cmd.append(f"+study.datasets.cifar10.train_fraction={args.train_fraction}")
    if args.workers is not None:
        cmd.append(f"launcher.workers={args.workers}")
    for recipe in ("teacher_recipe", "student_recipe"):
        r = f"study.{recipe}"
        cmd += [f"{r}.epochs={args.epochs}",
                f"{r}.lr_milestones=[{','.join(map(str, milestones))}]", f"{r}.device={device}"]
        if args.batch_size is not None:
            cmd.append(f"{r}.batch_size={args.batch_size}")
        if compile_mode != "none":
            cmd.append(f"{r}.compile={compile_mode}")
            if device == "cuda":
                cmd.append(f"{r}.cuda_graphs=true")
    return cmd


def run_kdflow(cmd: List[str], cpus: Optional[int], time_limit: Optional[float]) -> Dict[str, Any]:
    """Run the study; its output goes to this process's stdout. Returns exit code, seconds and
    whether the time limit stopped it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cores = sorted(os.sched_getaffinity(0))[:cpus] if cpus else None

    def preexec() -> None:
        os.setsid()  # its own process group: a stop reaches the local launcher's workers too
        if cores:
            os.sched_setaffinity(0, cores)

    print("$ " + shlex.join(["python"] + cmd[1:]), flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, preexec_fn=preexec)
    stopped = False
    try:
        code = proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        stopped = True
        print(f"real_cifar: time limit of {time_limit:.0f} s reached; stopping the study "
              "(its jobs checkpoint)", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    return {"exit_code": code, "seconds": time.time() - started, "stopped_at_limit": stopped}


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


METHOD_ORDER = {"teacher": 0, "vanilla": 1, "kd": 2}


def collect_rows(output_dir: Path, recipe: str, epochs: int) -> List[Dict[str, Any]]:
    """One row per job of the study's store: finished jobs from ``result.json``, others from
    ``state.json`` (status, epochs done, last top-1)."""
    rows = []
    for job in sorted((output_dir / "jobs").glob("*/")):
        spec = read_json(job / "spec.json") or {}
        result = read_json(job / "result.json")
        state = read_json(job / "state.json") or {}
        teacher_stage = spec.get("stage") == "teacher"
        method = "teacher" if teacher_stage else spec.get("method", "?")
        model = spec.get("model", "?")
        row: Dict[str, Any] = {
            "job_id": spec.get("job_id", job.name), "model": model,
            "method": {"teacher": "alone (the KD teacher)", "vanilla": "alone",
                       "kd": f"Hinton KD from {spec.get('teacher')} (T=4)"}.get(method, method),
            "recipe": recipe, "epochs_planned": epochs,
            "paper_top1": PAPER_TOP1.get(model), "_order": METHOD_ORDER.get(method, 9)}
        if result is not None:
            history = result.get("history", [])
            wall = float(result["wall_time_s"])
            row.update(status="done", epochs=result["epochs"], top1=result["metrics"]["top1"],
                       top1_best=result["metrics"].get("top1_best"),
                       top5=result["metrics"].get("top5"), wall_time_s=wall,
                       s_per_epoch=wall / max(1, len(history)),
                       device=result.get("provenance", {}).get("device"),
                       fast_path=result.get("fast_path"), threads=result.get("threads"))
        else:
            row.update(status=state.get("status", "pending"), epochs=state.get("epoch", 0),
                       top1=state.get("last_metric"), top1_best=None, top5=None,
                       wall_time_s=None, s_per_epoch=None, device=None, fast_path=None,
                       threads=None)
        rows.append(row)
    rows.sort(key=lambda r: (r["_order"], r["model"]))
    for r in rows:
        del r["_order"]
    return rows


def device_name(rows: List[Dict[str, Any]], device: str) -> str:
    """The device the jobs recorded (provenance), else what this process sees."""
    for r in rows:
        if r["device"]:
            return r["device"]
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def default_out(device: str, name: str, day: str, label: str = "") -> Path:
    """GPU: real-cifar-<gpu-slug>[-<label>]-<date>.json; CPU: real-cifar-cpu[-<label>]-<date>
    .cpu.json (git-ignored)."""
    tag = f"-{label}" if label else ""
    if device == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return RESULTS_DIR / f"real-cifar-{slug}{tag}-{day}.json"
    return RESULTS_DIR / f"real-cifar-cpu{tag}-{day}.cpu.json"


def markdown_table(rows: List[Dict[str, Any]], device: str) -> str:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    lines = ["| model | method | recipe | epochs | top-1 (%) | He et al. 2016, alone (%) | "
             "wall time (s) | s/epoch | device |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        epochs = (str(r["epochs"]) if r["status"] == "done"
                  else f"{r['epochs']}/{r['epochs_planned']} ({r['status']})")
        lines.append(f"| {r['model']} | {r['method']} | {r['recipe']} | {epochs} | "
                     f"{num(r['top1'], '.2f')} | {num(r['paper_top1'], '.2f')} | "
                     f"{num(r['wall_time_s'], '.0f')} | {num(r['s_per_epoch'], '.2f')} | "
                     f"{r['device'] or device} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    archive = (args.archive or real_data.source_archive()).resolve()
    if not archive.is_file():
        print(f"real_cifar: no archive at {archive} (set KDFLOW_CIFAR10_JPG or --archive)",
              file=sys.stderr)
        return 2
    print(f"real_cifar: building the data cache from {archive}", flush=True)
    t = time.time()
    data_root = real_data.build(archive)
    data_seconds = time.time() - t
    print(f"real_cifar: data in {data_root} ({data_seconds:.0f} s)", flush=True)
    output_dir = (args.output_dir or Path(tempfile.mkdtemp(prefix="kdflow-real-cifar-"))).resolve()
    cmd = kdflow_command(args, device, data_root, output_dir)
    run = run_kdflow(cmd, args.cpus, args.time_limit)
    milestones = scaled_milestones(args.epochs)
    recipe = recipe_text(args.epochs, milestones, args.batch_size)
    rows = collect_rows(output_dir, recipe, args.epochs)
    name = device_name(rows, device)
    day = datetime.now().strftime("%Y-%m-%d")
    out = args.out or default_out(device, name, day, args.label)
    table = markdown_table(rows, name)
    record = {
        "bench": "real_cifar", "date": day, "study": STUDY, "device": device,
        "device_name": name,
        "archive": {"path": str(archive), "full": real_data.is_full_archive(archive),
                    "sha256": real_data.sha256_of(archive)},
        "settings": {"epochs": args.epochs, "lr_milestones": milestones,
                     "paper_epochs": PAPER_EPOCHS, "paper_milestones": list(PAPER_MILESTONES),
                     "teacher": args.teacher, "student": args.student,
                     "train_fraction": args.train_fraction, "batch_size": args.batch_size or 128,
                     "compile": args.compile, "cpus": args.cpus, "workers": args.workers,
                     "time_limit_s": args.time_limit},
        "command": shlex.join(["kdflow"] + cmd[3:]), "output_dir": str(output_dir),
        "kdflow_exit_code": run["exit_code"], "stopped_at_time_limit": run["stopped_at_limit"],
        "data_build_s": data_seconds, "study_s": run["seconds"],
        "total_s": time.time() - started,
        "python": platform.python_version(), "rows": rows, "table": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print()
    print(f"Real CIFAR-10 ({'full archive' if record['archive']['full'] else 'shipped sample'}"
          f", {archive.name}), study {STUDY}, {name}: total {record['total_s']:.0f} s "
          f"(data {data_seconds:.0f} s, study {run['seconds']:.0f} s)")
    print()
    print(table)
    print()
    print(f"wrote {out}")
    done = all(r["status"] == "done" for r in rows) and len(rows) == 3
    return 0 if run["exit_code"] == 0 and done else 1


if __name__ == "__main__":
    sys.exit(main())
