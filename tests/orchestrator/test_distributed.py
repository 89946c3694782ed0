"""Multi-process jobs: where a process sits (launcher variables), and real 2-process Gloo runs
of the collectives and of ``run_job`` (training, agreement with one process, preemption of a
single rank, resume)."""
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
from orchestrator.data.loaders import local_rows
from orchestrator.distributed import (DistEnv, Ranks, detect_env, env_from_slurm,
                                      env_from_torchrun, first_host)
from orchestrator.runner import JobInterrupted, RunOptions, run_job
from orchestrator.store import JobStore
from orchestrator.study import expand_study


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
    from orchestrator.data.loaders import local_rows
    from orchestrator.distributed import (all_reduce_gradients, average_running_stats,
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
#: Two ranks normalise BatchNorm over half batches, so they do not reproduce one process bit
#: for bit. Measured over seeds 0-9 of this job, the final top-1 of the two runs differed by
#: 0-1.1 points (0-4 of the 360 validation images; seed 0: 0.3), about the spread of the
#: single-process runs over those seeds (96.7-97.8%); 3 points leaves ~3x margin.
TOP1_TOLERANCE = 3.0



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


@pytest.fixture(scope="module")
def two_process_run(digits_kd, tmp_path_factory):
    """The KD job run uninterrupted by two ranks: (its store, each rank's outcome)."""
    root = tmp_path_factory.mktemp("two")
    store = _store_with_teacher(digits_kd, root)
    wait_ranks(launch_ranks(WORKER, str(root), digits_kd[1].job_id, str(root)))
    return store, _outcomes(root)


def test_two_processes_train_like_one(digits_kd, two_process_run, tmp_path):
    _, job, _ = digits_kd
    store, (rank0, rank1) = two_process_run
    assert "result" in rank0 and "result" in rank1, (rank0, rank1)
    assert rank0["result"] == rank1["result"] == store.result(job.job_id)  # rank 0 wrote it
    state = store.state(job.job_id)
    assert state.status == "done" and state.attempts == 1
    single = run_job(job, _store_with_teacher(digits_kd, tmp_path), RunOptions(progress=False))
    two = rank0["result"]
    assert len(two["history"]) == len(single["history"]) == 5
    assert two["metrics"]["top1"] > 90.0
    assert abs(two["metrics"]["top1"] - single["metrics"]["top1"]) <= TOP1_TOLERANCE


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
