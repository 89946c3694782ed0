"""Issue 18, item 5: operational faults are one line that says what and how to fix, not a
traceback: exit 2 for the user's input (an ``output_dir`` that is a file or cannot be written),
exit 1 for the machine (a SLURM cluster that does not answer, a disk that fills up while the
report is written). A report is written whole or not at all: the previous one stays intact.

The read-only and full disks are real tmpfs mounts (root or CAP_SYS_ADMIN, like
``test_rel_disk_full.py``); the unreachable cluster is a PATH whose SLURM commands fail as
they do when the controller is down, or hang as they do without a slurm.conf.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest
import torch

from kdflow.launch.cli import Session, main
from kdflow.launch.slurm_queue import PING_TIMEOUT_S, SlurmUnreachable, require_slurm
from kdflow.orchestrator.atomic import write_json
from kdflow.orchestrator.checkpoint import write_sealed
from kdflow.orchestrator.report import REPORT_FILES

SMOKE = ["study=smoke", "progress=false"]
FAILING_COMMAND = ("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2"
                   "\nexit 1\n")
HANGING_COMMAND = "#!/bin/sh\nsleep 120\n"


def _kdflow(*args: str, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _mount_tmpfs(mount: Path, options: str) -> None:
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"mounting a tmpfs needs root or CAP_SYS_ADMIN: {done.stderr}"


@pytest.fixture
def mounts(tmp_path) -> Iterator[list]:
    """Folders mounted by the test (appended to the list), unmounted afterwards."""
    mounted: list = []
    yield mounted
    for mount in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(mount)], check=True, timeout=30)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines and lines[0].startswith("kdflow: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("verb", ["run", "status"])
@pytest.mark.parametrize("below", [False, True])
@pytest.mark.slow
def test_an_output_dir_that_is_a_file_is_refused_with_exit_2(tmp_path, verb, below) -> None:
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    output_dir = blocker / "study" if below else blocker
    done = _kdflow(verb, *SMOKE, f"output_dir={output_dir}")
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "Invalid setting `output_dir`" in line and "is a file" in line and "Fix:" in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_a_read_only_output_dir_is_refused_with_exit_2(tmp_path, mounts) -> None:
    output_dir = tmp_path / "readonly"
    _mount_tmpfs(output_dir, "ro,size=1m")
    mounts.append(output_dir)
    done = _kdflow("run", *SMOKE, f"output_dir={output_dir / 'kd'}")
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "Invalid setting `output_dir`" in line and "Read-only file system" in line
    status = _kdflow("status", *SMOKE, f"output_dir={output_dir / 'kd'}")  # reading is fine
    assert status.returncode == 0 and " pending " in status.stdout


def _slurm_path(folder: Path, script: str) -> str:
    """A PATH whose SLURM commands all run ``script``."""
    folder.mkdir()
    for command in ("sbatch", "srun", "squeue", "sacct", "scancel", "scontrol"):
        (folder / command).write_text(script)
        (folder / command).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("verb", ["run", "status", "cancel"])
@pytest.mark.slow
def test_an_unreachable_slurm_cluster_is_one_line_and_exit_1(tmp_path, verb) -> None:
    env = {"PATH": _slurm_path(tmp_path / "bin", FAILING_COMMAND)}
    done = _kdflow(verb, *SMOKE, "launcher=slurm", "tracking_sqlite_on_cluster=true",
                   f"output_dir={tmp_path / 'out'}", env=env)
    assert done.returncode == 1
    line = _one_error_line(done.stderr)
    assert "the SLURM cluster does not answer" in line and "Unable to contact" in line
    assert "launcher=local" in line
    assert not list(tmp_path.glob("out/jobs/*"))  # nothing was submitted or recorded


@pytest.mark.slow
def test_a_hanging_slurm_controller_is_given_up_within_the_ping_timeout(tmp_path,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv("PATH", _slurm_path(tmp_path / "bin", HANGING_COMMAND))
    started = time.monotonic()
    with pytest.raises(SlurmUnreachable, match="gave no answer"):
        require_slurm()
    assert time.monotonic() - started < PING_TIMEOUT_S + 5


def _finish_every_job(session: Session) -> None:
    """Record every job of ``session`` as finished with a sound result and sealed weights."""
    for job in session.graph.jobs:
        session.store.add(job)
        write_sealed(session.store.weights_path(job.job_id), {"w": torch.zeros(4)})
        write_json(session.store.job_dir(job.job_id) / "result.json", {
            "job_id": job.job_id, "stage": job.stage, "method": job.method,
            "teacher": job.teacher, "student": job.model, "dataset": job.dataset,
            "seed": job.seed, "epochs": 2, "wall_time_s": 1.0, "task": "classification",
            "metrics": {"top1": 50.0 + job.seed, "top5": 90.0},
            "history": [{"epoch": 1, "val/top1": 40.0}, {"epoch": 2, "val/top1": 50.0}]})


def test_a_full_disk_while_the_report_is_written_keeps_the_previous_report(
        tmp_path, mounts, capsys) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=4m")
    mounts.append(disk)
    overrides = [*SMOKE, f"output_dir={disk}"]
    _finish_every_job(Session.compose(overrides))
    assert main(["report", *overrides]) == 0
    report = disk / "reports" / "smoke"
    before = {name: (report / name).read_bytes()
              for name in REPORT_FILES if (report / name).exists()}
    assert set(before) == {"report.md", "report.csv", "summary.csv", "accuracy.png", "curves.png"}
    stats = os.statvfs(disk)
    room = sum(len(before[n]) for n in ("report.md", "report.csv", "summary.csv")) + 16 * 1024
    (disk / "ballast").write_bytes(bytes(stats.f_bavail * stats.f_frsize - room))
    capsys.readouterr()

    assert main(["report", *overrides]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device (disk full) while writing" in line and str(report) in line
    assert {name: (report / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in report.iterdir()) == sorted(before)  # no temporary left


CLUSTER_LAUNCHES = [
    ("run", ["launcher=slurm"], "launcher=slurm"),
    ("run", ["launcher=slurm", "tracking_uri=file:/shared/mlruns"], "launcher=slurm"),
    ("run", ["launcher=ray", "launcher.address=auto"], "launcher.address=auto"),
    ("tune", ["search=kd", "search.ray_address=auto"], "search.ray_address=auto"),
]


@pytest.mark.parametrize("verb, launch, where", CLUSTER_LAUNCHES,
                         ids=[" ".join(launch) for _, launch, _ in CLUSTER_LAUNCHES])
def test_cluster_jobs_refuse_a_file_tracking_store_before_submitting(
        tmp_path, monkeypatch, capsys, verb, launch, where) -> None:
    called = tmp_path / "slurm-called"
    monkeypatch.setenv("PATH", _slurm_path(tmp_path / "bin", f"#!/bin/sh\ntouch {called}\n"))
    code = main([verb, *SMOKE, *launch, f"output_dir={tmp_path / 'out'}"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "Invalid setting `tracking_uri`" in line and where in line
    assert "kdflow server" in line and "tracking_uri=http://" in line
    assert "tracking_sqlite_on_cluster=true" in line
    assert not called.exists() and not (tmp_path / "out").exists()  # nothing submitted or made


@pytest.mark.parametrize("allowed", [
    ["launcher=slurm", "tracking_sqlite_on_cluster=true"],
    ["launcher=slurm", "tracking_uri=http://mlflow.cluster:5000"],
    ["launcher=ray"],  # an embedded Ray on this machine
])
def test_a_server_or_the_opt_in_lets_cluster_jobs_track(allowed) -> None:
    from kdflow.launch.compose import compose_config

    assert compose_config([*SMOKE, *allowed]).launcher.name in ("slurm", "ray")
