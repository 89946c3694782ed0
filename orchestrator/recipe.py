"""The optimisation recipe of one job (optimizer, schedule, precision, checkpointing)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple, Union

from kdflow.methods.config import require_non_negative, require_number, require_positive
from kdflow.methods.errors import ConfigError

AUTO = "auto"
AMP_MODES = (AUTO, "none", "bf16")
COMPILE = ("none", "default", "max-autotune")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("step", "poly")


@dataclass
class Recipe:
    """SGD with step decay: lr is multiplied by ``lr_decay`` at each epoch in ``lr_milestones``
    (``lr_schedule=step``), or with the polynomial decay of segmentation recipes
    (``lr_schedule=poly``): after optimizer step i of n, ``lr * (1 - i / n) ** lr_power``.

    ``lr=None`` takes the trained model's default (0.05; 0.01 for MobileNetV2/ShuffleNets).
    ``checkpoint_every_steps`` counts optimizer steps; epoch ends always checkpoint too.
    ``epochs=0`` trains nothing: the job evaluates and saves its initial weights (the
    randomly initialised teachers of cross-task studies), with BatchNorm statistics set from
    one pass over the training split so the untrained network's activations stay bounded.

    Speed switches (:mod:`orchestrator.fast_path`): ``amp`` (``auto`` | ``none`` | ``bf16``),
    ``channels_last`` and ``fused_optimizer`` (true | false | ``auto``): ``auto`` is on on CUDA
    and off on the CPU. ``compile`` (``none`` | ``default`` | ``max-autotune``) compiles the
    forward and loss; ``cuda_graphs`` replays the compiled step as CUDA graphs (needs
    ``compile``; ignored on the CPU).
    """

    epochs: int = 240
    batch_size: int = 64
    lr: Optional[float] = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_milestones: List[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    amp: str = AUTO
    channels_last: Union[bool, str] = AUTO
    fused_optimizer: Union[bool, str] = AUTO
    compile: str = "none"
    cuda_graphs: bool = False
    checkpoint_every_steps: int = 500
    device: str = "auto"
    lr_schedule: str = "step"
    lr_power: float = 0.9
    omitted_at_default: ClassVar[Tuple[str, ...]] = ("lr_schedule", "lr_power", "fused_optimizer",
                                                     "compile", "cuda_graphs")

    def validate(self) -> None:
        """ConfigError naming the first setting of a wrong kind or out of its range."""
        for name, least in (("epochs", 0), ("batch_size", 1), ("checkpoint_every_steps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(name, f"must be an integer >= {least}, got {value!r}",
                                  fix=f"set {name} to a whole number >= {least}")
        self._validate_optimizer()
        self._validate_schedule()
        if self.amp not in AMP_MODES:
            raise ConfigError("amp", f"unknown mode {self.amp!r}", allowed=AMP_MODES)
        for name in ("channels_last", "fused_optimizer"):
            value = getattr(self, name)
            if not isinstance(value, bool) and value != AUTO:
                raise ConfigError(name, f"must be true, false or auto, got {value!r}",
                                  fix=f"set {name}: auto (on on GPUs), true or false")
        if self.compile not in COMPILE:
            raise ConfigError("compile", f"unknown mode {self.compile!r}", allowed=COMPILE)
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError("cuda_graphs", f"must be true or false, got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.compile == "none":
            raise ConfigError("cuda_graphs", "replays a compiled step, but compile is none",
                              fix="also set compile: default (or max-autotune), or drop cuda_graphs")
        if self.device not in DEVICES:
            raise ConfigError("device", f"unknown device {self.device!r}", allowed=DEVICES)

    def _validate_optimizer(self) -> None:
        """lr, weight_decay, momentum: finite numbers in range (NaN and inf are refused)."""
        if self.lr is not None:
            require_positive("lr", self.lr)
        require_non_negative("weight_decay", self.weight_decay)
        require_number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum!r}",
                              fix="set momentum to a value in [0, 1), e.g. 0.9")

    def _validate_schedule(self) -> None:
        """lr_decay, lr_power > 0; lr_milestones a list of increasing whole epochs >= 1
        (milestones at or after ``epochs`` are never reached, which shortened runs of a
        recipe rely on)."""
        require_positive("lr_decay", self.lr_decay)
        require_positive("lr_power", self.lr_power)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", f"unknown schedule {self.lr_schedule!r}",
                              allowed=LR_SCHEDULES)
        fix = ("list the epochs at which lr is multiplied by lr_decay, e.g. "
               "lr_milestones=[150,180,210]")
        milestones = self.lr_milestones
        if not isinstance(milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1
                for m in milestones):
            raise ConfigError("lr_milestones", f"must be a list of whole epochs >= 1, got "
                              f"{milestones!r}", fix=fix)
        if any(a >= b for a, b in zip(self.lr_milestones, self.lr_milestones[1:])):
            raise ConfigError("lr_milestones", f"must increase, got {list(self.lr_milestones)}",
                              fix=fix)
