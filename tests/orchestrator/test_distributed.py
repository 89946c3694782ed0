"""Multi-process jobs: where a process sits (launcher variables), and real 2-process Gloo runs
of the collectives (one step's gradient against one process's) and of ``run_job`` (training,
the ranks' agreement, bit-identical repeats, preemption of a single rank, resume)."""
from __future__ import annotations

import json
import pickle
import shutil
import signal
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from multiprocess import WORKER, WORLD, launch_ranks, wait_ranks
from kdflow.orchestrator.data.loaders import local_rows
from kdflow.orchestrator.distributed import (DistEnv, Ranks, detect_env, env_from_slurm,
                                             env_from_torchrun, first_host)
from kdflow.orchestrator.runner import JobInterrupted, RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study


# --- where a process sits ----------------------------------------------------------------


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"),
    ("node[01-04,07]", "node01"),
    ("node[07,01-04]", "node07"),
    ("a1,b2", "a1"),
    ("gpu[3-4],cpu[1-2]", "gpu3"),
    ("rack[2-3]-n[05-06]", "rack2-n05"),
])
def test_first_host_of_slurm_node_lists(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_variables_give_rank_world_and_rendezvous():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_ID": "123456"}
    assert env_from_slurm(environ) == DistEnv(rank=5, world_size=8, local_rank=1,
                                              master_addr="gpu07", master_port=20000 + 3456)
    assert env_from_slurm({**environ, "SLURM_NODELIST": "cpu1", "SLURM_JOB_NODELIST": "cpu1",
                           "MASTER_PORT": "29999"}).master_port == 29999
    assert env_from_slurm({**environ, "SLURM_PROCID": "0"}).is_main
    assert not env_from_slurm(environ).is_main
    assert env_from_slurm({**environ, "SLURM_NTASKS": "1"}) is None
    assert env_from_slurm({k: v for k, v in environ.items() if k != "SLURM_NTASKS"}) is None


def test_torchrun_variables_and_detection_order():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400"}
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
             "SLURM_JOB_ID": "7"}
    expected = DistEnv(rank=3, world_size=4, local_rank=1, master_addr="10.0.0.2",
                       master_port=29400)
    assert env_from_torchrun(torchrun) == expected
    assert env_from_torchrun({**torchrun, "WORLD_SIZE": "1"}) is None
    assert env_from_torchrun({}) is None
    assert detect_env({**torchrun, **slurm}) == expected  # torchrun's variables win
    assert detect_env(slurm) == DistEnv(0, 2, 0, "n1", 20007)
    assert detect_env({}) is None


def test_local_rows_split_a_batch_into_contiguous_near_equal_slices():
    for size, world in [(32, 2), (29, 2), (10, 3), (8, 8)]:
        rows = [local_rows(size, r, world) for r in range(world)]
        assert [s.start for s in rows] == [0] + [s.stop for s in rows[:-1]]
        assert rows[-1].stop == size
        assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


def test_batches_too_small_for_the_world_are_refused():
    ranks = Ranks(DistEnv(0, 2, 0, "127.0.0.1", 1))
    ranks.check_batches(num_samples=34, batch_size=32)  # last batch: 2 samples, one per rank
    with pytest.raises(ValueError, match="cannot be split over 2 processes"):
        ranks.check_batches(num_samples=33, batch_size=32)
    Ranks(None).check_batches(num_samples=33, batch_size=32)  # alone, anything goes


def test_job_interrupted_keeps_its_signal_across_processes():
    err = pickle.loads(pickle.dumps(JobInterrupted("signal 12 at step 3", signal.SIGUSR2)))
    assert str(err) == "signal 12 at step 3" and err.signum == signal.SIGUSR2


# --- real process groups -----------------------------------------------------------------


