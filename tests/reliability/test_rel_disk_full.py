"""Issue 9, item 6: a disk that fills up while a job checkpoints.

The job store lives on a real, small tmpfs mounted for the test (so the test needs root or
CAP_SYS_ADMIN, as the SLURM tests do); a ballast file leaves room for two and a half
checkpoints, so the third checkpoint write hits a genuine ENOSPC from the kernel. The job must
fail cleanly: a ``failed`` state whose error names the disk-full condition and the file, the
earlier checkpoints intact, no temporary file left. Once the ballast is deleted the same job
resumes from its last checkpoint and ends exactly like a run on a roomy disk.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch
from rel_checkpoint_jobs import QUIET, checkpoint_steps, saved_steps, vanilla_job

from kdflow.orchestrator.atomic import DiskFull
from kdflow.orchestrator.checkpoint import checkpoint_path, latest_checkpoint_path, read_sealed
from kdflow.orchestrator.runner import run_job
from kdflow.orchestrator.store import JobStore

DISK_BYTES = 8 * 2**20
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 8, 5
FITS = 2  # checkpoints written before the disk is full: room is left for 2.5


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A fresh tmpfs of DISK_BYTES mounted at ``tmp_path/disk``, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                           str(mount)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (f"mounting a small tmpfs needs root or CAP_SYS_ADMIN: "
                                  f"{done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True, timeout=30)


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def test_a_full_disk_fails_the_checkpoint_cleanly_and_the_job_resumes_once_freed(
        study, tmp_path, small_disk) -> None:
    job = vanilla_job(study, EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    reference = JobStore(tmp_path / "roomy" / "jobs")
    expected = run_job(job, reference, QUIET)
    checkpoint_bytes = latest_checkpoint_path(reference.checkpoint_dir(job.job_id)).stat().st_size

    store = JobStore(small_disk / "jobs")
    store.add(job)
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(_free_bytes(small_disk) - int((FITS + 0.5) * checkpoint_bytes)))

    with pytest.raises(DiskFull) as failure:
        run_job(job, store, QUIET)
    saves = saved_steps(EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY)
    torn = checkpoint_path(store.checkpoint_dir(job.job_id), saves[FITS])
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(torn)
    state = store.state(job.job_id)
    assert state.status == "failed"
    assert "No space left on device (disk full) while writing" in state.error
    assert str(torn) in state.error
    assert checkpoint_steps(store, job) == saves[:FITS]  # intact: checksums and loader pass
    assert not list(store.checkpoint_dir(job.job_id).glob(".tmp-*"))
    assert not store.is_done(job.job_id)

    ballast.unlink()
    result = run_job(job, store, QUIET)
    state = store.state(job.job_id)
    assert state.status == "done" and state.resumed_step == saves[FITS - 1]
    assert state.attempts == 2
    assert result["history"] == expected["history"] and result["metrics"] == expected["metrics"]
    weights = read_sealed(store.weights_path(job.job_id))
    reference_weights = read_sealed(reference.weights_path(job.job_id))
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)
