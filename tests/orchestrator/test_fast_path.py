"""The fast path: its switches, a step free of host synchronisation, and results that match
the plain path."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Dict, Iterator, Set

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import kdflow.orchestrator.training as training
from kdflow.methods.config import parse_config
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.checkpoint import read_sealed
from kdflow.methods.distillers import DISTILLERS, DataInfo
from kdflow.methods.distillers.vanilla import VanillaConfig
from kdflow.methods.models import build_model
from kdflow.orchestrator.fast_path import FastPath, build_optimizer, resolve_fast_path, step_forward
from kdflow.orchestrator.loss_guard import LossGuard
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.runner import RunOptions, run_job
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import expand_study

QUIET = RunOptions(progress=False)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

#: Tensor methods that read a value back to the host (a device synchronisation on a GPU) or
#: whose output size depends on the data (which needs one to allocate).
HOST_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                        "numpy", "cpu", "nonzero", "masked_select", "unique"})


class HostReads(TorchFunctionMode):
    """Counts the calls of :data:`HOST_READS` made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


class DeferredGuard(LossGuard):
    """The GPU behaviour of the loss guard (read before checkpoints and at epoch ends only)."""

    def __init__(self, next_step: int, device: torch.device) -> None:
        super().__init__(next_step, device)
        self.eager = False


@contextlib.contextmanager
def training_step_layouts() -> Iterator[Set[tuple]]:
    """Record, for every convolution run with autograd on while this is active (the training
    step's forwards; evaluation runs under no_grad and the teacher in inference mode), the
    dtype of its output and whether its input was laid out channels_last."""
    seen: Set[tuple] = set()

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d) and torch.is_grad_enabled():
            seen.add((output.dtype,
                      inputs[0].is_contiguous(memory_format=torch.channels_last)
                      and not inputs[0].is_contiguous()))

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def test_auto_switches_are_on_on_cuda_and_off_on_the_cpu() -> None:
    recipe = parse_config(Recipe, {"amp": "none"}, "recipe")
    assert resolve_fast_path(recipe, CPU) == FastPath(False, False, False, None)
    on_gpu = resolve_fast_path(recipe, CUDA)
    assert (on_gpu.channels_last, on_gpu.fused_optimizer, on_gpu.bf16) == (True, True, False)
    assert not resolve_fast_path(parse_config(Recipe, {}, "recipe"), CPU).bf16