COLLECTIVES = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from kdflow.orchestrator.data.loaders import local_rows
    from kdflow.orchestrator.distributed import (all_reduce_gradients, average_running_stats,
                                                 broadcast_from_main, detect_env, process_group)
    torch.set_num_threads(1)
    env = detect_env()
    torch.manual_seed(0)  # the same model and global batch on both ranks
    model = torch.nn.Linear(4, 3)
    unused = torch.nn.Parameter(torch.zeros(2))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    full = F.cross_entropy(model(x), y)
    expected = torch.autograd.grad(full, list(model.parameters()))
    rows = local_rows(5, env.rank, env.world_size)  # 3 samples on rank 0, 2 on rank 1
    n = rows.stop - rows.start
    loss = F.cross_entropy(model(x[rows]), y[rows])
    loss.backward()
    local = [p.grad.clone() for p in model.parameters()]
    shared = torch.full((3,), float(env.rank + 1))
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(env.rank)
    norm.running_var.fill_(1 + 2 * env.rank)
    with process_group(env, torch.device("cpu")):
        sums, signals = all_reduce_gradients([*model.parameters(), unused], share=n / 5,
                                             received=[12] if env.rank == 1 else [],
                                             stats=loss.detach().reshape(1) * n)
        reduced = [p.grad.tolist() for p in model.parameters()]
        _, unread = all_reduce_gradients(list(model.parameters()), share=n / 5,
                                         received=[12] if env.rank == 1 else [],
                                         read_signals=False)
        broadcast_from_main([shared])
        average_running_stats([norm], env.world_size)
    json.dump({
        "local": [g.tolist() for g in local],
        "reduced": reduced, "unread": unread,
        "max_error": max((p.grad - e).abs().max().item()
                         for p, e in zip(model.parameters(), expected)),
        "sums": sums.tolist(), "full_sum": full.item() * 5, "signals": signals,
        "unused_grad": unused.grad is not None, "shared": shared.tolist(),
        "norm": [norm.running_mean.tolist(), norm.running_var.tolist()],
    }, open(sys.argv[1] + f"/rank{env.rank}.json", "w"))
""")


@pytest.mark.slow
def test_collectives_average_gradients_by_share_and_agree_on_state(tmp_path):
    wait_ranks(launch_ranks(COLLECTIVES, str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["local"] != ranks[1]["local"]  # the ranks held different gradients...
    assert ranks[0]["reduced"] == ranks[1]["reduced"]  # ...and now hold the same one,
    for rank in ranks:  # the gradient of the mean loss over all 5 samples (3 + 2 weighted)
        assert rank["max_error"] < 1e-6
        assert rank["sums"] == pytest.approx([rank["full_sum"]], rel=1e-6)
        assert rank["signals"] == [12]  # only rank 1 was signalled
        assert rank["unread"] == []  # a step that does not read the flags returns none
        assert rank["unused_grad"] is False  # a parameter without a gradient keeps none
        assert rank["shared"] == [1.0, 1.0, 1.0]  # rank 0's values
        assert rank["norm"] == [[0.5, 0.5], [2.0, 2.0]]  # averages of 0 and 1, 1 and 3


#: Each rank takes its rows of one global batch of 29 digits (15 and 14 of them) from the real
#: loader, runs the zoo's resnet8 in float64 with BatchNorm in eval mode (so a sample's loss
#: does not depend on the other rows of its slice) and averages its gradient with
#: ``Ranks.reduce_step`` as the runner does; it also computes the whole batch's gradient alone.
ONE_STEP = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from kdflow.methods.models import build_model
    from kdflow.orchestrator.data import build_data
    from kdflow.orchestrator.distributed import Ranks, detect_env, process_group
    torch.set_num_threads(1)
    env = detect_env()
    ranks = Ranks(env)
    data = build_data("digits", {}, "dataset_cfg", 29, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("resnet8", 10).double().eval()
    params = list(model.parameters())
    def gradient(batch):
        loss = F.cross_entropy(model(batch.x.double()), batch.y)
        return loss, torch.autograd.grad(loss, params)
    full_loss, full = gradient(next(data.train.batches(0)))
    mine = next(data.train.batches(0, shard=ranks.part))
    loss, local = gradient(mine)
    for p, g in zip(params, local):
        p.grad = g.clone()
    rows = len(mine.y)
    with process_group(env, torch.device("cpu")):
        sums, _ = ranks.reduce_step(params, {"loss": loss.detach() * rows}, rows / 29, [])
    torch.save({"rows": rows, "local": local, "reduced": [p.grad for p in params],
                "full": full, "sum": sums["loss"], "full_sum": full_loss.detach() * 29},
               sys.argv[1] + f"/rank{env.rank}.pt")
""")


