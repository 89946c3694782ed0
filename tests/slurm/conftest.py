"""A real single-node SLURM cluster (with slurmdbd accounting) for tests marked ``slurm``.

The session fixture ``slurm_cluster`` runs ``scripts/slurm-dev-cluster.sh start`` (which apt-installs
the Debian packages on a fresh machine and then brings up munged, MariaDB, slurmdbd, slurmctld and
slurmd under ``$KDFLOW_SLURM_DIR``, default ``/tmp/kdflow-slurm``), sets ``os.environ["SLURM_CONF"]``
so that sbatch/squeue/sacct/scontrol (and any code under test that shells out to them) talk to it,
and yields the state folder.

Teardown policy: the cluster is LEFT RUNNING at the end of the session. Other test modules and later
pytest runs reuse it (``start`` on a running cluster returns in well under a second), and CI machines
are fresh each run anyway. Set ``KDFLOW_SLURM_STOP_AFTER=1`` to stop it at the end of the session,
which happens only if this session was the one that started it. Stop it by hand with
``scripts/slurm-dev-cluster.sh stop``.

The script needs root and apt (Debian/Ubuntu); elsewhere these tests fail with a message saying so.
Run only them with ``pytest -m slurm``, or leave them out with ``pytest -m "not slurm"``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-dev-cluster.sh"
HERE = Path(__file__).resolve().parent
# apt-get update + install on a fresh machine (~15-40 s) plus the bring-up (~5-10 s), with headroom
START_TIMEOUT_S = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    # every test collected from tests/slurm/ carries the marker, whether or not its module says so
    for item in items:
        if HERE in Path(str(getattr(item, "path", item.fspath))).resolve().parents:
            item.add_marker(pytest.mark.slurm)


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """The running dev cluster's state folder; ``SLURM_CONF`` is set in ``os.environ``."""
    problem = None
    if not sys.platform.startswith("linux"):
        problem = "the SLURM dev cluster needs Linux"
    elif os.geteuid() != 0:
        problem = "the SLURM dev cluster needs root (it installs packages and starts daemons)"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        problem = "neither apt-get nor slurmctld is available"
    if problem:
        pytest.fail(f"{problem}. These tests run a real SLURM cluster "
                    f"(scripts/slurm-dev-cluster.sh); leave them out with: pytest -m 'not slurm'",
                    pytrace=False)

    was_up = _script("status", timeout=60).returncode == 0
    try:
        proc = _script("start", timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"slurm-dev-cluster.sh start timed out after {START_TIMEOUT_S}s:\n"
                    f"{exc.stdout or ''}\n{exc.stderr or ''}")
    if proc.returncode != 0:
        pytest.fail(f"slurm-dev-cluster.sh start failed (rc={proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")

    conf = None
    for line in proc.stdout.splitlines():
        if line.startswith("SLURM_CONF="):
            conf = line.split("=", 1)[1].strip()
    assert conf and Path(conf).is_file(), f"no SLURM_CONF line in:\n{proc.stdout}"
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield Path(conf).parent
    finally:
        if not was_up and os.environ.get("KDFLOW_SLURM_STOP_AFTER") == "1":
            _script("stop", timeout=180)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
