"""The contract every distillation method implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, Tuple, Type

import torch
from torch import nn

from methods.errors import ConfigError
from methods.features import Features, TapShapes
from methods.registry import Registry

LossTerms = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class DataInfo:
    """Facts about the training split a distiller may need at construction.

    num_samples: N, the training-set size (CRD's memory bank has N rows).
    labels:      (N,) int64 class of every training sample, indexed like the loader's ``index``.
    num_classes: number of classes.
    input_shape: (C, H, W) of one input image.
    """

    num_samples: int
    labels: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, int, int]


class Distiller(nn.Module):
    """A student, an optional frozen teacher, and the method's own training-only modules.

    ``forward(x, y, index)`` returns ``(student_logits, terms)`` where ``terms`` maps a loss
    name (``loss_ce``, ``loss_kd``...) to an already weighted scalar; the training loss is
    their sum. The teacher is kept in eval mode and run under ``torch.inference_mode``, and
    none of its parameters is handed to the optimizer.

    Subclasses set ``Config`` (a dataclass of the method's settings, whose fields are the
    config keys), ``needs_teacher`` and ``display_name`` (the row label in reports), and may override ``check_taps`` to refuse pairs whose
    taps cannot be matched.
    """

    Config: ClassVar[Type[Any]]
    needs_teacher: ClassVar[bool] = True
    display_name: ClassVar[str] = ""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Any,
                 data: DataInfo) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ConfigError("teacher", f"method {type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def learnable_parameters(self) -> Iterable[nn.Parameter]:
        """Everything the optimizer updates: the student and the method's own modules."""
        teacher_ids = {id(p) for p in self.teacher.parameters()} if self.teacher is not None else set()
        return [p for p in self.parameters() if id(p) not in teacher_ids]

    def teacher_features(self, x: torch.Tensor) -> Features:
        """The teacher's taps for ``x``, computed without autograd and safe to use as targets."""
        assert self.teacher is not None
        with torch.inference_mode():
            feats = self.teacher.forward_features(x)
        return feats.detached()

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        """Raise :class:`ConfigError` when this pair's taps cannot feed the method."""

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:  # pragma: no cover
        raise NotImplementedError


DISTILLERS: Registry[Type[Distiller]] = Registry("method", "method")


def register_distiller(name: str) -> Callable[[Type[Distiller]], Type[Distiller]]:
    return DISTILLERS.register(name)