@pytest.mark.slow
def test_one_step_on_two_ranks_has_the_gradient_of_the_whole_batch(tmp_path):
    wait_ranks(launch_ranks(ONE_STEP, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [rank["rows"] for rank in ranks] == [15, 14]
    assert not torch.equal(ranks[0]["local"][0], ranks[1]["local"][0])
    for reduced, other in zip(ranks[0]["reduced"], ranks[1]["reduced"]):
        assert torch.equal(reduced, other)  # bit for bit: nothing was broadcast
    for rank in ranks:
        for reduced, full in zip(rank["reduced"], rank["full"]):
            assert reduced.dtype == torch.float64
            torch.testing.assert_close(reduced, full, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(rank["sum"], rank["full_sum"], rtol=1e-12, atol=0)


# --- run_job on two ranks ------------------------------------------------------------------

RECIPE: Dict[str, Any] = {"batch_size": 32, "lr": 0.05, "checkpoint_every_steps": 10,
                          "device": "cpu"}
#: 5 epochs of KD on digits (1,437 train images: 45 steps of 32, the last of 29, which splits
#: 15 / 14 over two ranks), reaching ~97% top-1 in ~5 s per run on one CPU thread.
STUDY: Dict[str, Any] = {
    "name": "dist", "datasets": {"digits": {}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}], "seeds": [0], "teacher_seed": 0,
    "teacher_recipe": {**RECIPE, "epochs": 3, "lr_milestones": [2]},
    "student_recipe": {**RECIPE, "epochs": 5, "lr_milestones": [4]},
    "methods": {"kd": {}},
}
#: ``python -c RECORDING root job_id out rank``: WORKER, which also keeps what this rank itself
#: computed before anything of rank 0's reached it: ``own`` in ``out/rank<rank>.json`` (the
#: result it passed to the final broadcast) and ``out/rank<rank>.pt`` (its trainable state after
#: the last epoch's BatchNorm averaging: no step changes it after that).
RECORDING = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from kdflow.orchestrator.distributed import Ranks, detect_env
    from kdflow.orchestrator.runner import RunOptions, run_job_in_store
    root, job_id, out, rank = sys.argv[1:5]
    own = {}
    average_norms, from_main = Ranks.average_norms, Ranks.from_main
    def record_norms(self, modules):
        average_norms(self, modules)
        own["state"] = {k: v.clone() for k, v in modules[0].state_dict().items()
                        if not k.startswith("teacher.")}
    def record_result(self, obj):
        if isinstance(obj, dict) and "history" in obj:
            own["result"] = json.loads(json.dumps(obj))
        return from_main(self, obj)
    Ranks.average_norms, Ranks.from_main = record_norms, record_result
    result = run_job_in_store(root, job_id, RunOptions(progress=False, distributed=detect_env()))
    torch.save(own["state"], f"{out}/rank{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"result": result, "own": own["result"]}, f)
""")
#: Fields of a result that are not computed by training: rank 0 alone records provenance.
NOT_TRAINED = ("wall_time_s", "provenance")


@pytest.fixture(scope="module")
def digits_kd(tmp_path_factory):
    """(teacher job, KD job, store holding the trained teacher)."""
    graph = expand_study(STUDY)
    teacher = next(j for j in graph.jobs if j.stage == "teacher")
    job = next(j for j in graph.jobs if j.stage == "distill")
    store = JobStore(tmp_path_factory.mktemp("teacher") / "jobs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(teacher, store, RunOptions(progress=False))
    finally:
        torch.set_num_threads(threads)
    return teacher, job, store


def _store_with_teacher(digits_kd, root: Path) -> JobStore:
    teacher, job, source = digits_kd
    shutil.copytree(source.job_dir(teacher.job_id), root / "jobs" / teacher.job_id)
    store = JobStore(root / "jobs")
    store.add(job)  # every rank reads the spec at start
    return store


def _outcomes(folder: Path) -> List[Dict[str, Any]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _run_two_ranks(digits_kd, root: Path) -> JobStore:
    """Run the KD job on two ranks (RECORDING) in a fresh store under ``root``."""
    store = _store_with_teacher(digits_kd, root)
    wait_ranks(launch_ranks(RECORDING, str(root), digits_kd[1].job_id, str(root)))
    return store


def _own(folder: Path) -> List[Dict[str, Any]]:
    """Each rank's own result and trainable state, from before the final broadcast."""
    return [{"result": json.loads((folder / f"rank{r}.json").read_text())["own"],
             "state": torch.load(folder / f"rank{r}.pt")} for r in range(WORLD)]


def _trained(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in result.items() if k not in NOT_TRAINED}


@pytest.fixture(scope="module")
def two_process_run(digits_kd, tmp_path_factory):
    """The KD job run uninterrupted by two ranks: (its store, each rank's outcome, the folder
    of what each rank computed itself)."""
    root = tmp_path_factory.mktemp("two")
    store = _run_two_ranks(digits_kd, root)
    return store, _outcomes(root), root


@pytest.mark.slow
def test_two_processes_train_the_job_and_agree_before_any_broadcast(digits_kd, two_process_run):
    _, job, _ = digits_kd
    store, (rank0, rank1), folder = two_process_run
    assert rank0["result"] == rank1["result"] == store.result(job.job_id)  # rank 0 wrote it
    state = store.state(job.job_id)
    assert state.status == "done" and state.attempts == 1
    assert rank0["result"]["world_size"] == 2 and len(rank0["result"]["history"]) == 5
    assert rank0["result"]["metrics"]["top1"] > 90.0
    # What rank 1 computed itself (rank 0's result reaches it only at the end) is rank 0's:
    # the same all-reduced gradient, step after step, gives bit-identical weights.
    own0, own1 = _own(folder)
    assert _trained(own0["result"]) == _trained(own1["result"]) == _trained(rank0["result"])
    assert own0["state"].keys() == own1["state"].keys()
    assert all(torch.equal(own0["state"][k], own1["state"][k]) for k in own0["state"])
    exported = torch.load(store.weights_path(job.job_id))
    assert all(torch.equal(exported[k], own0["state"][f"student.{k}"]) for k in exported)


@pytest.mark.slow
def test_a_repeated_two_process_run_is_bit_identical(digits_kd, two_process_run, tmp_path):
    _, job, _ = digits_kd
    first_store, (first, _), first_folder = two_process_run
    store = _run_two_ranks(digits_kd, tmp_path)
    again, _ = _outcomes(tmp_path)
    assert _trained(again["result"]) == _trained(first["result"])
    reference, repeated = torch.load(first_store.weights_path(job.job_id)), torch.load(
        store.weights_path(job.job_id))
    assert reference.keys() == repeated.keys()
    assert all(torch.equal(reference[k], repeated[k]) for k in reference)
    for mine, before in zip(_own(tmp_path), _own(first_folder)):
        assert all(torch.equal(mine["state"][k], before["state"][k]) for k in mine["state"])


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_at_one_step_and_the_job_resumes(
        digits_kd, two_process_run, tmp_path):
    _, job, _ = digits_kd
    store = _store_with_teacher(digits_kd, tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    procs = launch_ranks(WORKER, str(tmp_path), job.job_id, str(first))
    ckpts = store.checkpoint_dir(job.job_id)
    deadline = time.time() + 120
    while not any(ckpts.glob("step-*.pt")) and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGUSR2)  # rank 1 only
    wait_ranks(procs)
    rank0, rank1 = _outcomes(first)
    assert rank0.get("error") == rank1.get("error") == "JobInterrupted", (rank0, rank1)
    assert rank1["message"].startswith(f"signal {int(signal.SIGUSR2)} at step ")
    assert rank0["message"].startswith(f"signal {int(signal.SIGUSR2)} to another rank at step ")
    assert rank0["signum"] == rank1["signum"] == signal.SIGUSR2
    step = int(rank0["message"].rsplit(" ", 1)[1])
    assert int(rank1["message"].rsplit(" ", 1)[1]) == step  # both stopped after the same step
    assert step < 5 * 45, "the job finished before it could be signalled"
    latest = torch.load(max(ckpts.glob("step-*.pt")), weights_only=False)
    assert latest["progress"]["global_step"] == step  # rank 0 saved where they stopped
    assert store.state(job.job_id).status == "interrupted"

    wait_ranks(launch_ranks(WORKER, str(tmp_path), job.job_id, str(second)))
    rank0, rank1 = _outcomes(second)
    assert rank0["result"] == rank1["result"] == store.result(job.job_id)
    assert store.state(job.job_id).status == "done" and store.state(job.job_id).attempts == 2
    # The resumed ranks took the same optimizer steps as the uninterrupted ones: identical
    # weights. (Only BatchNorm's running statistics differ: both ranks resumed from rank 0's.)
    resumed = torch.load(store.weights_path(job.job_id))
    reference = torch.load(two_process_run[0].weights_path(job.job_id))
    learned = [k for k in reference if not k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(resumed[k], reference[k]) for k in learned)
