"""Bad slurm launcher settings on the real dev cluster: each row is refused with exit status 2
and an error naming the setting, before anything is submitted (neither ``squeue`` nor
``sacct`` knows a job of the row's study) or written to the job store. Some rows are refused
by kdflow's own checks, the others by ``sbatch --test-only`` (a partition the cluster does not
have, GPUs on a node without any, more memory than the node has)."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import List, Set

import pytest

from kdflow.launch.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.reliability, pytest.mark.usefixtures("slurm_cluster")]

# generated data, tiny models: validating the study costs well under a second
SMALL = ["study=smoke", "launcher=slurm_dev", "progress=false", "tracking_sqlite_on_cluster=true"]

ROWS = [
    # refused by SLURM's own check (sbatch --test-only), before any sbatch call
    (["launcher.resources.partition=nosuchpartition"], "launcher.resources"),
    (["launcher.resources.gpus_per_node=1"], "launcher.resources"),
    (["+launcher.stages.teacher.mem_gb=100000"], "launcher.stages.teacher"),
    # contradictory or malformed settings, refused by kdflow
    (["launcher.resources.gpus_per_node=2", "launcher.resources.tasks_per_node=1"],
     "launcher.resources.tasks_per_node"),
    (["+launcher.stages.teacher.tasks_per_node=4", "launcher.resources.gpus_per_node=1"],
     "launcher.stages.teacher.tasks_per_node"),
    (["+launcher.resources.additional.mem=4G"], "launcher.resources.additional.mem"),
    (["+launcher.resources.additional.dependency=afterok:1"],
     "launcher.resources.additional.dependency"),
    (["launcher.resources.signal_delay_s=7200", "launcher.resources.time_min=60"],
     "launcher.resources.signal_delay_s"),
    (["launcher.resources.nodes=1.5"], "launcher.resources.nodes"),
    (["launcher.wait=maybe"], "launcher.wait"),
    (["launcher.setup=module load cuda"], "launcher.setup"),
    # a line break would end the #SBATCH line it is written on and start a shell line
    (["launcher.job_name='x\ntouch /tmp/kdflow-pwned #'"], "launcher.job_name"),
    (["+launcher.resources.additional.comment='c\ntouch /tmp/kdflow-pwned #'"],
     "launcher.resources.additional.comment"),
]


def study_jobs(tag: str) -> Set[str]:
    """SLURM jobs (queued, running or in accounting) whose name contains ``tag``."""
    queued = subprocess.run(["squeue", "--me", "--noheader", "--format=%j"], check=True,
                            capture_output=True, text=True, timeout=60).stdout.split()
    accounted = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", "--format=JobName",
                                "--starttime=now-1days"], check=True, capture_output=True,
                               text=True, timeout=60).stdout.split()
    return {name for name in queued + accounted if tag in name}


def files_under(folder: Path) -> List[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("overrides, field", ROWS, ids=[" ".join(o)[:70] for o, _ in ROWS])
def test_bad_slurm_settings_exit_2_and_submit_nothing(overrides, field, tmp_path, capsys):
    tag = f"bad{uuid.uuid4().hex[:10]}"
    out = tmp_path / "outputs"
    code = main(["run", *SMALL, f"study.name={tag}", *overrides, f"output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    line, last = captured.err.strip().splitlines()
    assert line.startswith(f"kdflow: error: Invalid setting `{field}`"), line
    assert last == "No job was started."
    assert "Fix:" in line or "Allowed values:" in line, line
    assert not (out / "jobs").exists(), files_under(out / "jobs")
    assert not (out / "slurm").exists(), "submitit wrote a submission"
    assert not (out / "mlflow.db").exists(), "the tracking store was created"
    assert study_jobs(tag) == set()
    assert not Path("/tmp/kdflow-pwned").exists()
