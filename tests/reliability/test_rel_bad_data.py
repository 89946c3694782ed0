"""Bad data found mid-run (issue 18 item 6): a file that cannot be decoded fails the job with
one line naming the file, the cause and `kdflow data check`, whether it is decoded in the
main process or in a DataLoader worker, in training or in evaluation; that line is what
state.json records and what the local launcher prints."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from datafiles import write_fake_cifar100, write_fake_voc, write_jpeg_tree

from kdflow.launch.cli import main
from kdflow.orchestrator.data import DataError, build_data
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
CPU = torch.device("cpu")


def truncate(path: Path) -> Path:
    """Cut ``path`` to its first half (a download or copy that stopped); returns it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def assert_one_line_naming(message: str, path: Path, dataset: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("DataError: cannot read ") and str(path.resolve()) in message
    assert f"kdflow data check {dataset} " in message


def failed_teacher(study: Dict[str, Any], store: JobStore) -> str:
    """Run the study's teacher job, which must fail with DataError; its recorded error."""
    teacher = next(j for j in expand_study(study).jobs if j.stage == "teacher")
    with pytest.raises(DataError):
        run_job(teacher, store, QUIET)
    state = json.loads((store.job_dir(teacher.job_id) / "state.json").read_text())
    assert state["status"] == "failed"
    return state["error"]


@pytest.mark.parametrize("split,workers", [("train", 1), ("val", 0)])
@pytest.mark.slow
def test_truncated_jpeg_fails_the_job_naming_the_file(study, tmp_path: Path, split: str,
                                                      workers: int) -> None:
    """In a DataLoader worker while training, or in this process while evaluating."""
    write_jpeg_tree(tmp_path / "tree", {"train": 4, "val": 2})
    bad = truncate(tmp_path / "tree" / split / "dog" / "1.jpg")
    study["datasets"] = {"imagefolder": {"root": str(tmp_path / "tree"), "image_size": 16,
                                         "workers": workers}}
    study["teacher_recipe"].update(batch_size=4, epochs=1, lr_milestones=[])
    error = failed_teacher(study, JobStore(tmp_path / "jobs"))
    assert_one_line_naming(error, bad, "imagefolder")
    assert "image file is truncated" in error


def test_corrupt_cifar_pickle_fails_the_job_naming_the_file(study, tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    bad = truncate(tmp_path / "cifar-100-python" / "test")
    study["datasets"] = {"cifar100": {"root": str(tmp_path)}}
    error = failed_teacher(study, JobStore(tmp_path / "jobs"))
    assert_one_line_naming(error, bad, "cifar100")


@pytest.mark.slow
def test_data_prepare_names_the_corrupt_pickle(tmp_path: Path, capsys) -> None:
    write_fake_cifar100(tmp_path)
    bad = truncate(tmp_path / "cifar-100-python" / "train")
    assert main(["data", "prepare", "cifar100", f"data.root={tmp_path}"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("kdflow: error: ")
    assert_one_line_naming("DataError: " + line[len("kdflow: error: "):], bad, "cifar100")


def test_cifar_pickle_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    entry = pickle.loads(path.read_bytes())
    entry["data"] = entry["data"][:, :1000]
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError) as err:
        build_data("cifar100", {"root": str(tmp_path)}, "data", 8, 0, CPU)
    assert_one_line_naming(f"DataError: {err.value}", path, "cifar100")
    assert "pixel values for 40 labels" in str(err.value)


def test_truncated_voc_mask_in_a_worker_is_named(tmp_path: Path) -> None:
    write_fake_voc(tmp_path)
    bad = truncate(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_val001.png")
    data = build_data("voc", {"root": str(tmp_path), "crop_size": 16, "workers": 1}, "data",
                      2, 0, CPU)
    assert len(list(data.train.batches(0))) == 3  # the train split is intact
    with pytest.raises(DataError) as err:
        list(data.val.batches())
    assert_one_line_naming(f"DataError: {err.value}", bad, "voc")


@pytest.mark.slow
def test_local_launcher_prints_the_one_line(tmp_path: Path, capsys) -> None:
    """Through `kdflow run`: the jobs reading the tree fail with the line, the students of the
    teacher are blocked, no traceback is printed."""
    data = tmp_path / "imagenet"
    write_jpeg_tree(data, {"train": 4, "val": 2}, classes=("a", "b"))
    bad = truncate(data / "train" / "b" / "2.jpg")
    recipe = ("{epochs: 1, batch_size: 8, lr: 0.05, lr_milestones: [], amp: none, "
              "device: cpu, checkpoint_every_steps: 2}")
    code = main(["run", "study=imagenet_baselines", f"data.root={data}", "launcher.workers=1",
                 f"output_dir={tmp_path / 'out'}", "progress=false",
                 "study.datasets.imagefolder={image_size: 32, workers: 1, num_classes: 0}",
                 f"study.teacher_recipe={recipe}", f"study.student_recipe={recipe}"])
    captured = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in captured.out + captured.err
    failed = [line for line in captured.out.splitlines() if line.startswith("  failed ")]
    assert len(failed) == 2  # the teacher and the student trained alone
    for line in failed:
        assert_one_line_naming(line.split(": ", 1)[1], bad, "imagefolder")
