"""The contract every distillation method implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Tuple, Type

import torch
from torch import nn

from kdflow.methods.errors import ConfigError
from kdflow.methods.features import Features, TapShapes
from kdflow.methods.models.base import build_model, probe_taps
from kdflow.methods.registry import Registry
from kdflow.methods.tasks import CLASSIFICATION

LossTerms = Dict[str, torch.Tensor]


class TeacherMemo:
    """The frozen teacher's outputs for the batch a pack of jobs is on, shared by its members.

    A pack (``orchestrator.pack``) runs jobs of one teacher job on the same batches; it calls
    :meth:`begin` with each batch's input tensor, and the first member that asks for a teacher
    output of that tensor computes it, the others get the same tensors back: one teacher
    forward per batch instead of one per member. Outputs of any other tensor (a member's own
    augmentation, LAD's label channel) are computed and not kept. The teacher is in eval mode
    and its outputs are detached copies, so the shared tensors are exactly what each member
    would have computed (on the CPU: bit for bit).

    computed / reused: outputs computed for a batch / handed out again (over the memo's life).
    """

    def __init__(self) -> None:
        self.batch: torch.Tensor | None = None
        self.outputs: Dict[Tuple[str, str], Any] = {}
        self.computed = 0
        self.reused = 0

    def begin(self, x: torch.Tensor | None) -> None:
        """Forget the last batch's outputs; keep those of input ``x`` from now (None: none)."""
        self.batch = x
        self.outputs = {}

    @torch.compiler.disable
    def get(self, key: Tuple[str, str], x: torch.Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()`` (the teacher's output ``key`` for input ``x``), computed once per batch."""
        if x is not self.batch:
            return compute()
        if key in self.outputs:
            self.reused += 1
        else:
            self.outputs[key] = compute()
            self.computed += 1
        return self.outputs[key]


@dataclass(frozen=True)
class TeacherRequest:
    """The teacher a method needs, as a teacher job the study graph must hold.

    trainer:  the registered method that trains the teacher (``vanilla`` for a plain
              classifier; a method-specific trainer such as HSAKD's for teachers with extra heads).
    settings: that trainer's settings (they enter the teacher job's id).
    trained:  False for a randomly initialised teacher: its job trains for zero epochs.
    model:    the teacher's architecture when it is not the study pair's (cross-task KD).
    dataset:  the dataset (a name the study's ``teacher_datasets`` may configure) the teacher
              trains on when it is not the student's: a teacher of another task.
    """

    trainer: str = "vanilla"
    settings: Dict[str, Any] = field(default_factory=dict)
    trained: bool = True
    model: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class DataInfo:
    """Facts about the training split a distiller may need at construction.

    num_samples: N, the training-set size (CRD's memory bank has N rows).
    labels:      (N,) int64 class of every training sample, indexed like the loader's ``index``
                 (segmentation: -1 for every sample, an image has no single class).
    num_classes: number of classes.
    input_shape: (C, H, W) of one input image (segmentation: of one training crop).
    task:        ``methods.tasks.CLASSIFICATION`` or ``SEGMENTATION``.
    """

    num_samples: int
    labels: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, int, int]
    task: str = CLASSIFICATION


class Distiller(nn.Module):
    """A student, an optional frozen teacher, and the method's own training-only modules.

    ``forward(x, y, index)`` returns ``(student_logits, terms)`` where ``terms`` maps a loss
    name (``loss_ce``, ``loss_kd``...) to an already weighted scalar; the training loss is
    their sum. The teacher is kept in eval mode and run under ``torch.inference_mode``, and
    none of its parameters is handed to the optimizer.

    Subclasses set ``Config`` (a dataclass of the method's settings, whose fields are the
    config keys), ``display_name`` (the row label in reports) and ``tasks`` (the tasks of
    ``methods.tasks`` they train). They may override ``teacher_request`` (which teacher job
    they need; None for none), ``build_teacher`` / ``build_student`` (the modules the teacher
    job's weights load into, and the network this job trains), ``start_epoch`` (per-epoch
    schedule), ``predict`` (the logits a job of this method is evaluated on),
    ``exported_model`` (what a job of this method saves as its weights) and ``check_taps``
    (refuse pairs whose taps cannot be matched).
    """

    Config: ClassVar[Type[Any]]
    display_name: ClassVar[str] = ""
    tasks: ClassVar[Tuple[str, ...]] = (CLASSIFICATION,)

    @classmethod
    def teacher_request(cls, cfg: Any) -> TeacherRequest | None:
        """The teacher job this method needs with settings ``cfg``; None when it needs none."""
        return TeacherRequest()

    @classmethod
    def build_teacher(cls, cfg: Any, name: str, num_classes: int) -> nn.Module:
        """The teacher module, before its job's weights are loaded: model ``name`` by default."""
        return build_model(name, num_classes)

    @classmethod
    def build_student(cls, cfg: Any, name: str, num_classes: int) -> nn.Module:
        """The network a job of this method trains: model ``name`` by default."""
        return build_model(name, num_classes)

    def predict(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluation logits for images ``x`` (labels ``y`` are there for methods whose network
        reads them, as LAD's teacher does): the student's by default."""
        return self.student(x)

    def checked_taps(self, data: DataInfo) -> Tuple[TapShapes | None, TapShapes]:
        """Probe the teacher's and the student's taps on ``data.input_shape`` (one forward
        pass of 2 images each), refuse them through ``check_taps``, and return them."""
        teacher = None if self.teacher is None else probe_taps(self.teacher, data.input_shape)
        student = probe_taps(self.student, data.input_shape)
        self.check_taps(self.cfg, teacher, student)
        return teacher, student

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called by the job runner before each epoch (0-based), also on resume; methods whose
        training changes over time (StableKD's phases) switch here. Default: nothing."""

    def exported_model(self) -> nn.Module:
        """The module whose ``state_dict`` a finished job saves: the student by default."""
        return self.student

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: Any,
                 data: DataInfo) -> None:
        super().__init__()
        if self.teacher_request(cfg) is not None and teacher is None:
            raise ConfigError("teacher", f"method {type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.teacher_memo: TeacherMemo | None = None  # set by a pack (TeacherMemo)
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

    def shared_teacher(self, name: str, x: torch.Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()``, a teacher output called ``name`` that depends on the batch input ``x``
        alone: computed once per batch for all the members of a pack (:class:`TeacherMemo`),
        or simply computed for a job run alone. The result must not be modified in place."""
        if self.teacher_memo is None:
            return compute()
        return self.teacher_memo.get((type(self.teacher).__qualname__, name), x, compute)

    def teacher_features(self, x: torch.Tensor) -> Features:
        """The teacher's taps for ``x``, computed without autograd and safe to use as targets
        (shared within a pack: :meth:`shared_teacher`)."""
        assert self.teacher is not None

        def compute() -> Features:
            with torch.inference_mode():
                feats = self.teacher.forward_features(x)
            return feats.detached()

        return self.shared_teacher("features", x, compute)

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        """Raise :class:`ConfigError` when this pair's taps cannot feed the method."""

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:  # pragma: no cover
        raise NotImplementedError


DISTILLERS: Registry[Type[Distiller]] = Registry("method", "method")


def register_distiller(name: str) -> Callable[[Type[Distiller]], Type[Distiller]]:
    return DISTILLERS.register(name)
