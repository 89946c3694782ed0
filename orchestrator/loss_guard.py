"""Watching a job's training loss and weights for NaN and infinity without a host
synchronisation per step.

:class:`LossGuard` keeps, on the training device, the global index of the first step whose
loss (any named term, or their sum) was not finite and every value at that step. Recording is
a few device kernels per step; reading the record (:meth:`LossGuard.first_fault`) is the one
host synchronisation, done by the runner before every checkpoint it writes and at each epoch
end, so a checkpoint never holds weights a non-finite loss has already poisoned. On the CPU,
where reading costs nothing, the runner reads it after every step (``LossGuard.eager``).

A step can poison the weights while its loss, computed before the update, is still finite (the
last step of a job, above all). :func:`nonfinite_tensors` is therefore counted, with one fused
reduction and one read, before every checkpoint and before a job's weights are exported;
:func:`weights_fault` then says what is wrong, on that rare path only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

#: The name under which the runner passes the sum of the terms.
TOTAL = "loss"


@dataclass(frozen=True)
class LossFault:
    """The first training step whose loss was not finite.

    step:   its global step index, counted from 0 like the checkpoints' names (checkpoint
            ``step-N`` holds the state before step N, so the last good one is at most ``step``).
    values: the terms (and the sum, ``TOTAL``) that were NaN or +-inf at that step, as the
            runner passed them (sums over the batch's samples: the value itself when not finite).
    """

    step: int
    values: Dict[str, float]

    def describe(self, epoch: int) -> str:
        """One line for the job's failed state, e.g. ``non-finite loss at step 37 (epoch 2):
        loss_kd = nan``; ``epoch`` is the 0-based epoch the step belongs to. The sum is named
        only when every term was finite (it overflowed)."""
        terms = {name: value for name, value in self.values.items() if name != TOTAL}
        named = terms or {f"{TOTAL} (the sum of finite terms)": self.values[TOTAL]}
        listed = ", ".join(f"{name} = {value}" for name, value in named.items())
        return f"non-finite loss at step {self.step} (epoch {epoch}): {listed}"


class LossGuard:
    """Records the first step at which any of the loss values passed to :meth:`observe` is not
    finite; the record lives on ``device`` until :meth:`first_fault` reads it.

    next_step: the global index of the first step :meth:`observe` will see (a resumed job's
               checkpointed ``global_step``).
    eager:     True on the CPU, where reading the record costs nothing: the runner reads it
               after every step instead of only before checkpoints and at epoch ends.
    """

    def __init__(self, next_step: int, device: torch.device) -> None:
        self.eager = device.type == "cpu"
        self._device = device
        self._next_step = torch.tensor(next_step, device=device)
        self._bad_step = torch.tensor(-1, device=device)
        self._names: Tuple[str, ...] = ()
        self._values = torch.zeros(0, device=device)
        self._record_final = False

    def observe(self, values: Mapping[str, torch.Tensor]) -> None:
        """Note one training step's loss ``values``: 0-dim tensors by name, on the device.

        Queues device work only, except when the names differ from the previous step's (a
        method whose phase adds a term), where the record is read once before it is reshaped.
        """
        names = tuple(values)
        if names != self._names and not self._record_final:
            self._record_final = bool(self._names) and self.first_fault() is not None
            if not self._record_final:
                self._names = names
                self._values = torch.zeros(len(names), device=self._device)
        if not self._record_final:
            row = torch.stack([v.detach().float().reshape(()) for v in values.values()])
            first = (self._bad_step < 0) & ~torch.isfinite(row).all()
            self._bad_step = torch.where(first, self._next_step, self._bad_step)
            self._values = torch.where(first, row, self._values)
        self._next_step += 1

    def first_fault(self) -> Optional[LossFault]:
        """The first non-finite step seen so far, or None (reads the record: one sync)."""
        step = int(self._bad_step.item())
        if step < 0:
            return None
        values = dict(zip(self._names, self._values.tolist()))
        return LossFault(step, {name: value for name, value in values.items()
                                if not math.isfinite(value)})


@dataclass(frozen=True)
class WeightsFault:
    """Weights (parameters and buffers) holding NaN or +-inf.

    bad:   how many values are not finite; total: how many floating-point values there are;
    first: the name of the first tensor (in ``state_dict`` order) with a non-finite value.
    """

    bad: int
    total: int
    first: str

    def describe(self, where: str) -> str:
        """One line for the job's failed state, e.g. ``non-finite weights after step 36
        (epoch 2): 77652 of 78324 values are NaN or inf, the first in conv1.weight``."""
        return (f"non-finite weights {where}: {self.bad} of {self.total} values are NaN or inf, "
                f"the first in {self.first}")


def _floating(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of ``state`` that can hold NaN or inf (integer buffers cannot)."""
    return {name: t.detach() for name, t in state.items() if t.is_floating_point()}


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """How many tensors of ``state`` hold a NaN or inf, as a 0-dim float tensor on their device.

    Queues device work only: one multi-tensor L1 norm (accumulated in float64, so no finite
    float32/bf16 tensor can overflow it) per device and dtype, and one sum. Reading the count
    is the caller's one host synchronisation.
    """
    tensors: List[torch.Tensor] = list(_floating(state).values())
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 1, dtype=torch.float64)  # the optimizers' fused kernel
    return (~torch.stack(norms).isfinite()).sum().float()


def weights_fault(state: Mapping[str, torch.Tensor]) -> Optional[WeightsFault]:
    """What is not finite in ``state`` (None: nothing); reads every tensor's count back, so
    call it only once :func:`nonfinite_tensors` found something."""
    tensors = _floating(state)
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors.items()}
    bad = [name for name, count in counts.items() if count]
    if not bad:
        return None
    return WeightsFault(sum(counts.values()), sum(t.numel() for t in tensors.values()), bad[0])
