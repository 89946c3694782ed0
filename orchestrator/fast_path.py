"""The training step's speed switches, resolved for the device a job runs on.

A recipe names each switch (``amp``, ``channels_last``, ``fused_optimizer``, ``compile``,
``cuda_graphs``); ``auto`` turns the switch on on a CUDA device and off on the CPU, so the
fast path is the default on GPUs while CPU runs stay bit-for-bit reproducible:

- ``amp``: bf16 autocast of the forward pass (only where the GPU supports bf16);
- ``channels_last``: the networks' weights and every batch laid out NHWC;
- ``fused_optimizer``: one fused kernel for the whole SGD update instead of one per tensor;
- ``compile``: ``torch.compile`` of the distiller's forward and loss (``default`` or
  ``max-autotune``); ``cuda_graphs`` adds CUDA graph replay of the compiled step, which
  removes the per-kernel launch cost that dominates small CIFAR networks at batch 64.

The rest of the fast path needs no switch: the teacher runs under ``torch.inference_mode``
once per batch (``Distiller.teacher_features``), in-memory datasets live on the device and are
augmented there (``device_resident``), and the step queues device work only: losses are summed
on the device and read once per epoch (``orchestrator.loss_guard`` reads its record only
before checkpoints).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from kdflow.methods.distillers import Distiller
from kdflow.methods.distillers.base import LossTerms
from kdflow.orchestrator.recipe import Recipe

#: ``Recipe.compile`` -> torch.compile mode, without and with CUDA graphs.
COMPILE_MODES: Dict[str, Tuple[str, str]] = {
    "default": ("default", "reduce-overhead"),
    "max-autotune": ("max-autotune-no-cudagraphs", "max-autotune"),
}
GRAPHED_MODES = frozenset(graphed for _, graphed in COMPILE_MODES.values())


@dataclass(frozen=True)
class FastPath:
    """The switches a job's step runs with (the recipe's ``auto`` resolved for its device).

    compile_mode: the ``torch.compile`` mode of the forward and loss; None: not compiled.
    """

    bf16: bool
    channels_last: bool
    fused_optimizer: bool
    compile_mode: Optional[str]

    def record(self) -> Dict[str, Any]:
        """The resolved switches, as a job's ``result.json`` keeps them (``fast_path``)."""
        return asdict(self)


def _on(value: Any, device: torch.device) -> bool:
    """A recipe switch (True, False or ``"auto"``) resolved for ``device``."""
    return device.type == "cuda" if value == "auto" else bool(value)


def resolve_fast_path(recipe: Recipe, device: torch.device) -> FastPath:
    """What ``recipe`` asks for on ``device``: ``auto`` switches are on on CUDA only; bf16
    autocast is also off on a GPU without bf16 support; CUDA graphs only exist on CUDA."""
    if recipe.amp == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        bf16 = recipe.amp == "bf16"
    compile_mode = None
    if recipe.compile != "none":
        plain, graphed = COMPILE_MODES[recipe.compile]
        compile_mode = graphed if recipe.cuda_graphs and device.type == "cuda" else plain
    return FastPath(bf16=bf16, channels_last=_on(recipe.channels_last, device),
                    fused_optimizer=_on(recipe.fused_optimizer, device), compile_mode=compile_mode)


def build_optimizer(params: Iterable[nn.Parameter], recipe: Recipe,
                    fast: FastPath) -> torch.optim.SGD:
    """The recipe's SGD over ``params`` (fused when ``fast.fused_optimizer``)."""
    return torch.optim.SGD(list(params), lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay,
                           fused=fast.fused_optimizer or None)


def autocast(device: torch.device, fast: FastPath) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``fast.bf16``, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast.bf16)


StepForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                       Tuple[torch.Tensor, torch.Tensor, LossTerms]]


def step_forward(distiller: Distiller, device: torch.device, fast: FastPath) -> StepForward:
    """The forward half of a training step, ``(x, y, index) -> (logits, loss, terms)``.

    x: (B, C, H, W) images on ``device``; y: (B,) or (B, H, W) labels; index: (B,) sample ids.
    Returns the student's logits, the training loss (the sum of the weighted ``terms``, a
    0-dim tensor) and the terms by name, under autocast when ``fast.bf16`` and compiled with
    ``fast.compile_mode`` (methods whose network changes between epochs, as StableKD's phases
    do, are recompiled once per change).
    """
    def forward(x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, LossTerms]:
        with autocast(device, fast):
            logits, terms = distiller(x, y, index)
        return logits, sum(terms.values()), terms

    if fast.compile_mode is None:
        return forward
    compiled = torch.compile(forward, mode=fast.compile_mode)
    if fast.compile_mode not in GRAPHED_MODES:
        return compiled

    def replayed(x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, LossTerms]:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
        return compiled(x, y, index)

    return replayed
