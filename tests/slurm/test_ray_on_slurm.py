"""scripts/ray-on-slurm.sh on the dev cluster: a Ray cluster inside a SLURM job runs a study."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.orchestrator.store import JobStore

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]


def run_on_ray_in_slurm(tmp_path: Path, command: str, timeout: float) -> str:
    """``sbatch --wait`` a 1-node, 2-CPU job running ``scripts/ray-on-slurm.sh -- command``;
    asserts it succeeded with the Ray cluster up, returns the job's output."""
    log = tmp_path / "job.out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--partition=debug", "--nodes=1", "--ntasks=1",
         "--cpus-per-task=2", "--mem=4G", "--time=10", f"--chdir={REPO}", f"--output={log}",
         f"--wrap=scripts/ray-on-slurm.sh -- {command}"],
        capture_output=True, text=True, timeout=timeout, env=env)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text
    assert "ray-on-slurm: cluster up with 2 CPUs" in text
    return text


def test_a_study_runs_on_ray_started_inside_a_slurm_job(tmp_path):
    text = run_on_ray_in_slurm(tmp_path, f"{sys.executable} -m launch.cli run study=smoke launcher=ray "
                               f"launcher.address=auto tracking_sqlite_on_cluster=true output_dir={tmp_path / 'out'} progress=false", 400)
    assert "5 run, 0 skipped" in text and "| KD |" in text
    store = JobStore(tmp_path / "out" / "jobs")
    jobs = [p.name for p in store.root.iterdir()]
    assert len(jobs) == 5 and all(store.is_done(job) for job in jobs)


def test_a_tune_search_runs_on_ray_started_inside_a_slurm_job(tmp_path):
    search = (f"{sys.executable} -m launch.cli tune search=kd study=quick search.ray_address=auto "
              f"tracking_sqlite_on_cluster=true "
              f"search.num_samples=2 study.student_recipe.epochs=2 study.student_recipe.lr_milestones=[1] "
              f"study.teacher_recipe.epochs=2 study.teacher_recipe.lr_milestones=[1] "
              f"output_dir={tmp_path / 'out'} progress=false")
    text = run_on_ray_in_slurm(tmp_path, search, 500)
    assert text.count(" finished [") == 2, text  # one line per finished trial
    assert (tmp_path / "out" / "tune" / "quick" / "kd" / "best.overrides").exists()
