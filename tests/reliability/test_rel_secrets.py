"""Issue 18, item 4 and the tracking_uri part of item 7: credentials never appear in output,
logs, job folders or SLURM's files, and a malformed tracking URI is refused.

A tracking URI holding credentials is refused before anything starts (its message never
repeats them); MLflow's own environment variables are the supported way to pass them. Every
tracking URI kdflow shows, and every error that may echo one, is redacted.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator import tracking
from kdflow.orchestrator.tracking import check_tracking_uri, prepare_experiment, redact

PASSWORD = "S3cretPW"
SMOKE = ["study=smoke", "progress=false"]


def _closed_port() -> int:
    """A local TCP port nothing listens on (the tracking server is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kdflow(*args: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _files_holding(folder: Path, secret: str) -> List[Path]:
    return [path for path in folder.rglob("*")
            if path.is_file() and secret.encode() in path.read_bytes()]


def _unreachable_slurm(folder: Path) -> str:
    """A PATH whose SLURM commands all fail as they do when the controller is down."""
    folder.mkdir()
    for command in ("sbatch", "srun", "squeue", "sacct", "scancel", "scontrol"):
        script = folder / command
        script.write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
        script.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("launcher", ["local", "slurm"])
@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_refused_and_never_shown_or_stored(
        tmp_path, launcher) -> None:
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{_closed_port()}/"
    done = _kdflow("run", *SMOKE, f"launcher={launcher}", f"output_dir={tmp_path / 'out'}",
                   f"tracking_uri={uri}", env={"PATH": _unreachable_slurm(tmp_path / "bin")})
    assert done.returncode == 2, done.stderr
    assert "Invalid setting `tracking_uri`: it holds credentials" in done.stderr
    assert "MLFLOW_TRACKING_USERNAME" in done.stderr and "No job was started." in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    out = tmp_path / "out"
    assert not out.exists() or not _files_holding(out, PASSWORD)


@pytest.mark.slow
def test_credentials_from_mlflow_environment_stay_out_of_output_and_job_folders(tmp_path) -> None:
    """The supported way: MLflow's variables. With the server down the study still runs, and
    neither its output nor anything in output_dir holds the password."""
    uri = f"http://127.0.0.1:{_closed_port()}/"
    done = _kdflow("run", *SMOKE, "launcher.workers=2", f"output_dir={tmp_path}",
                   f"tracking_uri={uri}",
                   env={"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert done.returncode == 0, done.stderr
    assert "unreachable" in done.stderr  # the warning names the server, not the password
    assert PASSWORD not in done.stdout + done.stderr
    assert list(tmp_path.glob("jobs/*/tracking-outbox.jsonl"))  # kept for `kdflow sync`
    assert not _files_holding(tmp_path, PASSWORD)


def test_errors_that_echo_a_url_are_redacted_in_warnings(monkeypatch, caplog) -> None:
    def echoing(uri: str, name: str) -> str:
        raise RuntimeError(f"API request to {uri}api/2.0/mlflow/experiments failed: refused")

    monkeypatch.setattr(tracking, "ensure_experiment", echoing)
    with caplog.at_level(logging.WARNING):
        prepare_experiment(f"http://alice:{PASSWORD}@mlflow:5000/?access_token=T0ken", "study")
    assert "http://***@mlflow:5000/?access_token=***" in caplog.text
    assert PASSWORD not in caplog.text and "T0ken" not in caplog.text


@pytest.mark.parametrize("text, shown", [
    (f"http://alice:{PASSWORD}@host:5000/x", "http://***@host:5000/x"),
    (f"https://alice:p@ss:{PASSWORD}@host/", "https://***@host/"),  # an unescaped @ inside
    (f"see http://host/?token={PASSWORD}&a=1.", "see http://host/?token=***&a=1."),
    ("http://host:5000/no/secret", "http://host:5000/no/secret"),
])
def test_redact_hides_user_info_and_token_parameters(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize("uri", [
    "http://mlflow:5000", "https://mlflow.example.org/base", "sqlite:////tmp/kd/mlflow.db",
    "file:///tmp/kd/mlruns", "databricks", "databricks://profile", "postgresql://db:5432/ml",
    "./mlruns", "/tmp",
])
def test_well_formed_tracking_uris_are_accepted(uri: str) -> None:
    check_tracking_uri(uri)


@pytest.mark.parametrize("uri, says", [
    ("http//oops", "neither a URI (scheme://...) nor an existing folder"),
    ("htp://mlflow:5000", "unknown scheme 'htp'"),
    ("http://", "has no host"),
    ("http://mlflow:port", "has no host (or a port that is not a number)"),
    ("sqlite://mlflow.db", "names no database file"),
    (f"http://alice:{PASSWORD}@mlflow:5000", "holds credentials (user info before the host)"),
    (f"https://mlflow/?api_key={PASSWORD}", "holds credentials (query parameter api_key)"),
])
def test_malformed_tracking_uris_are_refused_naming_the_field_and_a_fix(uri: str,
                                                                       says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_tracking_uri(uri)
    assert refused.value.field == "tracking_uri" and says in str(refused.value)
    assert refused.value.fix and PASSWORD not in str(refused.value)


@pytest.mark.slow
def test_a_malformed_tracking_uri_stops_the_command_with_exit_2(tmp_path) -> None:
    done = _kdflow("run", *SMOKE, f"output_dir={tmp_path}", "tracking_uri=http//oops", env={})
    assert done.returncode == 2 and "Invalid setting `tracking_uri`" in done.stderr
    assert not (tmp_path / "http").exists() and not (Path.cwd() / "http//oops").exists()
