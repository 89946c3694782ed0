"""kdflow installs as one namespace: a wheel holds only ``kdflow/...`` (the repository's
top-level folders mapped under it, configs and the shipped images included), builds without
warnings, and a user's own ``configs/`` or ``methods/`` in the working directory cannot shadow
kdflow's."""
from __future__ import annotations

import configparser
import importlib.metadata
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kdflow

REPO = Path(__file__).resolve().parents[2]
#: The repository's folders that ``setup.cfg`` maps under ``kdflow``.
MAPPED = ("methods", "orchestrator", "launch", "configs")


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def test_every_folder_is_listed_as_a_package_under_kdflow():
    listed = set(_setup_cfg()["options"]["packages"].split())
    on_disk = {"kdflow"} | {
        "kdflow." + folder.relative_to(REPO).as_posix().replace("/", ".")
        for top in MAPPED for folder in [REPO / top, *(REPO / top).rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__"}
    assert listed == on_disk


def test_the_package_metadata_states_floors_and_constraints_pin_them():
    requires = _setup_cfg()["options"]["install_requires"].split("\n")
    assert not [r for r in requires if "==" in r], requires
    pinned = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert {"torch", "torchvision", "ray"} <= set(pinned)


def test_version_and_logger_root():
    from kdflow.orchestrator import tracking

    assert importlib.metadata.version("kdflow") == kdflow.__version__
    assert tracking.log.name == "kdflow.orchestrator.tracking"
    assert logging.getLogger("kdflow").handlers  # a NullHandler: silent unless configured


@pytest.mark.slow
def test_a_wheel_holds_only_the_kdflow_namespace_and_builds_without_warnings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("kdflow", *MAPPED):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("kdflow-*.whl"))).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"kdflow"}
    for expected in ("kdflow/__init__.py", "kdflow/methods/distillers/kd.py",
                     "kdflow/launch/cli.py", "kdflow/configs/config.yaml",
                     "kdflow/configs/study/demo.yaml",
                     "kdflow/orchestrator/data/assets/cifar10_sample.tar.xz"):
        assert expected in names, expected
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names


def test_a_users_own_configs_and_methods_folders_do_not_shadow_kdflow(tmp_path):
    (tmp_path / "configs" / "study").mkdir(parents=True)
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text("raise ImportError('the user package')\n")
    (tmp_path / "launch").mkdir()
    code = ("from kdflow.launch.cli import main\n"
            f"raise SystemExit(main(['run', '--dry-run', 'study=smoke', "
            f"'output_dir={tmp_path / 'out'}']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: nothing was started." in done.stdout
