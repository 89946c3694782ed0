"""Nothing is downloaded at run time: with every connection to a non-loopback address refused
(in every Python process, worker processes included) and an empty torch hub cache, a small
study runs to the end and every registered model builds; no connection was even tried.

The refusal is a ``sitecustomize`` module put first on ``PYTHONPATH``: Python imports it at
start-up, so it patches ``socket`` in ``kdflow`` and in each process it starts. It logs every
refused attempt, and a first test shows it does refuse (so an empty log means something).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from kdflow.orchestrator.store import JobStore

REPO = Path(__file__).resolve().parents[2]
GUARD = textwrap.dedent('''
    """Refuse (and log) connections and name lookups for anything but this machine."""
    import ipaddress
    import os
    import socket

    _LOG = os.environ["KDFLOW_TEST_NETWORK_LOG"]
    _connect, _connect_ex, _getaddrinfo = (socket.socket.connect, socket.socket.connect_ex,
                                           socket.getaddrinfo)


    def _local(host):
        if host in ("localhost", "", None):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False


    def _refuse(what):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {what}\\n")
        raise OSError(101, f"network refused by the test: {what}")


    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect {address}")
        return _connect(self, address)


    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect_ex {address}")
        return _connect_ex(self, address)


    def getaddrinfo(host, *args, **kwargs):
        if not _local(host.decode() if isinstance(host, bytes) else host):
            _refuse(f"getaddrinfo {host}")
        return _getaddrinfo(host, *args, **kwargs)


    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
        connect, connect_ex, getaddrinfo)
''')
# call arguments and functions that fetch weights or data: torchvision's weights= keyword
# (written without spaces, as keywords are) with anything but None, pretrained=True,
# download=True, torch.hub, scikit-learn's fetch_*. kdflow's own fetch_archive is left out: it
# runs only when the user sets data.download=true (tests/data/test_download.py shows that
# without it nothing is requested), and the study below runs with the default, false.
DOWNLOAD_SWITCHES = re.compile(
    r"(^|[(,])\s*weights(_backbone)?=(?!None\b)\S|pretrained\s*=\s*True|download\s*=\s*True"
    r"|load_state_dict_from_url|hub\.load|\bfetch_(?!archive\()\w+\(|from_pretrained")
# a teacher and a KD student (teacher weights loaded, MLflow's embedded store written), one
# epoch each on generated data, run in worker processes of the local launcher
SMALL_KD = ["study=smoke", "~study.methods.vanilla", "~study.methods.fitnet", "~study.methods.crd",
            "study.teacher_recipe.epochs=1", "study.student_recipe.epochs=1", "launcher.workers=2"]


@pytest.fixture
def offline(tmp_path) -> Dict[str, str]:
    """An environment for subprocesses with the network refused and an empty torch cache."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    (tmp_path / "torch_home").mkdir()
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard), str(REPO)]),
            "KDFLOW_TEST_NETWORK_LOG": str(tmp_path / "network.log"),
            "TORCH_HOME": str(tmp_path / "torch_home"), "KDFLOW_LOG": "WARNING"}


def attempts(env: Dict[str, str]) -> List[str]:
    log = Path(env["KDFLOW_TEST_NETWORK_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def python(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_the_guard_refuses_and_logs_a_connection(offline):
    proc = python(offline, "-c", "import urllib.request; "
                  "urllib.request.urlopen('http://192.0.2.1/weights.pth', timeout=5)")
    assert proc.returncode != 0 and "network refused by the test" in proc.stderr
    assert len(attempts(offline)) == 1


@pytest.mark.slow
def test_a_study_finishes_with_the_network_refused(offline, tmp_path):
    out = tmp_path / "outputs"
    proc = python(offline, "-m", "kdflow.launch.cli", "run", *SMALL_KD, "progress=false",
                  f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = JobStore(out / "jobs")
    jobs = [p.name for p in store.root.iterdir()]
    assert len(jobs) == 2 and all(store.is_done(job_id) for job_id in jobs)
    assert attempts(offline) == []
    assert list(Path(offline["TORCH_HOME"]).rglob("*")) == []


@pytest.mark.slow
def test_every_registered_model_builds_without_weights_or_network(offline):
    proc = python(offline, "-c", "import torch; torch.set_num_threads(1)\n"
                  "from kdflow.methods.models import MODELS, build_model\n"
                  "for name in MODELS.names(): build_model(name, 10)\n"
                  "print(len(MODELS.names()))")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 50
    assert attempts(offline) == []
    assert list(Path(offline["TORCH_HOME"]).rglob("*")) == []


def test_no_source_switches_on_pretrained_weights_or_downloads():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for folder in ("methods", "orchestrator", "launch")
             for path in sorted((REPO / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if DOWNLOAD_SWITCHES.search(line)]
    assert found == []
