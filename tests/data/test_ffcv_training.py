"""A demo-sized ImageNet study trained one epoch from .beton files through `kdflow run`."""
from __future__ import annotations

import json
from pathlib import Path

from datafiles import write_jpeg_tree
from kdflow.launch.cli import main


def test_imagenet_study_runs_one_epoch_from_betons(tmp_path: Path, capsys) -> None:
    data = tmp_path / "imagenet"
    write_jpeg_tree(data, {"train": 16, "val": 6}, classes=("a", "b", "c"), size=(48, 40),
                    smooth=True)
    assert main(["data", "prepare", "imagefolder", f"data.root={data}"]) == 0
    recipe = ("{epochs: 1, batch_size: 16, lr: 0.05, lr_milestones: [], amp: none, "
              "device: cpu, checkpoint_every_steps: 2}")
    code = main(["run", "study=imagenet_baselines", f"data.root={data}", "data.loader=ffcv",
                 f"output_dir={tmp_path / 'out'}", "progress=false",
                 "study.datasets.imagefolder={image_size: 32, workers: 1, num_classes: 0}",
                 f"study.teacher_recipe={recipe}", f"study.student_recipe={recipe}",
                 "study.methods.crd.num_negatives=16"])
    out = capsys.readouterr().out
    assert code == 0, out
    jobs = sorted((tmp_path / "out" / "jobs").iterdir())
    assert len(jobs) == 4  # the teacher, then vanilla, KD and CRD students
    for job in jobs:
        spec = json.loads((job / "spec.json").read_text())
        assert spec["dataset_cfg"]["loader"] == "ffcv"
        result = json.loads((job / "result.json").read_text())
        assert len(result["history"]) == 1 and 0 <= result["metrics"]["top1"] <= 100
    report = (tmp_path / "out" / "reports" / "imagenet_baselines" / "report.md").read_text()
    assert "| KD |" in report and "resnet34 → resnet18 (imagefolder)" in report
