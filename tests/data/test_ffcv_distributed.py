"""A job on .beton files run by two real Gloo ranks, each decoding only its rows."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from datafiles import write_jpeg_tree
from multiprocess import WORLD, launch_ranks, wait_ranks
from kdflow.orchestrator.data import validate_dataset
from kdflow.orchestrator.data.loaders import local_rows
from kdflow.orchestrator.data.prepare import image_settings, prepare
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

#: ``python -c RECORDING_WORKER root job_id out rank``: runs the job as one rank and writes
#: ``out/rank<rank>.json``: its result and what this rank computed itself, before anything is
#: summed or broadcast: the sample ids of its training rows (per epoch and step), its own
#: top-1 / top-5 / sample counts of each evaluation next to their sum over the ranks, and a
#: digest of the weights it ends with.
RECORDING_WORKER = textwrap.dedent("""
    import hashlib, json, sys, torch
    torch.set_num_threads(1)
    import kdflow.orchestrator.runner as runner
    import kdflow.orchestrator.training as training
    from kdflow.orchestrator.distributed import detect_env
    from kdflow.orchestrator.metrics import ClassificationMetrics
    root, job_id, out, rank = sys.argv[1:5]
    seen = {"train": [], "eval": [], "weights": None}

    build_data = training.build_data
    def recording_build_data(*args, **kwargs):
        data = build_data(*args, **kwargs)
        batches = data.train.batches
        def recorded(epoch, start_step=0, shard=(0, 1)):
            for step, batch in enumerate(batches(epoch, start_step, shard), start=start_step):
                seen["train"].append([epoch, step, batch.index.tolist()])
                yield batch
        data.train.batches = recorded
        return data
    training.build_data = recording_build_data

    update, result = ClassificationMetrics.update, ClassificationMetrics.result
    def recording_update(self, logits, y):
        update(self, logits, y)
        self.local = self.counts.clone()  # before evaluate sums the counts in place
    def recording_result(self, counts):
        local = getattr(self, "local", torch.zeros_like(counts))
        seen["eval"].append({"local": local.tolist(), "summed": counts.tolist()})
        return result(self, counts)
    ClassificationMetrics.update, ClassificationMetrics.result = recording_update, recording_result

    require_finite_result = training._require_finite_result
    def recording_finite_result(metrics, weights, ranks, where):
        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode() + weights[name].cpu().numpy().tobytes())
        seen["weights"] = digest.hexdigest()
        return require_finite_result(metrics, weights, ranks, where)
    training._require_finite_result = recording_finite_result

    outcome = {"result": runner.run_job_in_store(
        root, job_id, runner.RunOptions(progress=False, distributed=detect_env())), **seen}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(outcome, f)
""")

TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES, BATCH = 12, 4, ("a", "b", "c"), 8


def test_two_ranks_train_a_job_from_betons(tmp_path: Path) -> None:
    """Each rank trains on its own rows of every global batch (together: every sample once
    per epoch) and evaluates its own val batches; the metrics are the sums of the ranks' own
    counts, and the ranks end with the same weights without any broadcast of them."""
    data = tmp_path / "tree"
    write_jpeg_tree(data, {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS}, classes=CLASSES,
                    size=(40, 40), smooth=True)
    cfg = validate_dataset("imagefolder", {"root": str(data)}, "d")
    prepare("imagefolder", cfg, image_settings("imagefolder", {}), workers=2, say=lambda _: None)
    recipe = {"epochs": 2, "batch_size": BATCH, "lr": 0.05, "lr_milestones": [],
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
    wait_ranks(launch_ranks(RECORDING_WORKER, str(tmp_path / "two"), job.job_id, str(tmp_path)),
               300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    two = ranks[0]["result"]
    assert ranks[1]["result"] == two
    assert two["world_size"] == 2 and len(two["history"]) == 2

    num_train = TRAIN_PER_CLASS * len(CLASSES)
    steps = -(-num_train // BATCH)
    for epoch in range(2):
        rows = [{step: ids for e, step, ids in rank["train"] if e == epoch} for rank in ranks]
        assert [sorted(r) for r in rows] == [list(range(steps))] * WORLD
        for step in range(steps):
            size = min(BATCH, num_train - step * BATCH)
            for r in range(WORLD):
                part = local_rows(size, r, WORLD)
                assert len(rows[r][step]) == part.stop - part.start
            assert not set(rows[0][step]) & set(rows[1][step])
        epoch_ids = sorted(i for r in rows for ids in r.values() for i in ids)
        assert epoch_ids == list(range(num_train))  # every sample once, split between ranks

    num_val = VAL_PER_CLASS * len(CLASSES)
    assert [len(rank["eval"]) for rank in ranks] == [2, 2]  # one evaluation per epoch
    for epoch, (zero, one) in enumerate(zip(ranks[0]["eval"], ranks[1]["eval"])):
        assert zero["local"][2] == BATCH and one["local"][2] == num_val - BATCH  # own batches
        summed = [a + b for a, b in zip(zero["local"], one["local"])]
        assert zero["summed"] == one["summed"] == summed
        assert two["history"][epoch]["val/top1"] == 100.0 * summed[0] / num_val
    assert ranks[0]["weights"] == ranks[1]["weights"]

    state = store.state(job.job_id)
    assert state.status == "done" and state.attempts == 1
