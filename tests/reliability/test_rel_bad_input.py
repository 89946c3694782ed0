"""Bad input, table-driven: every row is a command line (and, for some, a config file) that
``kdflow`` must refuse before anything starts: exit status 2, one error line naming the field
(with the allowed values or a fix), no traceback, and nothing written where jobs or data go.

The rows go through ``launch.cli.main``, the function the ``kdflow`` console script runs; the
last test runs a few of them through the installed console script itself. Rows that use the
slurm launcher are in ``tests/slurm/test_rel_bad_slurm_input.py``, which checks the queue too.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from datafiles import write_fake_cifar100, write_jpeg_tree

from kdflow.launch.cli import main


@dataclass(frozen=True)
class BadInput:
    """One row: ``argv`` after ``kdflow`` (``{out}``, ``{missing}``, ``{conf}``, ``{cifar}``,
    ``{tree}`` are filled in per test) and the field path the error must name."""

    kind: str
    argv: Tuple[str, ...]
    field: str

    @property
    def id(self) -> str:
        return f"{self.kind}:{' '.join(self.argv)}"[:90]


def row(kind: str, field: str, *argv: str) -> BadInput:
    return BadInput(kind, argv, field)


BROKEN_YAML = {  # config files with a YAML syntax error, under a --config-dir style searchpath
    "study/broken.yaml": "name: broken\npairs: [{teacher: resnet14, student: resnet8}\nseeds: [0\n",
    "launcher/broken.yaml": "name: local\nworkers: 1\n  bad_indent: true\n",
}
SEARCHPATH = "hydra.searchpath=[file://{conf}]"
KD_TUNE = ("tune", "search=kd", "study=quick")

ROWS: List[BadInput] = [
    # unknown names
    row("unknown", "study", "run", "study=nostudy"),
    row("unknown", "study.methods.nomethod", "run", "+study.methods.nomethod={}"),
    row("unknown", "study.pairs[0].student", "run",
        "study.pairs=[{teacher: resnet20, student: resnet7}]"),
    row("unknown", "study.datasets.nodata", "run", "+study.datasets.nodata={}"),
    row("unknown", "launcher", "run", "launcher=nolauncher"),
    row("unknown", "study.student_recipe.warmup", "run", "+study.student_recipe.warmup=5"),
    row("unknown", "study.methods.kd.temprature", "run", "study.methods.kd.temprature=2"),
    row("unknown", "data.loader", "run", "data.loader=dali"),
    row("unknown", "search", "tune", "search=nosearch", "study=quick"),
    row("unknown", "dataset", "data", "prepare", "mnist"),
    row("unknown", "rerun", "run", "rerun=sometimes"),
    row("unknown", "rerun[1]", "run", "rerun=[stale,method:nomethod]"),
    row("unknown", "outptu_dir", "run", "+outptu_dir={out}"),
    # wrong types
    row("type", "study.seeds", "run", "study.seeds=abc"),
    row("type", "study.teacher_seed", "run", "study.teacher_seed=abc"),
    row("type", "study.methods.kd.temperature", "run", "study.methods.kd.temperature=hot"),
    row("type", "study.student_recipe.batch_size", "run", "study.student_recipe.batch_size=1.5"),
    row("type", "launcher.workers", "run", "launcher.workers=two"),
    row("type", "progress", "run", "progress=maybe"),
    row("type", "launcher.retries", "run", "launcher=ray", "launcher.retries=1.5"),
    row("type", "rerun", "run", "rerun=3"),
    row("type", "study.student_recipe.lr_milestones", "run",
        "study.student_recipe.lr_milestones=abc"),
    row("type", "study.student_recipe.weight_decay", "run",
        "study.student_recipe.weight_decay=abc"),
    row("type", "study.student_recipe.momentum", "run", "study.student_recipe.momentum=abc"),
    # out-of-range values
    row("range", "study.student_recipe.lr", "run", "study.student_recipe.lr=-0.1"),
    row("range", "study.student_recipe.epochs", "run", "study.student_recipe.epochs=0"),
    row("range", "study.methods.kd.temperature", "run", "study.methods.kd.temperature=0"),
    row("range", "study.seeds[1]", "run", "study.seeds=[0,-1]"),
    row("range", "study.student_recipe.momentum", "run", "study.student_recipe.momentum=1.5"),
    row("range", "study.methods.fitnet.hint_stage", "run", "study.methods.fitnet.hint_stage=5"),
    row("range", "study.datasets.synthetic.num_classes", "run", "study=smoke",
        "study.datasets.synthetic.num_classes=1"),
    row("range", "launcher.workers", "run", "launcher.workers=0"),
    row("range", "rerun", "run", "rerun=stage:student"),
    row("range", "study.name", "run", "study.name=../elsewhere"),
    row("range", "tracking_uri", "run", "tracking_uri=ftp://mlflow.example"),
    row("range", "study.student_recipe.channels_last", "run",
        "study.student_recipe.channels_last=maybe"),
    row("range", "study.student_recipe.compile", "run", "study.student_recipe.compile=fast"),
    row("range", "study.student_recipe.cuda_graphs", "run", "study.student_recipe.cuda_graphs=true"),
    # NaN and infinity in numeric settings
    row("range", "study.student_recipe.lr", "run", "study.student_recipe.lr=nan"),
    row("range", "study.teacher_recipe.lr", "run", "study.teacher_recipe.lr=inf"),
    row("range", "study.student_recipe.weight_decay", "run",
        "study.student_recipe.weight_decay=nan"),
    row("range", "study.methods.kd.temperature", "run", "study.methods.kd.temperature=nan"),
    row("range", "study.methods.kd.kd_weight", "run", "study.methods.kd.kd_weight=inf"),
    # settings that do not fit the data or the machine
    row("range", "study.methods.crd.num_negatives", "run", "study=smoke",
        "study.methods.crd.num_negatives=100000"),
    row("range", "study.pairs[0].student", "run", "study=smoke",
        "study.pairs=[{teacher: resnet34, student: resnet18}]"),
    *([row("range", "study.student_recipe.device", "run", "study.student_recipe.device=cuda")]
      if not torch.cuda.is_available() else []),
    # missing or empty
    row("missing", "study.datasets.cifar100.root", "run", "study=cifar100_baselines",
        "data.root={missing}"),
    row("missing", "study.datasets.imagefolder.root", "run", "study=imagenet_baselines",
        "data.root={missing}"),
    row("missing", "study.datasets.cifar100.beton_dir", "run", "study=cifar100_baselines",
        "data.root={cifar}", "data.loader=ffcv"),
    row("missing", "prepare.dataset.root", "data", "prepare", "cifar100", "data.root={missing}"),
    row("missing", "prepare.dataset.train_dir", "data", "prepare", "imagefolder",
        "data.root={tree}", "prepare.dataset.train_dir=training"),
    row("missing", "study.seeds", "run", "study.seeds=[]"),
    row("missing", "study.pairs", "run", "~study.pairs"),
    row("missing", "study.ablations.kd.temperature", "run", "+study.ablations.kd.temperature=[]"),
    # launcher settings that contradict each other
    row("conflict", "launcher.num_cpus", "run", "launcher=ray", "launcher.address=auto",
        "launcher.num_cpus=4"),
    row("conflict", "launcher.resources.num_cpus", "run", "launcher=ray",
        "launcher.resources.num_cpus=0"),
    row("conflict", "launcher.bogus", "run", "+launcher.bogus=1"),
    # malformed YAML in a config file on the search path
    row("yaml", "study", "run", SEARCHPATH, "study=broken"),
    row("yaml", "launcher", "run", SEARCHPATH, "launcher=broken"),
    # overrides Hydra cannot parse, or that name nothing
    row("override", "study.seeds", "run", "study.seeds=[0,1"),
    row("override", "study..seeds", "run", "study..seeds=1"),
    row("override", "=5", "run", "=5"),
    row("override", "study.nokey", "run", "study.nokey=1"),
    row("override", "study.name", "run", "study.name=${nope}"),
    row("override", "--bogus", "run", "--bogus"),
    row("override", "study.seeds", "run", "-m", "study.seeds=[0],[1"),
    row("override", "study.methods.kd.temperature", "run", "-m",
        "study.methods.kd.temperature=2,0"),
    # search spaces
    row("search", "search.space.method.kd_weight.values", *KD_TUNE,
        "search.space.method.kd_weight.values=[]"),
    row("search", "search.space.method.temperature.low", *KD_TUNE,
        "search.space.method.temperature.low=20"),
    row("search", "search.space.method.nosuch", *KD_TUNE,
        "+search.space.method.nosuch={type: choice, values: [1]}"),
    row("search", "search.num_samples", *KD_TUNE, "search.num_samples=0"),
    # kdflow data prepare settings
    row("prepare", "prepare.max_side", "data", "prepare", "imagefolder", "data.root={tree}",
        "prepare.max_side=-5"),
    row("prepare", "prepare.compress_probability", "data", "prepare", "imagefolder",
        "data.root={tree}", "prepare.compress_probability=2"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """Files the rows point at: broken config files, a CIFAR-100 folder without .beton files,
    a small JPEG tree, and a path that does not exist."""
    root = tmp_path_factory.mktemp("bad_input")
    for name, text in BROKEN_YAML.items():
        (root / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / name).write_text(text)
    write_fake_cifar100(root / "cifar")
    write_jpeg_tree(root / "tree", {"train": 2, "val": 1})
    return {"conf": root / "conf", "cifar": root / "cifar", "tree": root / "tree",
            "missing": root / "no-such-folder"}


def files_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def fill(argv: Tuple[str, ...], paths: Dict[str, Path]) -> List[str]:
    filled = []
    for arg in argv:
        for name, path in paths.items():
            arg = arg.replace("{" + name + "}", str(path))
        filled.append(arg)
    return filled


def one_error_line(stderr: str) -> str:
    """The error line of ``stderr``, which must hold just it and the line saying nothing
    started (argparse's refusals: its usage line, then the error)."""
    lines = stderr.strip().splitlines()
    if lines and lines[0].startswith("usage:"):
        assert len(lines) == 2 and lines[1].startswith("kdflow"), stderr
        return lines[1]
    assert len(lines) == 2 and lines[0].startswith("kdflow: error: "), stderr
    assert lines[1] in ("No job was started.", "Nothing was written."), stderr
    return lines[0]


@pytest.mark.parametrize("bad", ROWS, ids=[r.id for r in ROWS])
@pytest.mark.slow
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(bad, inputs, tmp_path, capsys):
    out = tmp_path / "outputs"
    data_files = {name: files_under(inputs[name]) for name in ("cifar", "tree")}
    argv = fill(bad.argv, {**inputs, "out": out})
    if argv[0] != "data":
        argv.append(f"output_dir={out}")
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses unknown flags this way
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}\n{captured.out}\n{captured.err}"
    assert "Traceback" not in captured.out + captured.err
    line = one_error_line(captured.err)
    assert f"`{bad.field}`" in line or f" {bad.field}" in line, line
    if line.startswith("kdflow: error: Invalid setting"):
        assert "Fix:" in line or "Allowed values:" in line, f"no fix or allowed values: {line}"
    assert files_under(out) == [], "a refused command wrote under output_dir"
    assert {name: files_under(inputs[name]) for name in data_files} == data_files


def test_the_table_covers_every_kind_of_bad_input():
    kinds = {bad.kind for bad in ROWS}
    assert len(ROWS) >= 30 and len({bad.argv for bad in ROWS}) == len(ROWS)
    assert {"unknown", "type", "range", "missing", "conflict", "yaml", "override",
            "search"} <= kinds


@pytest.mark.parametrize("argv, field", [
    (["run", "study.seeds=abc"], "study.seeds"),
    (["run", "=5"], "=5"),
    (["data", "prepare", "mnist"], "dataset"),
])
@pytest.mark.slow
def test_the_console_script_prints_one_line_and_exits_2(argv, field, tmp_path):
    """The installed ``kdflow`` script, as a user runs it: exit status 2, one error line plus
    the line saying nothing started (or was written), nothing else on stderr."""
    script = Path(sys.executable).parent / "kdflow"
    extra = [] if argv[0] == "data" else [f"output_dir={tmp_path / 'outputs'}"]
    proc = subprocess.run([str(script), *argv, *extra], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"kdflow: error: Invalid setting `{field}`"), line
    assert files_under(tmp_path) == []
