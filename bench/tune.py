"""The overhead of running a job as a Ray Tune trial (``kdflow tune``) instead of directly.

What is measured, on ``study=quick`` (digits, KD resnet14 -> resnet8, ``--epochs`` student
epochs; the teacher is trained first and shared, outside the timings):
1. direct: :func:`orchestrator.runner.run_job` of the KD job (temperature 3.0) in this
   process, one torch thread; wall seconds, and the median seconds of its epochs 2..E-1
   (between consecutive ``on_epoch`` calls).
2. ray.init: starting a local Ray without a dashboard; seconds.
3. tune: ``kdflow tune``'s :func:`launch.tune.run_search` with one trial (temperature 3.5, so a
   different, untrained job; FIFO scheduler, 1 CPU), Ray already started; wall seconds, and the
   trial's median epoch 2..E-1 (Tune's ``time_this_iter_s``, which includes the per-epoch
   ``tune.report`` with its checkpoint).
Start-up = wall - E x median epoch (what a job costs besides its epochs); the per-epoch
reporting overhead is the trial's median epoch minus the direct one.

A markdown table is printed and a JSON record written (``--out``, default
``bench/results/tune-<date>.cpu.json``, git-ignored).

    python bench/tune.py              # 6 epochs, ~1 minute on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kdflow.launch.cli import Session  # noqa: E402
from kdflow.launch.search_space import apply_settings  # noqa: E402
from kdflow.launch.tune import _init_ray, _train_teacher, plan_search, run_search  # noqa: E402
from kdflow.orchestrator.runner import RunOptions, run_job  # noqa: E402
from kdflow.orchestrator.store import JobStore  # noqa: E402


def overrides(output_dir: Path, epochs: int) -> List[str]:
    """One KD trial (temperature 3.5) of ``study=quick`` with ``epochs`` student epochs."""
    return ["+search=kd", "study=quick", f"study.student_recipe.epochs={epochs}",
            f"study.student_recipe.lr_milestones=[{epochs}]", "progress=false",
            "search.scheduler=fifo", "search.num_samples=1",
            "~search.space.method", "+search.space.method.temperature={type:choice,values:[3.5]}",
            f"output_dir={output_dir}"]


def middle_median(times: List[float]) -> float:
    """Median of the epoch times without the first and last epoch; seconds."""
    return statistics.median(times[1:-1])


def time_direct(plan: Any) -> Dict[str, float]:
    """Wall and median epoch seconds of the KD job (temperature 3.0) run here with run_job."""
    spec = apply_settings(plan.base, {"method.temperature": 3.0})
    stamps: List[float] = []
    started = time.perf_counter()
    run_job(spec, JobStore(Path(plan.output_dir) / "jobs"),
            RunOptions(progress=False, on_epoch=lambda _i, _m: stamps.append(time.perf_counter())))
    wall = time.perf_counter() - started
    epochs = [b - a for a, b in zip([started, *stamps], stamps)]
    return {"wall_s": wall, "epoch_s": middle_median(epochs)}


def time_tune(plan: Any) -> Dict[str, float]:
    """Wall seconds of ``run_search`` (one trial) and the trial's median epoch seconds."""
    from ray.tune import ExperimentAnalysis

    started = time.perf_counter()
    code = run_search(plan)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the search failed (exit {code})")
    (frame,) = ExperimentAnalysis(str(plan.tune_path)).trial_dataframes.values()
    return {"wall_s": wall, "epoch_s": middle_median(list(frame["time_this_iter_s"])),
            "trial_s": float(frame["time_total_s"].iloc[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="student epochs (>= 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        f"tune-{datetime.now():%Y-%m-%d}.cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a 1-CPU Ray trial (OMP_NUM_THREADS=1)
    with tempfile.TemporaryDirectory() as folder:
        plan = plan_search(Session.compose(overrides(Path(folder), args.epochs)))
        _train_teacher(plan)
        direct = time_direct(plan)
        started = time.perf_counter()
        _init_ray(None)
        ray_init = time.perf_counter() - started
        tuned = time_tune(plan)
    epochs = args.epochs
    record = {
        "date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "cpus": torch.get_num_threads(), "epochs": epochs,
        "direct": direct, "ray_init_s": ray_init, "tune": tuned,
        "startup_direct_s": direct["wall_s"] - epochs * direct["epoch_s"],
        "startup_tune_s": tuned["wall_s"] - epochs * tuned["epoch_s"],
        "report_overhead_per_epoch_s": tuned["epoch_s"] - direct["epoch_s"],
    }
    print(f"| | direct run_job | Tune trial |\n|---|---|---|\n"
          f"| wall, {epochs} epochs (s) | {direct['wall_s']:.2f} | {tuned['wall_s']:.2f} "
          f"(+ ray.init {ray_init:.2f}) |\n"
          f"| median epoch (s) | {direct['epoch_s']:.3f} | {tuned['epoch_s']:.3f} |\n"
          f"| start-up = wall - {epochs} x epoch (s) | {record['startup_direct_s']:.2f} | "
          f"{record['startup_tune_s']:.2f} |\n"
          f"| per-epoch reporting overhead (s) | | {record['report_overhead_per_epoch_s']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
