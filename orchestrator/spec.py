"""A job's resolved, canonical description and its content address."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

STAGES = ("teacher", "distill", "ablation")


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines a job's result; its hash is the job id.

    stage:       ``teacher`` (pretraining a teacher), ``distill`` (training a student with a
                 method; ``vanilla`` is the student alone) or ``ablation`` (the same with
                 settings from one of the study's ablation axes).
    model:       the architecture this job trains.
    teacher:     the teacher architecture a distill job reads (None when the method needs none).
    teacher_job: the id of the job whose weights are the teacher.
    method_cfg, dataset_cfg, recipe: resolved settings (plain JSON-able dicts), never changed
                 once the spec exists: the id is computed once and kept.
    init_from:   ``"<job_id>@<global_step>"``: the job starts from that job's checkpoint at that
                 step instead of from scratch (a Population Based Training exploit). Part of the
                 id only when set, so the ids of jobs without it are unchanged.
    """

    stage: str
    method: str
    model: str
    dataset: str
    seed: int
    method_cfg: Dict[str, Any]
    dataset_cfg: Dict[str, Any]
    recipe: Dict[str, Any]
    teacher: Optional[str] = None
    teacher_job: Optional[str] = None
    init_from: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def job_id(self) -> str:
        """sha256 of the canonical JSON of the spec, labels (runtime-only) excluded; 16 hex.

        Computed on first access and kept (a 1,000-job status reads each id several times);
        the fields are serialised as they are, without :func:`dataclasses.asdict`'s deep copy.
        """
        content = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "labels"}
        if content["init_from"] is None:
            content.pop("init_from")
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def needs(self) -> tuple[str, ...]:
        """Ids of the jobs that must finish before this one starts."""
        return (self.teacher_job,) if self.teacher_job else ()

    @property
    def title(self) -> str:
        """A short human name: ``kd resnet20->resnet8 digits s0``."""
        pair = f"{self.teacher}->{self.model}" if self.teacher else self.model
        what = self.method
        if self.stage == "teacher":
            what = "teacher" if self.method == "vanilla" else self.method
            what += " (random init)" if self.recipe.get("epochs") == 0 else ""
        variant = f" [{self.labels['variant']}]" if self.labels.get("variant") else ""
        share = f" {float(self.labels['fraction']):.0%}" if self.labels.get("fraction") else ""
        origin = f" (from {self.init_from[:8]})" if self.init_from else ""
        return f"{what}{variant} {pair} {self.dataset}{share} s{self.seed}{origin}"

    @property
    def donor(self) -> Optional[Tuple[str, int]]:
        """``init_from`` as (job id, global step); None when the job starts from scratch."""
        if self.init_from is None:
            return None
        job_id, _, step = self.init_from.partition("@")
        return job_id, int(step)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Dict[str, Any]) -> "JobSpec":
        return JobSpec(**data)
