"""What SLURM says about jobs: ``squeue`` for live ones, ``sacct`` for ended ones; ``scancel``.

Every call is counted (``calls``), so launchers and benchmarks can report how many times they
asked the scheduler. Ids are SLURM's: ``1234`` for a plain job, ``1234_5`` for an array task.
"""
from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from methods.errors import ConfigError

# squeue states of a job that will still run (or runs): it must not be submitted again
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
               "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED")
# a pending job whose dependency can never be met: it will never run by itself
STUCK_REASONS = ("DependencyNeverSatisfied",)
ID_BATCH = 200  # ids per sacct / scancel call


@dataclass(frozen=True)
class QueueEntry:
    """One job as the scheduler sees it. state: SLURM's (``PENDING``, ``COMPLETED``...);
    reason: squeue's reason for a pending job or sacct's exit code for an ended one."""

    scheduler_id: str
    state: str
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES and self.reason not in STUCK_REASONS


def require_slurm() -> None:
    """Raise ConfigError (before anything is submitted) when SLURM's commands are missing."""
    missing = [c for c in ("sbatch", "srun", "squeue", "sacct", "scancel") if shutil.which(c) is None]
    if missing:
        raise ConfigError("launcher", f"launcher=slurm needs SLURM's commands; not found: "
                          f"{', '.join(missing)}",
                          fix="run kdflow on a SLURM login node, or use launcher=local "
                              "(scripts/slurm-dev-cluster.sh start brings up a one-node test cluster)")


class SlurmQueue:
    """Thin, counted wrappers around squeue / sacct / scancel."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def _run(self, args: List[str]) -> str:
        self.calls[args[0]] += 1
        proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])}... failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def live(self) -> Dict[str, QueueEntry]:
        """This user's queued and running jobs, one entry per array task (one squeue call)."""
        out = self._run(["squeue", "--me", "--array", "--noheader", "--format=%i|%T|%r"])
        entries = {}
        for line in out.splitlines():
            job_id, state, reason = (line.split("|") + ["", ""])[:3]
            entries[job_id.strip()] = QueueEntry(job_id.strip(), state.strip(), reason.strip())
        return entries

    def accounting(self, scheduler_ids: Iterable[str]) -> Dict[str, QueueEntry]:
        """Final (or latest) states from accounting, for ids squeue no longer shows."""
        ids = sorted(set(scheduler_ids))
        entries: Dict[str, QueueEntry] = {}
        for start in range(0, len(ids), ID_BATCH):
            out = self._run(["sacct", "--allocations", "--noheader", "--parsable2",
                             "--format=JobID,State,ExitCode", "--jobs", ",".join(ids[start:start + ID_BATCH])])
            for line in out.splitlines():
                job_id, state, code = (line.split("|") + ["", ""])[:3]
                # "CANCELLED by 0" -> CANCELLED; a requeued job's older runs come first, the last wins
                entries[job_id] = QueueEntry(job_id, state.split()[0] if state else "", code)
        return entries

    def test_only(self, flags: List[str]) -> Optional[str]:
        """Ask ``sbatch --test-only`` whether a job with ``flags`` could be queued; None when it
        could, else SLURM's reason (an unknown partition, account or qos, too much memory...)."""
        args = ["sbatch", "--test-only", *flags, "--wrap=true"]
        self.calls["sbatch --test-only"] += 1
        proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode == 0:
            return None
        lines = [line.replace("sbatch: error: ", "").strip() for line in proc.stderr.splitlines()]
        return "; ".join(line for line in lines if line) or f"sbatch exited {proc.returncode}"

    def cancel(self, scheduler_ids: Sequence[str], signal: Optional[str] = None) -> None:
        """``scancel`` the ids (in batches); with ``signal``, send it instead of cancelling."""
        ids = sorted(set(scheduler_ids))
        flags = [f"--signal={signal}"] if signal else []
        for start in range(0, len(ids), ID_BATCH):
            self._run(["scancel", *flags, *ids[start:start + ID_BATCH]])
