"""StableKD-style block-wise decomposition and recomposition (Kao, Chen et al., arXiv 2312.13223).

[KDFLOW] reference scheduler, not the paper's: the paper's block split, merge schedule and
per-block losses were not obtained (methods.md 6.1), so this module implements the kdflow
reference design of methods.md 6.2, with every knob configurable.

* The teacher and the student are split into the same number N of blocks at stage boundaries
  (``methods.models.blocks``). Teacher activations ``h^T_0 = x``, ``h^T_i = T_i(h^T_{i-1})``
  are computed once per step without autograd.
* A :class:`RecompositionSchedule` maps the epoch to a phase, and each phase partitions the
  blocks 1..N into contiguous groups (default: pairwise merging, N=3:
  ``[[1],[2],[3]] -> [[1,2],[3]] -> [[1,2,3]]``, phases over an even split of the epochs).
* A group ``G = [i..j]`` runs the student blocks i..j on ``A_in_i(h^T_{i-1})`` (raw x for
  i = 1) and is trained against ``h^T_j`` with ``feature_weight * MSE(A_out_j(.), h^T_j)``, or,
  when it holds block N, with ``ce_weight * CE + kd_weight * KD`` on the logits. All groups train
  in the same step; no gradient crosses a group boundary because the groups' inputs are teacher
  activations. The last phase is one group: plain end-to-end KD.
* Adapters ``A_in_i`` (1x1 conv + BN + bilinear resize, teacher -> student shape) and ``A_out_j``
  (1x1 conv + bilinear resize, student -> teacher shape) exist only at block boundaries whose
  teacher and student shapes differ; they are training-only.

Loss terms: ``loss_feat`` (the weighted MSE summed over the groups that do not hold block N;
omitted when there is none, i.e. in the end-to-end phase), ``loss_ce`` (only when
``ce_weight > 0``) and ``loss_kd``.

BN caveat (methods.md 6.2): before the last phase, student blocks after the first see
(adapted) teacher activations in training, while evaluation runs the plain student chain,
so intermediate-phase validation accuracy understates the student.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.methods.config import require_non_negative, require_positive
from kdflow.methods.distillers.base import DataInfo, Distiller, LossTerms, register_distiller
from kdflow.methods.distillers.kd import check_same_classes, kd_loss
from kdflow.methods.errors import ConfigError
from kdflow.methods.features import TapShapes
from kdflow.methods.models.blocks import default_num_blocks, split_blocks

Shape = Tuple[int, int, int]
Partition = Tuple[Tuple[int, ...], ...]


def default_partitions(num_blocks: int) -> List[List[List[int]]]:
    """Progressive pairwise merging of blocks 1..N down to one group.

    Phase 0 has one group per block; each next phase merges neighbouring groups in pairs
    (an odd last group is carried over), e.g. N=4: [[1],[2],[3],[4]] -> [[1,2],[3,4]] ->
    [[1,2,3,4]]; N=5 has four phases.
    """
    phases = [[[b] for b in range(1, num_blocks + 1)]]
    while len(phases[-1]) > 1:
        prev = phases[-1]
        phases.append([sum(prev[k:k + 2], []) for k in range(0, len(prev), 2)])
    return phases


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_partitions(partitions: Any) -> Tuple[Partition, ...]:
    """Check the nesting and element types of ``partitions``; ConfigError("partitions")."""
    example = "e.g. [[[1], [2], [3]], [[1, 2], [3]], [[1, 2, 3]]]"
    if not isinstance(partitions, (list, tuple)) or not partitions:
        raise ConfigError("partitions", f"must be a non-empty list of phases, got {partitions!r}",
                          fix=f"list the phases, {example}")
    phases = []
    for p, phase in enumerate(partitions):
        if (not isinstance(phase, (list, tuple)) or not phase
                or not all(isinstance(g, (list, tuple)) and g and all(_is_int(b) for b in g)
                           for g in phase)):
            raise ConfigError("partitions",
                              f"phase {p} ({phase!r}) is not a list of non-empty lists of "
                              "block numbers", fix=f"write each phase as groups, {example}")
        phases.append(tuple(tuple(g) for g in phase))
    return tuple(phases)


def _cuts(phase: Partition) -> Set[int]:
    """The block numbers after which a group of ``phase`` ends, the last block excluded."""
    ends, total = set(), 0
    for group in phase[:-1]:
        total += len(group)
        ends.add(total)
    return ends


def _check_partitions(phases: Sequence[Partition], num_blocks: int) -> None:
    """Coverage of 1..N in order by contiguous groups, merges only, last phase one group."""
    blocks = list(range(1, num_blocks + 1))
    for p, phase in enumerate(phases):
        if [b for group in phase for b in group] != blocks:
            raise ConfigError(
                "partitions",
                f"phase {p} ({[list(g) for g in phase]}) does not split blocks 1..{num_blocks} "
                "into contiguous groups in order",
                fix=f"make the groups of every phase, read left to right, list 1..{num_blocks} "
                    "once each (or set num_blocks to the block count the partitions cover)")
        if p and not _cuts(phase) < _cuts(phases[p - 1]):
            raise ConfigError(
                "partitions",
                f"phase {p} ({[list(g) for g in phase]}) is not a coarser merge of phase "
                f"{p - 1} ({[list(g) for g in phases[p - 1]]})",
                fix="every phase must merge some neighbouring groups of the previous one "
                    "and split none")
    if len(phases[-1]) != 1:
        raise ConfigError("partitions",
                          f"the last phase ({[list(g) for g in phases[-1]]}) is not a single "
                          "group, so training never becomes end-to-end",
                          fix=f"end with [[{', '.join(map(str, blocks))}]]")


def _check_boundaries(boundaries: Any, transitions: Optional[int]) -> Tuple[float, ...]:
    """Fractions in (0, 1), strictly increasing, ``transitions`` of them when known."""
    if (not isinstance(boundaries, (list, tuple))
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                       for b in boundaries)):
        raise ConfigError("boundaries", f"must be a list of numbers, got {boundaries!r}",
                          fix="give the fraction of the epochs at which each phase after "
                              "the first starts, e.g. [0.33, 0.67]")
    if transitions is not None and len(boundaries) != transitions:
        raise ConfigError("boundaries",
                          f"has {len(boundaries)} entries but the schedule has {transitions} "
                          "phase transitions",
                          fix=f"give one fraction per phase after the first ({transitions})")
    if not all(0 < b < 1 for b in boundaries) or any(
            b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ConfigError("boundaries",
                          f"must be strictly increasing fractions in (0, 1), got {boundaries!r}",
                          fix="e.g. [0.33, 0.67] for three phases")
    return tuple(float(b) for b in boundaries)


class RecompositionSchedule:
    """Which contiguous block groups train together at each point of the epoch budget.

    num_blocks: N >= 1. partitions: phases, each a partition of blocks 1..N (1-based) into
    contiguous groups, each phase a merge of the previous one, the last a single group
    (default :func:`default_partitions`). boundaries: for each phase after the first, the
    fraction of the epochs at which it starts, strictly increasing in (0, 1) (default: an
    even split, phase p starting at p / P). Bad values raise ConfigError naming the field.
    """

    def __init__(self, num_blocks: int, partitions: Optional[Sequence[Any]] = None,
                 boundaries: Optional[Sequence[float]] = None) -> None:
        if not _is_int(num_blocks) or num_blocks < 1:
            raise ConfigError("num_blocks", f"must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        phases = _parse_partitions(default_partitions(num_blocks) if partitions is None
                                   else partitions)
        _check_partitions(phases, num_blocks)
        self.partitions: Tuple[Partition, ...] = phases
        if boundaries is None:
            boundaries = [p / len(phases) for p in range(1, len(phases))]
        self.boundaries = _check_boundaries(boundaries, len(phases) - 1)

    @property
    def num_phases(self) -> int:
        return len(self.partitions)

    def phase_at(self, epoch: int, total_epochs: int) -> int:
        """The phase of 0-based ``epoch`` out of ``total_epochs``: the number of boundaries
        ``b`` with ``epoch / total_epochs >= b`` (epochs past the budget stay in the last)."""
        if total_epochs < 1 or epoch < 0:
            raise ValueError(f"need epoch >= 0 and total_epochs >= 1, got {epoch}, {total_epochs}")
        fraction = epoch / total_epochs
        return sum(fraction >= b for b in self.boundaries)

    def groups_at(self, epoch: int, total_epochs: int) -> Partition:
        """The groups (tuples of 1-based block numbers) trained during ``epoch``."""
        return self.partitions[self.phase_at(epoch, total_epochs)]

    def first_epoch(self, phase: int, total_epochs: int) -> Optional[int]:
        """The first epoch of ``phase`` in a ``total_epochs`` run; None if it gets no epoch."""
        return next((e for e in range(total_epochs) if self.phase_at(e, total_epochs) == phase),
                    None)

    def phase_labels(self) -> List[str]:
        """Per phase: ``decomposed`` (one block per group), ``end-to-end`` (one group) or
        ``partial``, numbered ``partial1``, ``partial2``... when there are several."""
        n_partial = sum(1 < len(ph) < self.num_blocks for ph in self.partitions)
        labels, k = [], 0
        for phase in self.partitions:
            if len(phase) == 1:
                labels.append("end-to-end")
            elif len(phase) == self.num_blocks:
                labels.append("decomposed")
            else:
                k += 1
                labels.append("partial" if n_partial == 1 else f"partial{k}")
        return labels


@dataclass
class StableKDConfig:
    """Settings of methods.md 6.2 ([KDFLOW] reference scheduler, not the paper's).

    num_blocks: N, the blocks both models are split into; None = the student family's
        default (its stage count: 3 CIFAR ResNet / WRN / ShuffleNet, 5 VGG, 4 MobileNetV2 and
        torchvision), capped at the teacher's stage count.
    partitions: the phases' groupings of blocks 1..N (None = pairwise merging).
    boundaries: epoch fractions where each phase after the first starts (None = even split).
    feature_weight: > 0, weight of the MSE of each group that does not hold block N.
    ce_weight: >= 0, kd_weight: > 0, kd_temperature: > 0, the CE + KD loss of the group
        holding block N (methods.md 1.3 defaults).
    """

    num_blocks: Optional[int] = None
    partitions: Optional[list] = None
    boundaries: Optional[list] = None
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    kd_temperature: float = 4.0

    def validate(self) -> None:
        if self.num_blocks is not None and (not _is_int(self.num_blocks) or self.num_blocks < 1):
            raise ConfigError("num_blocks", f"must be an integer >= 1 or null, got "
                              f"{self.num_blocks!r}", fix="set num_blocks to e.g. 3, or null")
        if self.partitions is not None:
            first = _parse_partitions(self.partitions)[0]
            n = self.num_blocks if self.num_blocks is not None else sum(map(len, first))
            RecompositionSchedule(n, self.partitions, self.boundaries)
        elif self.boundaries is not None:
            transitions = (None if self.num_blocks is None
                           else len(default_partitions(self.num_blocks)) - 1)
            _check_boundaries(self.boundaries, transitions)
        require_positive("feature_weight", self.feature_weight)
        require_non_negative("ce_weight", self.ce_weight)
        require_positive("kd_weight", self.kd_weight)
        require_positive("kd_temperature", self.kd_temperature)


def resolve_num_blocks(cfg: StableKDConfig, teacher_stages: int, student_stages: int) -> int:
    """N for a pair whose models have these stage counts; ConfigError("num_blocks") if either
    model cannot be split into that many blocks."""
    limit = min(teacher_stages, student_stages)
    n = cfg.num_blocks if cfg.num_blocks is not None else limit
    if n > limit:
        raise ConfigError("num_blocks",
                          f"the teacher has {teacher_stages} stages and the student "
                          f"{student_stages}, so they cannot both be split into {n} blocks",
                          fix=f"set num_blocks between 1 and {limit}")
    return n


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) to (B, C, *size); identity when the size already fits."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class InputAdapter(nn.Module):
    """A_in: 1x1 conv + BN, teacher C_t -> student C_s, then bilinear resize to (H_s, W_s).

    (B, C_t, H_t, W_t) -> (B, C_s, H_s, W_s).
    """

    def __init__(self, teacher: Shape, student: Shape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(teacher[0], student[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(student[0])
        self.size = (student[1], student[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.bn(self.conv(x)), self.size)


class OutputAdapter(nn.Module):
    """A_out: 1x1 conv, student C_s -> teacher C_t, then bilinear resize to (H_t, W_t).

    (B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t).
    """

    def __init__(self, student: Shape, teacher: Shape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(student[0], teacher[0], 1)
        self.size = (teacher[1], teacher[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.conv(x), self.size)


@torch.no_grad()
def boundary_shapes(model: nn.Module, blocks: Sequence[nn.Module],
                    input_shape: Shape) -> List[Shape]:
    """(C, H, W) of the outputs of ``blocks[:-1]`` (the block boundaries 1..N-1) of ``model``
    on a probe batch of 2 zero images, run in eval mode so no BN statistic changes."""
    was_training = model.training
    model.eval()
    h, shapes = torch.zeros(2, *input_shape), []
    for block in blocks[:-1]:
        h = block(h)
        shapes.append(tuple(int(d) for d in h.shape[1:]))
    model.train(was_training)
    return shapes


@dataclass
class GroupLoss:
    """One group's weighted loss terms: ``{"loss_feat"}`` for a group before block N,
    ``{"loss_ce"?, "loss_kd"}`` for the group holding block N. blocks: 1-based block numbers."""

    blocks: Tuple[int, ...]
    terms: LossTerms


@register_distiller("stablekd")
class StableKD(Distiller):
    """Block-wise distillation whose groups merge phase by phase into end-to-end KD.

    ``start_epoch`` selects the phase; its index is the ``phase`` buffer (in ``state_dict``,
    so checkpoints hold it). Evaluation and the exported weights are the plain student.
    """

    display_name = "StableKD"

    Config = StableKDConfig

    @classmethod
    def check_taps(cls, cfg: Any, teacher: TapShapes | None, student: TapShapes) -> None:
        """Same classes, a block count both models support, partitions over that count.

        A model's stage count is its number of tap stages (``methods.models.blocks``)."""
        if teacher is None:
            raise ConfigError("teacher", "StableKD distils from a teacher")
        check_same_classes(teacher, student)
        n = resolve_num_blocks(cfg, len(teacher.stages), len(student.stages))
        RecompositionSchedule(n, cfg.partitions, cfg.boundaries)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: StableKDConfig,
                 data: DataInfo) -> None:
        super().__init__(student, teacher, cfg, data)
        self.checked_taps(data)
        n = resolve_num_blocks(cfg, default_num_blocks(teacher), default_num_blocks(student))
        self.schedule = RecompositionSchedule(n, cfg.partitions, cfg.boundaries)
        # Plain lists: views onto the models' modules, kept out of the module tree so the
        # state_dict does not hold every student and teacher weight twice.
        self.student_blocks: List[nn.Module] = split_blocks(student, n)
        self.teacher_blocks: List[nn.Module] = split_blocks(teacher, n)
        t_shapes = boundary_shapes(teacher, self.teacher_blocks, data.input_shape)
        s_shapes = boundary_shapes(student, self.student_blocks, data.input_shape)
        # Keyed by the student block number: A_in_i feeds block i (2..N), A_out_j reads
        # block j's output (1..N-1); boundary b sits between blocks b and b+1.
        self.in_adapters = nn.ModuleDict()
        self.out_adapters = nn.ModuleDict()
        for b, (t, s) in enumerate(zip(t_shapes, s_shapes), start=1):
            if t != s:
                self.in_adapters[str(b + 1)] = InputAdapter(t, s)
                self.out_adapters[str(b)] = OutputAdapter(s, t)
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))
        self._phase = 0  # host copy of the buffer, so forward never syncs with the device
        self.register_load_state_dict_post_hook(StableKD._sync_phase)

    def _sync_phase(self, incompatible_keys: Any) -> None:
        """After load_state_dict: refresh the host copy of the phase from the buffer."""
        self._phase = int(self.phase)

    def set_phase(self, phase: int) -> None:
        """Switch to ``phase`` (0-based index into ``schedule.partitions``)."""
        if not 0 <= phase < self.schedule.num_phases:
            raise ValueError(f"phase {phase} is not in 0..{self.schedule.num_phases - 1}")
        self._phase = phase
        self.phase.fill_(phase)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Enter the phase the schedule assigns to 0-based ``epoch`` of ``total_epochs``."""
        self.set_phase(self.schedule.phase_at(epoch, total_epochs))

    def teacher_activations(self, x: torch.Tensor, keep: Set[int]) -> Dict[int, torch.Tensor]:
        """The teacher's block outputs ``h^T_i`` for i in ``keep`` (1..N; ``h^T_N`` is the
        (B, num_classes) logits), computed without autograd and cloned into ordinary tensors."""
        kept = {}
        with torch.inference_mode():
            h = x
            for i, block in enumerate(self.teacher_blocks, start=1):
                h = block(h)
                if i in keep:
                    kept[i] = h
        return {i: t.clone() for i, t in kept.items()}

    def group_losses(self, x: torch.Tensor,
                     y: torch.Tensor) -> Tuple[torch.Tensor, List[GroupLoss]]:
        """Run every group of the current phase.

        x: (B, C, H, W), y: (B,). Returns the (B, num_classes) logits of the group holding
        block N and one :class:`GroupLoss` per group, in block order.
        """
        n = self.schedule.num_blocks
        groups = self.schedule.partitions[self._phase]
        every = set(range(1, n + 1))  # one set for every phase, so a pack shares it
        target = self.shared_teacher(f"blocks/{n}", x, lambda: self.teacher_activations(x, every))
        losses = []
        for group in groups:
            first, last = group[0], group[-1]
            h = x if first == 1 else self._adapt(self.in_adapters, first, target[first - 1])
            for block in self.student_blocks[first - 1:last]:
                h = block(h)
            if last < n:
                pred = self._adapt(self.out_adapters, last, h)
                terms = {"loss_feat": self.cfg.feature_weight * F.mse_loss(pred, target[last])}
            else:
                terms = {}
                if self.cfg.ce_weight > 0:
                    terms["loss_ce"] = self.cfg.ce_weight * F.cross_entropy(h, y)
                terms["loss_kd"] = self.cfg.kd_weight * kd_loss(h, target[n],
                                                                 self.cfg.kd_temperature)
            losses.append(GroupLoss(group, terms))
        return h, losses  # the last group holds block N: h is its logits

    @staticmethod
    def _adapt(adapters: nn.ModuleDict, block: int, h: torch.Tensor) -> torch.Tensor:
        key = str(block)
        return adapters[key](h) if key in adapters else h

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        """x: (B, C, H, W) images, y: (B,) labels, index: (B,) sample ids (unused).

        Returns the (B, num_classes) logits of the group holding block N (the student's own
        logits in the end-to-end phase) and ``loss_feat`` (sum over the other groups, omitted
        when there is none), ``loss_ce`` (when ce_weight > 0) and ``loss_kd``.
        """
        logits, losses = self.group_losses(x, y)
        terms: LossTerms = {}
        if len(losses) > 1:
            terms["loss_feat"] = sum(g.terms["loss_feat"] for g in losses[:-1])
        terms.update(losses[-1].terms)
        return logits, terms