def test_compile_mode_adds_cuda_graphs_on_cuda_only() -> None:
    recipe = parse_config(Recipe, {"compile": "default", "cuda_graphs": True}, "recipe")
    assert resolve_fast_path(recipe, CUDA).compile_mode == "reduce-overhead"
    assert resolve_fast_path(recipe, CPU).compile_mode == "default"
    tuned = parse_config(Recipe, {"compile": "max-autotune"}, "recipe")
    assert resolve_fast_path(tuned, CUDA).compile_mode == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("values, field, words", [
    ({"cuda_graphs": True}, "recipe.cuda_graphs", "compile: default"),
    ({"channels_last": "yes"}, "recipe.channels_last", "true, false or auto"),
    ({"fused_optimizer": 1}, "recipe.fused_optimizer", "true, false or auto"),
    ({"compile": "fast"}, "recipe.compile", "max-autotune"),
    ({"amp": "fp16"}, "recipe.amp", "bf16"),
])
def test_bad_switches_name_the_field_and_the_fix(values: Dict[str, Any], field: str,
                                                 words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(Recipe, values, "recipe")
    assert err.value.field == field
    assert words in str(err.value)


def test_new_switches_at_their_defaults_leave_job_ids_unchanged(study) -> None:
    (before,) = [j for j in expand_study(study).jobs if j.method == "kd"]
    study["student_recipe"].update(fused_optimizer="auto", compile="none", cuda_graphs=False)
    (after,) = [j for j in expand_study(study).jobs if j.method == "kd"]
    assert after.job_id == before.job_id
    study["student_recipe"].update(compile="default")
    (compiled,) = [j for j in expand_study(study).jobs if j.method == "kd"]
    assert compiled.job_id != before.job_id


def test_fused_optimizer_takes_the_same_steps_as_the_plain_one() -> None:
    torch.manual_seed(0)
    recipe = parse_config(Recipe, {"lr": 0.1, "nesterov": True}, "recipe")
    weights = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    plain = build_optimizer(weights, recipe, FastPath(False, False, False, None))
    fused = build_optimizer(copies, recipe, FastPath(False, False, True, None))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        for params, opt in ((weights, plain), (copies, fused)):
            opt.zero_grad()
            (params[0].sin().sum() * params[1].cos().sum()).backward()
            opt.step()
    for a, b in zip(weights, copies):
        torch.testing.assert_close(a, b)


def _host_reads_per_job(study: Dict[str, Any], num_train: int, tmp_path) -> Dict[str, Counter]:
    study["datasets"]["synthetic"]["num_train"] = num_train
    store = JobStore(tmp_path / str(num_train))
    counts = {}
    for job in expand_study(study).jobs:
        if job.stage == "teacher":
            run_job(job, store, QUIET)
            continue
        with HostReads() as reads:
            run_job(job, store, QUIET)
        counts[job.method] = reads.calls
    return counts


@pytest.mark.slow
def test_a_training_step_reads_nothing_back_to_the_host(study, tmp_path, monkeypatch) -> None:
    """With the GPU's deferred loss guard, a job of 4 steps and one of 8 steps per epoch read
    values back to the host equally often: no read belongs to a step (only to the epoch's end,
    the evaluation and the checkpoint)."""
    monkeypatch.setattr(training, "LossGuard", DeferredGuard)
    study["methods"] = {"vanilla": {}, "kd": {}, "crd": {"num_negatives": 32}, "msdcrd": {},
                        "hsakd": {}, "stablekd": {}}
    for recipe in ("teacher_recipe", "student_recipe"):
        study[recipe].update(epochs=1, batch_size=16, checkpoint_every_steps=1000)
    four = _host_reads_per_job(study, 64, tmp_path)
    eight = _host_reads_per_job(study, 128, tmp_path)
    assert set(four) == set(study["methods"])
    assert four == eight


def test_the_host_read_count_catches_a_read_per_step(study, tmp_path) -> None:
    """The CPU's eager loss guard reads its record after every step: the count sees it."""
    study["methods"] = {"vanilla": {}}
    study["student_recipe"].update(epochs=1, batch_size=16, checkpoint_every_steps=1000)
    four = _host_reads_per_job(study, 64, tmp_path)["vanilla"]
    eight = _host_reads_per_job(study, 128, tmp_path)["vanilla"]
    assert eight["item"] - four["item"] == 4


def _plain_and_switched(study: Dict[str, Any], switches: Dict[str, Any], store: JobStore):
    """Run the study's single distillation job as given and with the student recipe's
    ``switches`` (after the shared teacher): ((plain job, its result), (switched, its result))."""
    (plain,) = [j for j in expand_study(study).jobs if j.stage == "distill"]
    study["student_recipe"].update(switches)
    graph = expand_study(study)
    (switched,) = [j for j in graph.jobs if j.stage == "distill"]
    for job in graph.jobs:
        if job.stage == "teacher":
            run_job(job, store, QUIET)
    return (plain, run_job(plain, store, QUIET)), (switched, run_job(switched, store, QUIET))


def test_bf16_and_channels_last_each_reach_the_training_step(study, tmp_path) -> None:
    """Each switch alone changes what the step's convolutions see: bf16 alone makes them
    compute in bfloat16 on contiguous NCHW input; channels_last alone feeds them NHWC input
    and leaves them in float32; the plain path has neither."""
    study["methods"] = {"vanilla": {}}
    study["student_recipe"].update(epochs=1, checkpoint_every_steps=1000)
    store = JobStore(tmp_path)
    seen: Dict[str, Set[tuple]] = {}
    for name, switches in (("plain", {}), ("bf16", {"amp": "bf16"}),
                           ("channels_last", {"channels_last": True})):
        (job,) = expand_study({**study, "student_recipe": {**study["student_recipe"],
                                                            **switches}}).jobs
        with training_step_layouts() as seen[name]:
            result = run_job(job, store, QUIET)
        assert result["fast_path"]["bf16"] == (name == "bf16")
    assert seen == {"plain": {(torch.float32, False)}, "bf16": {(torch.bfloat16, False)},
                    "channels_last": {(torch.float32, True)}}


@pytest.mark.slow
def test_fast_switches_train_to_the_plain_paths_accuracy(study, tmp_path) -> None:
    """channels_last, the fused optimizer and bf16 autocast (all on, on the CPU) train the
    demo's student to the accuracy of the plain path, within the recipe's noise."""
    study["methods"] = {"kd": {}}
    study["datasets"]["synthetic"].update(num_train=512, num_val=256)
    study["teacher_recipe"].update(epochs=3, lr_milestones=[2])
    study["student_recipe"].update(epochs=3, lr_milestones=[2])
    with training_step_layouts() as seen:
        (_, a), (_, b) = _plain_and_switched(
            study, {"amp": "bf16", "channels_last": True, "fused_optimizer": True},
            JobStore(tmp_path))
    # the teacher's and the plain student's steps ran in float32 NCHW, the switched one's in
    # bf16 on NHWC input
    assert seen == {(torch.float32, False), (torch.bfloat16, True)}
    assert b["fast_path"] == {"bf16": True, "channels_last": True, "fused_optimizer": True,
                              "compile_mode": None}
    assert a["fast_path"]["bf16"] is False
    assert a["history"][0]["train/loss"] != b["history"][0]["train/loss"]
    assert abs(a["metrics"]["top1"] - b["metrics"]["top1"]) <= 6.0
    assert b["metrics"]["top1"] > 100.0 / 4


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step(study, tmp_path) -> None:
    """``compile: default`` (torch.compile of the forward and loss) gives the eager path's
    losses and weights, up to floating-point reassociation."""
    study["methods"] = {"kd": {}}
    study["student_recipe"].update(epochs=1, batch_size=32, checkpoint_every_steps=1000)
    study["teacher_recipe"].update(epochs=1)
    store = JobStore(tmp_path)
    (eager, a), (compiled, b) = _plain_and_switched(study, {"compile": "default"}, store)
    assert b["fast_path"]["compile_mode"] == "default"
    assert b["history"][0]["train/loss"] == pytest.approx(a["history"][0]["train/loss"], rel=1e-4)
    wa = read_sealed(store.weights_path(eager.job_id))
    wb = read_sealed(store.weights_path(compiled.job_id))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_cuda_graph_step_wrapper_runs_and_matches_eager() -> None:
    """The ``reduce-overhead`` path (CUDA graphs on a GPU; on the CPU inductor skips the graphs
    but the step-boundary marking around each call still runs) gives the eager step's loss."""
    info = DataInfo(num_samples=16, labels=torch.randint(0, 10, (16,)), num_classes=10,
                    input_shape=(3, 16, 16))
    distiller = DISTILLERS.get("vanilla")(build_model("resnet8", 10), None,
                                          parse_config(VanillaConfig, {}, "m"), info)
    x, y, index = torch.randn(8, 3, 16, 16), info.labels[:8], torch.arange(8)
    eager = step_forward(distiller, CPU, FastPath(False, False, False, None))
    graphed = step_forward(distiller, CPU, FastPath(False, False, False, "reduce-overhead"))
    for _ in range(2):
        _, want, _ = eager(x, y, index)
        _, got, terms = graphed(x, y, index)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        got.backward()
    assert set(terms) == {"loss_ce"}
