"""How fast kdflow plans a 1,000-job study, shows its status and submits it to SLURM, and how
many scheduler calls that takes.

What is measured:
1. plan: composing ``study=cifar100_benchmark`` with enough seeds for >= ``--jobs`` jobs and
   expanding it into a validated job graph (every pair probed on the dataset's input shape, every
   method's settings checked), with ``require_data=False`` (no CIFAR files needed); seconds,
   cold (the probes of earlier runs forgotten), ``--repeat`` times. Target: :data:`PLAN_TARGET_S`.
   status: ``kdflow status`` of that study (``launch.cli.main`` in this process, its table
   discarded) over a fresh output folder; seconds, ``--repeat`` times. Target:
   :data:`STATUS_TARGET_S`. Each also reports the CPU seconds of this process (all its threads),
   which other users' load does not inflate. Both exclude the interpreter's start and imports
   (``bench/startup.py`` measures the command line's). With ``--busy N``, N processes that
   spin on a core each run while plan and status are timed (default: one per core), as on a
   shared machine; ``--busy 0`` times an idle machine. ``--plan-only`` stops here (no SLURM).
2. submit: ``launch.slurm.submit_study`` of the whole graph to the running cluster (SLURM_CONF),
   from a fresh output folder: seconds and scheduler calls. Calls are counted by shims put first
   on PATH for sbatch / squeue / sacct / scancel, which log and exec the real commands, so
   submitit's own calls count too. The jobs exit at once: the interpreter the jobs start is
   ``true`` (``launcher.python``), so each array task runs ``true -u -m submitit...``.
   The arrays are submitted held (``--hold``), so that
3. re-run: ``submit_study`` again sees every job still queued: nothing is submitted; seconds, calls.
4. drain (unless ``--no-drain``): the arrays are released (``scontrol release``) and timed until
   the cluster has run every job (they exit at once, so this is the scheduler's own throughput,
   including the afterok chains).

A markdown table is printed and a JSON record written (``--out``, default
``bench/results/orchestrate-<date>.json``).

    scripts/slurm-dev-cluster.sh start && export "$(scripts/slurm-dev-cluster.sh env)"
    python bench/orchestrate.py                 # ~1,000 jobs
    python bench/orchestrate.py --jobs 100      # a quick run
    python bench/orchestrate.py --plan-only     # plan and status only, no cluster needed
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdflow.launch.cli import main as kdflow_main  # noqa: E402
from kdflow.launch.compose import compose_config  # noqa: E402
from kdflow.launch.slurm import submit_study  # noqa: E402
from kdflow.launch.slurm_config import parse_slurm_settings  # noqa: E402
from kdflow.launch.slurm_queue import SlurmQueue  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from kdflow.orchestrator.runner import RunOptions  # noqa: E402
from kdflow.orchestrator.study import JobGraph, _model_taps, expand_study  # noqa: E402

SHIMMED = ("sbatch", "squeue", "sacct", "scancel")
#: Planning a 1,000-job study must take less than this on 2 busy cores; seconds.
PLAN_TARGET_S = 2.0
#: ``kdflow status`` of that study must take less than this on 2 busy cores; seconds.
STATUS_TARGET_S = 2.0
#: A process that keeps one core busy until it is killed.
BURNER = "while True: pass"


def install_shims(folder: Path, log: Path) -> None:
    """Put logging wrappers of SLURM's client commands in ``folder`` and first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHIMMED:
        real = shutil.which(name)
        if real is None:
            sys.exit(f"{name} not found: start a cluster first (scripts/slurm-dev-cluster.sh start)")
        shim = folder / name
        shim.write_text(f'#!/bin/sh\necho {name} >> "{log}"\nexec "{real}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"


def calls_since(log: Path, start: int) -> Dict[str, int]:
    lines = log.read_text().split() if log.exists() else []
    return dict(Counter(lines[start:]))


def call_count(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def study_overrides(seeds: int) -> List[str]:
    """The benchmark study's overrides with seeds 0..``seeds``-1."""
    return ["study=cifar100_benchmark", f"study.seeds=[{','.join(map(str, range(seeds)))}]"]


def plan_once(seeds: int) -> Tuple[JobGraph, float, float]:
    """A cold plan of the benchmark study with ``seeds`` seeds; (graph, wall seconds, CPU
    seconds)."""
    _model_taps.cache_clear()  # time a cold plan: every model probed afresh
    started, cpu = time.perf_counter(), time.process_time()
    cfg = compose_config(study_overrides(seeds))
    graph = expand_study(OmegaConf.to_container(cfg.study, resolve=True), require_data=False)
    return graph, time.perf_counter() - started, time.process_time() - cpu


def plan(jobs: int) -> tuple:
    """The benchmark study with enough seeds for ``jobs`` jobs; (graph, seconds, seeds)."""
    seeds = 1
    while True:
        graph, seconds, _ = plan_once(seeds)
        if len(graph.jobs) >= jobs:
            return graph, seconds, seeds
        per_seed = max(1, (len(graph.jobs) - 9) // seeds)
        seeds = max(seeds + 1, -(-(jobs - 9) // per_seed))


def time_status(seeds: int, output_dir: Path) -> Tuple[float, float]:
    """Wall and CPU seconds of ``kdflow status`` of the benchmark study over ``output_dir``
    (its table discarded); the datasets' files need not exist."""
    argv = ["status", *study_overrides(seeds), f"output_dir={output_dir}",
            f"data.root={output_dir / 'no-data'}"]
    started, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        code = kdflow_main(argv)
    timings = time.perf_counter() - started, time.process_time() - cpu
    if code != 0:
        raise SystemExit(f"kdflow status exited {code}")
    return timings


@contextlib.contextmanager
def busy(burners: int) -> Iterator[None]:
    """Run the body while ``burners`` processes each keep a core busy."""
    procs = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(burners)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def time_plan_and_status(seeds: int, repeat: int, burners: int, work: Path) -> Dict[str, Any]:
    """Cold plan and status seconds of the benchmark study, ``repeat`` times each, with
    ``burners`` busy processes running; the record's ``plan``/``status`` part."""
    with busy(burners):
        plans = [plan_once(seeds)[1:] for _ in range(repeat)]
        statuses = [time_status(seeds, work / "status") for _ in range(repeat)]
        load = os.getloadavg()[0]
    plans, plan_cpu = [wall for wall, _ in plans], [cpu for _, cpu in plans]
    statuses, status_cpu = [wall for wall, _ in statuses], [cpu for _, cpu in statuses]
    return {"burners": burners, "load_avg": load, "plan_runs_s": plans,
            "status_runs_s": statuses, "plan_cpu_runs_s": plan_cpu,
            "status_cpu_runs_s": status_cpu, "plan_median_s": statistics.median(plans),
            "status_median_s": statistics.median(statuses),
            "plan_target_s": PLAN_TARGET_S, "status_target_s": STATUS_TARGET_S,
            "plan_met": statistics.median(plans) < PLAN_TARGET_S,
            "status_met": statistics.median(statuses) < STATUS_TARGET_S}


def print_targets(jobs: int, timed: Dict[str, Any]) -> None:
    """The plan and status table: median and worst seconds against the targets."""
    print(f"{jobs} jobs; {timed['burners']} busy processes, load average "
          f"{timed['load_avg']:.1f} on {os.cpu_count()} cores; {len(timed['plan_runs_s'])} runs")
    print("| step | median s | worst s | median CPU s | target s | met |\n"
          "|---|---:|---:|---:|---:|---|")
    for step in ("plan", "status"):
        runs, cpu = timed[f"{step}_runs_s"], timed[f"{step}_cpu_runs_s"]
        print(f"| {step} | {statistics.median(runs):.2f} | {max(runs):.2f} | "
              f"{statistics.median(cpu):.2f} | {timed[f'{step}_target_s']:.1f} | "
              f"{'yes' if timed[f'{step}_met'] else 'NO'} |")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="at least this many jobs")
    parser.add_argument("--no-drain", action="store_true", help="cancel instead of waiting")
    parser.add_argument("--drain-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the plan and status timings")
    parser.add_argument("--busy", type=int, default=os.cpu_count(),
                        help="processes keeping a core busy while plan and status are timed")
    parser.add_argument("--plan-only", action="store_true",
                        help="time plan and status only (no SLURM cluster needed)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-orchestrate-"))
    graph, plan_s, seeds = plan(args.jobs)
    timed = time_plan_and_status(seeds, args.repeat, args.busy, work)
    print_targets(len(graph.jobs), timed)
    if args.plan_only:
        record = {"benchmark": "orchestrate", "date": datetime.now().isoformat(timespec="seconds"),
                  "host": platform.node(), "cpus": os.cpu_count(), "study": "cifar100_benchmark",
                  "seeds": seeds, "jobs": len(graph.jobs), **timed}
        write_record(record, args.out, ".cpu")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    log = work / "calls.log"
    install_shims(work / "shims", log)
    launcher = OmegaConf.to_container(compose_config(["launcher=slurm_dev"]).launcher, resolve=True)
    # held at submission, so that the re-run below sees every job still queued; released after
    launcher["resources"]["additional"] = {"hold": True}
    settings = parse_slurm_settings({**launcher, "python": "true", "array_parallelism": 1000})
    options = RunOptions(progress=False)
    output_dir = str(work / "outputs")

    before = call_count(log)
    submission = submit_study(graph, output_dir, options, settings)
    submit_calls = calls_since(log, before)
    queue = SlurmQueue()
    ids = {job_id.split("_")[0] for job_id in (a.scheduler_id for a in submission.arrays)}
    try:
        before = call_count(log)
        rerun = submit_study(graph, output_dir, options, settings)
        rerun_calls = calls_since(log, before)
        assert rerun.submitted == 0, "a re-run while queued must submit nothing"
    except BaseException:
        queue.cancel(sorted(ids))
        raise
    drain_s = None
    if args.no_drain:
        queue.cancel(sorted(ids))
    else:
        started = time.perf_counter()
        subprocess.run(["scontrol", "release", ",".join(sorted(ids))], check=True)
        deadline = started + args.drain_timeout
        while any(sid.split("_")[0] in ids for sid in queue.live()):
            if time.perf_counter() > deadline:
                queue.cancel(sorted(ids))
                break
            time.sleep(1)
        else:
            drain_s = time.perf_counter() - started

    record: Dict[str, Any] = {
        "benchmark": "orchestrate", "date": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(),
        "slurm": subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip(),
        "study": "cifar100_benchmark", "seeds": seeds, "jobs": len(graph.jobs),
        "stages": dict(Counter(job.stage for job in graph.jobs)),
        "plan_s": plan_s, "submit_s": submission.seconds, "arrays": len(submission.arrays),
        "submit_calls": submit_calls, "rerun_s": rerun.seconds, "rerun_calls": rerun_calls,
        "drain_s": drain_s, **timed,
    }
    rows = [
        ("plan + validate", f"{len(graph.jobs)} jobs ({seeds} seeds)", f"{plan_s:.2f}", "0"),
        ("submit", f"{submission.submitted} jobs in {len(submission.arrays)} arrays",
         f"{submission.seconds:.2f}", _calls(submit_calls)),
        ("re-run while queued", f"{rerun.submitted} submitted", f"{rerun.seconds:.2f}", _calls(rerun_calls)),
        ("drain (jobs exit at once)", "all ended" if drain_s is not None else "cancelled",
         "-" if drain_s is None else f"{drain_s:.1f}", "-"),
    ]
    print("| step | what | seconds | scheduler calls |\n|---|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    write_record(record, args.out, "")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def write_record(record: Dict[str, Any], out: Path | None, suffix: str) -> None:
    """Write ``record`` as JSON to ``out``, default ``bench/results/orchestrate-<date><suffix>
    .json`` (``.cpu`` results are git-ignored)."""
    out = out or REPO / "bench" / "results" / f"orchestrate-{datetime.now():%Y-%m-%d}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"written to {out}")


def _calls(calls: Dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(calls.items())) or "0"


if __name__ == "__main__":
    sys.exit(main())
