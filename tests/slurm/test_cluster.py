"""The dev SLURM cluster works: batch jobs, accounting, arrays, dependencies and requeue."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from slurm_wait import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

CMD_TIMEOUT_S = 120


def run(*cmd: str, timeout: float = CMD_TIMEOUT_S) -> str:
    proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sbatch(*args: str, timeout: float = CMD_TIMEOUT_S) -> str:
    """Submits, returns the job id (for an array: the array's job id)."""
    return run("sbatch", "--parsable", *args, timeout=timeout).strip().split(";")[0]


def sacct_states(job_id: str, *extra: str) -> list[str]:
    out = run("sacct", "-j", job_id, "--parsable2", "--noheader", "-o", "State", *extra)
    return [line.strip() for line in out.splitlines() if line.strip()]


def squeue_state(job_id: str) -> str:
    return run("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def wait_sacct_completed(job_id: str, n: int = 1, *extra: str) -> list[str]:
    # the job's end record reaches slurmdbd asynchronously, shortly after sbatch --wait returns
    def completed() -> list[str] | None:
        states = sacct_states(job_id, *extra)
        return states if len(states) >= n and all(s == "COMPLETED" for s in states) else None

    return wait_until(f"sacct to report job {job_id} COMPLETED", completed, timeout=60)


def test_batch_job_with_wait_and_accounting(tmp_path: Path):
    out = tmp_path / "job.out"
    job_id = sbatch("--wait", "-J", "kdflow-hello", "-o", str(out),
                    "--wrap", "echo hello-$SLURM_JOB_ID from $(hostname -s)")
    assert out.read_text().startswith(f"hello-{job_id} from ")
    states = wait_sacct_completed(job_id)
    assert states[0] == "COMPLETED"  # the allocation's line; then its steps (batch, ...)


def test_job_array_of_three(tmp_path: Path):
    job_id = sbatch("--wait", "--array=0-2", "-o", str(tmp_path / "a_%A_%a.out"),
                    "--wrap", "echo task=$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID")
    for task in range(3):
        text = (tmp_path / f"a_{job_id}_{task}.out").read_text()
        assert text.strip() == f"task={task} of {job_id}"
    assert wait_sacct_completed(job_id, 3, "-X") == ["COMPLETED"] * 3


def test_dependency_afterok_runs_after(tmp_path: Path):
    first = sbatch("-o", str(tmp_path / "first.out"),
                   "--wrap", "sleep 2; date +%s.%N")
    second = sbatch(f"--dependency=afterok:{first}", "-o", str(tmp_path / "second.out"),
                    "--wrap", "date +%s.%N")
    assert run("squeue", "-h", "-j", second, "-o", "%T %r").split() == ["PENDING", "Dependency"]
    # poll accounting rather than sbatch --wait, whose back-off adds seconds
    wait_sacct_completed(second, 1, "-X")
    first_end = float((tmp_path / "first.out").read_text().split()[-1])
    second_start = float((tmp_path / "second.out").read_text().split()[-1])
    assert second_start >= first_end
    assert sacct_states(first, "-X") == ["COMPLETED"]


def test_scontrol_requeue_of_running_job(tmp_path: Path):
    out = tmp_path / "rq.out"
    job_id = sbatch("--requeue", "--open-mode=append", "-o", str(out),
                    "--wrap", "echo run restarts=$SLURM_RESTART_COUNT; sleep 300")

    def show() -> str:
        return run("scontrol", "show", "job", job_id)

    try:
        wait_until("job to run", lambda: squeue_state(job_id) == "RUNNING")
        wait_until("job output", lambda: out.exists() and "run" in out.read_text())
        run("scontrol", "requeue", job_id)
        wait_until("requeued job back in the queue",
                   lambda: squeue_state(job_id) in ("PENDING", "REQUEUED"))
        assert "Restarts=1" in show()
        # A requeued job is eligible again only AuthInfo's cred_expire after the requeue (15 s on
        # the dev cluster; slurmd revokes the old credential for that long). Do not force it with
        # `scontrol update StartTime=now`: a relaunch within the same second as the revocation
        # gets a revoked credential and the job ends FAILED.
        try:
            wait_until("requeued job to run again", lambda: squeue_state(job_id) == "RUNNING",
                       timeout=90)
            wait_until("second run's output", lambda: "restarts=1" in out.read_text())
            # accounting keeps the first run as REQUEUED (-D: all duplicates of the job id)
            wait_until("sacct to show the REQUEUED run",
                       lambda: "REQUEUED" in sacct_states(job_id, "-X", "-D"), timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{show()}\nsacct -D: {sacct_states(job_id, '-X', '-D')}"
                                 f"\noutput: {out.read_text()!r}") from None
    finally:
        subprocess.run(["scancel", job_id], check=False, capture_output=True, timeout=60)
