"""`kdflow data prepare`: real JPEG trees and CIFAR pickles written as FFCV .beton files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datafiles import write_fake_cifar100, write_jpeg_tree
from kdflow.launch.cli import main
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.data import validate_dataset
from kdflow.orchestrator.data.beton import read_manifest
from kdflow.orchestrator.data.prepare import PrepareError, image_settings, prepare

FIELD = "study.datasets.imagefolder"
REPO = str(Path(__file__).resolve().parents[2])


def _folder(root: Path, dataset: str = "imagefolder") -> Path:
    return root / "ffcv" / dataset


def test_prepare_writes_both_splits_keeps_them_and_force_rewrites(tmp_path: Path, capsys) -> None:
    write_jpeg_tree(tmp_path, {"train": 6, "val": 3}, classes=("a", "b", "c"))
    assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path}",
                 "prepare.write_mode=jpg", "prepare.max_side=32"]) == 0
    folder = _folder(tmp_path)
    manifests = {s: read_manifest(str(folder), s) for s in ("train", "val")}
    assert manifests["train"].num_samples == 18 and manifests["val"].num_samples == 9
    assert manifests["train"].classes == ["a", "b", "c"]
    assert manifests["train"].image == {"write_mode": "jpg", "max_side": 32, "jpeg_quality": 90,
                                        "compress_probability": 0.5}
    assert sorted(os.listdir(folder)) == ["train.beton", "train.beton.json", "val.beton",
                                          "val.beton.json"]  # no partial files left
    written = {p: os.stat(folder / p).st_mtime_ns for p in ("train.beton", "val.beton")}
    capsys.readouterr()

    assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path}",
                 "prepare.write_mode=jpg", "prepare.max_side=32"]) == 0
    assert capsys.readouterr().out.count("kept") == 2
    assert {p: os.stat(folder / p).st_mtime_ns for p in written} == written

    assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path}",
                 "prepare.write_mode=jpg", "prepare.max_side=32", "--force"]) == 0
    assert all(os.stat(folder / p).st_mtime_ns != t for p, t in written.items())

    # other settings are another file: the split is written again
    assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path}",
                 "prepare.write_mode=raw"]) == 0
    assert read_manifest(str(folder), "train").image["write_mode"] == "raw"


def test_an_unreadable_image_fails_the_split_and_keeps_what_was_written(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path, {"train": 4, "val": 2})
    cfg = validate_dataset("imagefolder", {"root": str(tmp_path)}, FIELD)
    settings = image_settings("imagefolder", {"write_mode": "raw"})
    prepare("imagefolder", cfg, settings, workers=2, say=lambda _: None)
    folder = _folder(tmp_path)
    before = (folder / "train.beton").read_bytes()
    broken = tmp_path / "train" / "dog" / "2.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")

    with pytest.raises(PrepareError) as err:
        prepare("imagefolder", cfg, settings, workers=2, force=True, say=lambda _: None)
    message = str(err.value)
    assert "1 of 8 images" in message and str(broken) in message and "Fix:" in message
    assert (folder / "train.beton").read_bytes() == before  # the finished file is untouched
    assert sorted(os.listdir(folder)) == ["train.beton", "train.beton.json", "val.beton",
                                          "val.beton.json"]


def test_bad_trees_and_settings_are_refused_before_anything_is_written(tmp_path: Path,
                                                                        capsys) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "prepare.dataset.root" in err and "no image files" in err
    assert "Nothing was written." in err
    write_jpeg_tree(tmp_path / "ok", {"train": 1, "val": 1})
    for override, field in (("prepare.write_mode=png", "prepare.write_mode"),
                            ("prepare.jpeg_quality=101", "prepare.jpeg_quality"),
                            ("prepare.workers=0", "prepare.workers")):
        assert main(["data", "prepare", "imagefolder", f"data.root={tmp_path / 'ok'}",
                     override]) == 2
        assert f"`{field}`" in capsys.readouterr().err
    assert main(["data", "prepare", "digits"]) == 2
    assert "Allowed values: cifar10, cifar100, imagefolder" in capsys.readouterr().err
    assert not (tmp_path / "ok" / "ffcv").exists()


def test_cifar_pickles_become_raw_betons(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path, n_train=20, n_test=10)
    assert main(["data", "prepare", "cifar100", f"data.root={tmp_path}"]) == 0
    manifest = read_manifest(str(_folder(tmp_path, "cifar100")), "train")
    assert manifest.num_samples == 20 and len(manifest.classes) == 100
    assert manifest.image["write_mode"] == "raw"


def test_ffcv_loader_needs_betons(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path, {"train": 1, "val": 1})
    settings = {"root": str(tmp_path), "loader": "ffcv"}
    with pytest.raises(ConfigError) as err:
        validate_dataset("imagefolder", settings, FIELD)
    assert f"`{FIELD}.beton_dir`" in str(err.value)
    assert "kdflow data prepare imagefolder" in str(err.value)
    with pytest.raises(ConfigError, match="Allowed values: torchvision, ffcv"):
        validate_dataset("imagefolder", {**settings, "loader": "dali"}, FIELD)

    write_fake_cifar100(tmp_path / "c", n_train=4, n_test=4)
    assert main(["data", "prepare", "cifar100", f"data.root={tmp_path / 'c'}"]) == 0
    with pytest.raises(ConfigError, match="holds dataset 'cifar100', not 'imagefolder'"):
        validate_dataset("imagefolder", {**settings, "beton_dir": str(tmp_path / "c" / "ffcv" /
                                                                    "cifar100")}, FIELD)



#: A stand-in ``ffcv`` package first on PYTHONPATH, failing as an install whose system
#: libraries went missing does.
BROKEN_FFCV = 'raise ImportError("libturbojpeg.so.0: cannot open shared object file")\n'


def test_without_a_working_ffcv_the_loader_is_refused_in_one_line(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path / "tree", {"train": 1, "val": 1})
    (tmp_path / "shadow" / "ffcv").mkdir(parents=True)
    (tmp_path / "shadow" / "ffcv" / "__init__.py").write_text(BROKEN_FFCV)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), REPO])}
    run = ["run", "study=imagenet_baselines", f"data.root={tmp_path / 'tree'}",
           f"output_dir={tmp_path / 'out'}", "--dry-run"]
    refused = subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *run, "data.loader=ffcv"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    error = [line for line in refused.stderr.splitlines() if line.startswith("kdflow: error")]
    assert len(error) == 1 and "`study.datasets.imagefolder.loader`" in error[0]
    assert "libturbojpeg.so.0" in error[0] and "make ffcv" in error[0]
    assert "No job was started." in refused.stderr
    default = subprocess.run([sys.executable, "-m", "kdflow.launch.cli", *run], env=env,
                             capture_output=True, text=True, timeout=300)
    assert default.returncode == 0, default.stderr  # the torchvision loader stays usable
    assert "4 pending" in default.stdout
