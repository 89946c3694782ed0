"""A job on .beton files run by two real Gloo ranks, each decoding only its rows."""
from __future__ import annotations

import json
from pathlib import Path

from datafiles import write_jpeg_tree
from multiprocess import WORKER, WORLD, launch_ranks, wait_ranks
from kdflow.orchestrator.data import validate_dataset
from kdflow.orchestrator.data.prepare import image_settings, prepare
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study


def test_two_ranks_train_a_job_from_betons(tmp_path: Path) -> None:
    data = tmp_path / "tree"
    write_jpeg_tree(data, {"train": 12, "val": 4}, classes=("a", "b", "c"), size=(40, 40),
                    smooth=True)
    cfg = validate_dataset("imagefolder", {"root": str(data)}, "d")
    prepare("imagefolder", cfg, image_settings("imagefolder", {}), workers=2, say=lambda _: None)
    recipe = {"epochs": 2, "batch_size": 8, "lr": 0.05, "lr_milestones": [],
              "checkpoint_every_steps": 100, "device": "cpu"}
    graph = expand_study({
        "name": "ffcv-ddp", "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
        "datasets": {"imagefolder": {"root": str(data), "loader": "ffcv", "image_size": 32,
                                     "workers": 1}},
        "seeds": [0], "teacher_seed": 0, "teacher_recipe": recipe, "student_recipe": recipe,
        "methods": {"vanilla": {}}})
    job = next(j for j in graph.jobs if j.method == "vanilla" and j.stage == "distill")
    store = JobStore(tmp_path / "two" / "jobs")
    store.add(job)
    wait_ranks(launch_ranks(WORKER, str(tmp_path / "two"), job.job_id, str(tmp_path)), 300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert "result" in ranks[0] and ranks[0] == ranks[1], ranks
    two = ranks[0]["result"]
    assert two["world_size"] == 2 and len(two["history"]) == 2

    state = store.state(job.job_id)
    assert state.status == "done" and state.attempts == 1
    assert all(0 <= epoch["val/top1"] <= 100 for epoch in two["history"])
