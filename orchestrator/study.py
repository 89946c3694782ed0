"""A study (methods x pairs x datasets x seeds) expanded into a validated job graph."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping

import torch

from kdflow.methods.config import config_record, parse_config, require_one_line
from kdflow.methods.distillers import DISTILLERS, TeacherRequest
from kdflow.methods.features import TapShapes
from kdflow.methods.errors import ConfigError
from kdflow.methods.models import MODELS, build_model, probe_taps
from kdflow.methods.tasks import CLASSIFICATION
from kdflow.orchestrator.data import dataset_record, validate_dataset
from kdflow.orchestrator.recipe import Recipe
from kdflow.orchestrator.spec import STAGES, JobSpec


@dataclass
class JobGraph:
    """Jobs in dependency order (every job after the jobs it needs); ids are unique."""

    study: str
    jobs: List[JobSpec]

    def by_id(self) -> Dict[str, JobSpec]:
        return {job.job_id: job for job in self.jobs}


#: Seeds are 32-bit unsigned integers, as every RNG kdflow seeds accepts them.
SEED_RANGE = range(0, 2**32)
#: A model is refused on images more than this many times smaller per side than its native
#: input size: an ImageNet network (224 px) then gets under 28 px, which its strided stem and
#: stages shrink to a single pixel long before the last stage, and trains at chance.
MAX_INPUT_SHRINK = 8


def _resolve_recipe(values: Mapping[str, Any], model: str, field: str) -> Dict[str, Any]:
    recipe = parse_config(Recipe, values, field)
    if recipe.epochs < 1:
        raise ConfigError(f"{field}.epochs", f"must be >= 1 in a study, got {recipe.epochs}",
                          fix=f"set {field}.epochs to the epochs to train (an untrained, "
                              "random teacher is inverted_projection's teacher_init=random)")
    if recipe.lr is None:
        recipe.lr = MODELS.get(model).default_lr
    return config_record(recipe)


def _check_method_recipes(study: Mapping[str, Any]) -> None:
    """ConfigError unless ``study.method_recipes`` maps registered methods to recipe settings."""
    overrides = study.get("method_recipes") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError("study.method_recipes", f"must map methods to recipe settings, got "
                          f"{overrides!r}", fix="e.g. method_recipes: {hsakd: {nesterov: true}}")
    for trainer, values in overrides.items():
        DISTILLERS.get(trainer, f"study.method_recipes.{trainer}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"study.method_recipes.{trainer}", f"must map recipe settings to "
                              f"values, got {values!r}", fix="e.g. {nesterov: true}")


def _method_recipe(study: Mapping[str, Any], key: str, model: str, resolved: Dict[str, Any],
                   trainer: str) -> Dict[str, Any]:
    """The recipe of a job that method ``trainer`` trains on ``model``: ``resolved`` (the study's
    ``key``, ``teacher_recipe`` or ``student_recipe``, resolved for ``model``), or, when
    ``study.method_recipes`` names ``trainer`` (a method's official recipe differences, such as
    HSAKD's Nesterov SGD), the study's ``key`` with those settings over it. Jobs of the other
    methods keep ``resolved``, and so their ids."""
    values = (study.get("method_recipes") or {}).get(trainer)
    if values is None:
        return resolved
    return _resolve_recipe({**(study.get(key) or {}), **values}, model,
                           f"study.method_recipes.{trainer}")


def _require_list(study: Mapping[str, Any], key: str) -> List[Any]:
    value = study.get(key)
    if value is not None and not isinstance(value, (list, tuple)):
        raise ConfigError(f"study.{key}", f"must be a list, got {value!r}",
                          fix=f"write study.{key} as a list, e.g. study.{key}=[...]")
    if not value:
        raise ConfigError(f"study.{key}", "is empty or missing",
                          fix=f"list at least one entry under study.{key}")
    return list(value)


def _seed(value: Any, field: str) -> int:
    """``value`` as a seed; ConfigError at ``field`` unless an integer in :data:`SEED_RANGE`."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in SEED_RANGE:
        raise ConfigError(field, f"must be an integer from 0 to {SEED_RANGE.stop - 1}, got {value!r}",
                          fix=f"set {field} to e.g. 0")
    return value


def _study_name(study: Mapping[str, Any]) -> str:
    """The study's name, which names its folders, MLflow experiment and SLURM jobs."""
    name = study.get("name") or "study"
    if not isinstance(name, str):
        raise ConfigError("study.name", f"must be text, got {name!r}", fix="set study.name=my_study")
    require_one_line("study.name", name)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError("study.name", f"{name!r} is not a folder name (it names the study's "
                          "report and log folders)", fix="use a name without / or \\, e.g. "
                          "study.name=kd_sweep")
    return name


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the body with torch on one intra-op thread, restoring the thread count after.

    A probe's forward pass is two small images: torch's default of one thread per core gains
    nothing there, and on a busy machine its threads wait for each other (a 1,000-job plan took
    21-25 s with the default and under 3 s with one thread on 2 busy cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _model_taps(model: str, num_classes: int, input_shape: tuple[int, int, int]) -> TapShapes:
    """A zoo model's tap shapes on inputs of ``input_shape`` (C, H, W). Probing builds the model
    and runs a forward pass on one thread (:func:`_one_thread`), so each (model, classes, shape)
    is probed once per process, not once per method of every pair."""
    with _one_thread():
        return probe_taps(build_model(model, num_classes), input_shape)


def _check_pair(method: str, method_cfg: Any, teacher: str | None, student: str,
                input_shape: tuple[int, int, int], num_classes: int, teacher_classes: int,
                field: str) -> None:
    """Probe both models on the student dataset's input shape (the teacher with the class count
    of its own dataset) and let the method refuse the pair."""
    try:
        student_taps = _model_taps(student, num_classes, input_shape)
        teacher_taps = _model_taps(teacher, teacher_classes, input_shape) if teacher else None
    except RuntimeError as err:
        raise ConfigError(field, f"{teacher or ''}->{student} cannot run on inputs of shape "
                          f"{input_shape}: {str(err).splitlines()[0]}",
                          fix="pick models built for this dataset's image size") from None
    try:
        DISTILLERS.get(method).check_taps(method_cfg, teacher_taps, student_taps)
    except ConfigError as err:
        raise ConfigError(f"study.methods.{method}.{err.field}",
                          f"{err.problem} (pair {teacher}->{student})", err.allowed, err.fix) from None


def _require_input_size(model: str, input_shape: tuple[int, int, int], field: str,
                        dataset: str) -> None:
    """ConfigError at ``field`` when zoo model ``model`` is built for inputs more than
    :data:`MAX_INPUT_SHRINK` times larger per side than ``dataset``'s (C, H, W) images."""
    native, side = MODELS.get(model, field).input_size, min(input_shape[1:])
    if side * MAX_INPUT_SHRINK < native:
        least = -(-native // MAX_INPUT_SHRINK)
        raise ConfigError(field, f"{model!r} is built for {native}-pixel inputs, and dataset "
                          f"{dataset!r} has {side}-pixel images: its strided layers shrink them "
                          "to nothing and it trains at chance",
                          fix="use a model built for small images (the CIFAR zoo: resnet8, "
                              f"wrn_16_1, vgg8, MobileNetV2, ...) or images of at least "
                              f"{least} pixels (the dataset's image_size)")


def _check_train_size(method: str, method_cfg: Any, dataset_cfg: Any, field: str) -> None:
    """Let ``method`` refuse the training split's size where the dataset's settings fix it
    without loading anything (``num_train`` of the generated datasets); the other datasets'
    sizes are known only when a job loads them. A method opts in with a classmethod
    ``check_train_size(cfg, num_samples)`` (CRD: K negatives need K samples)."""
    size = getattr(dataset_cfg, "num_train", None)
    check = getattr(DISTILLERS.get(method), "check_train_size", None)
    if size is None or check is None:
        return
    try:
        check(method_cfg, size)
    except ConfigError as err:
        raise err.under(field) from None


@dataclass(frozen=True)
class MethodVariant:
    """One method with one combination of ablated settings.

    stage: ``distill`` for the study's own settings, ``ablation`` for the other combinations.
    label: ``setting=value, ...`` of the ablated settings ("" for a method without ablations).
    """

    method: str
    cfg: Any
    stage: str
    label: str


def _method_variants(methods: Mapping[str, Any], ablations: Mapping[str, Any]) -> List[MethodVariant]:
    """Each method's study settings, plus one variant per combination of its ablation axes.

    ``ablations`` maps a method to a grid ``{setting: [value, ...]}`` or to a list of grids
    (each expanded on its own, for axes that cannot be crossed, such as StableKD's block count
    and its phase boundaries). A combination equal to the study's own settings is the method's
    ``distill`` job, not a second copy.
    """
    for method in ablations:
        if method not in methods:
            raise ConfigError(f"study.ablations.{method}", "is not a method of this study",
                              allowed=list(methods))
    variants: List[MethodVariant] = []
    for method, values in methods.items():
        cls = DISTILLERS.get(method, f"study.methods.{method}")
        base = parse_config(cls.Config, values, f"study.methods.{method}")
        grids = ablations.get(method) or {}
        grids = [dict(g) for g in grids] if isinstance(grids, (list, tuple)) else [dict(grids)]
        axes = list(dict.fromkeys(k for grid in grids for k in grid))
        settings = [f.name for f in dataclasses.fields(base)]
        for setting, options in ((k, v) for grid in grids for k, v in grid.items()):
            if setting not in settings:
                raise ConfigError(f"study.ablations.{method}.{setting}", "unknown setting",
                                  allowed=settings)
            if not isinstance(options, (list, tuple)) or not options:
                raise ConfigError(f"study.ablations.{method}.{setting}",
                                  f"must be a non-empty list of values, got {options!r}",
                                  fix=f"list the values to compare, e.g. study.ablations."
                                      f"{method}.{setting}=[a,b]")

        def label(cfg: Any) -> str:
            return ", ".join(f"{k}={getattr(cfg, k)}" for k in axes)

        seen = [base]
        variants.append(MethodVariant(method, base, "distill", label(base)))
        for grid in grids:
            for combo in itertools.product(*grid.values()):
                cfg = parse_config(cls.Config, {**dataclasses.asdict(base), **dict(zip(grid, combo))},
                                   f"study.ablations.{method}")
                if cfg not in seen:
                    seen.append(cfg)
                    variants.append(MethodVariant(method, cfg, "ablation", label(cfg)))
    return variants


def _fraction_variants(dataset: str, values: Mapping[str, Any] | None, field: str,
                       require_data: bool, fractions: Any,
                       common: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The student jobs' data: the dataset as declared, or one copy per ``train_fractions``
    entry (teachers always train on the dataset as declared, as in few-shot KD studies)."""
    if fractions is None:
        return [common]
    if not isinstance(fractions, (list, tuple)) or not fractions:
        raise ConfigError("study.train_fractions", f"must be a non-empty list, got {fractions!r}",
                          fix="e.g. train_fractions: [1.0, 0.4]")
    out = []
    for fraction in fractions:
        cfg = validate_dataset(dataset, {**(values or {}), "train_fraction": fraction},
                               field, require_data)
        labels = {**common["labels"], "fraction": str(fraction)}
        out.append({**common, "dataset_cfg": dataset_record(cfg), "labels": labels})
    return out


def _add_teacher(jobs: Dict[str, JobSpec], request: TeacherRequest, model: str, seed: int,
                 recipe_for: Callable[[str], Dict[str, Any]], common: Dict[str, Any]) -> str:
    """Add the teacher job ``request`` describes (and the teachers it needs); its id.

    A trainer may itself need a teacher (HSAKD's frozen-backbone heads start from the plain
    teacher), so teacher jobs chain; identical requests map to one shared job.
    ``recipe_for`` gives the resolved recipe of a teacher job by the method that trains it.
    """
    recipe = recipe_for(request.trainer)
    trainer = DISTILLERS.get(request.trainer)
    settings = parse_config(trainer.Config, request.settings, f"teacher.{request.trainer}")
    upstream = trainer.teacher_request(settings)
    spec = JobSpec(
        stage="teacher", method=request.trainer, model=model, seed=seed,
        method_cfg=config_record(settings),
        recipe=recipe if request.trained else {**recipe, "epochs": 0},
        teacher=model if upstream else None,
        teacher_job=(_add_teacher(jobs, upstream, model, seed, recipe_for, common)
                     if upstream else None),
        **common)
    jobs.setdefault(spec.job_id, spec)
    return spec.job_id


def _task(cfg: Any) -> str:
    """The task of a dataset's parsed settings (classification unless the Config says)."""
    return getattr(cfg, "task", CLASSIFICATION)


def _require_task(model: str, task: str, field: str, dataset: str, teacher: bool = False) -> None:
    """ConfigError at ``field`` unless zoo model ``model`` serves ``task``."""
    model_task = MODELS.get(model, field).task
    if model_task != task:
        kind = ("a segmentation model (deeplabv3_*, pspnet_*, fcn_*, lraspp_*)"
                if task != CLASSIFICATION else "a classifier")
        cross = (f"; a {model_task} teacher needs a dataset of its task: set the method's "
                 "teacher_dataset (cross-task KD, e.g. inverted_projection)") if teacher else ""
        raise ConfigError(field, f"{model!r} is a {model_task} model, and dataset {dataset!r} "
                          f"is a {task} dataset", fix=f"use {kind}{cross}")


@dataclass(frozen=True)
class TeacherData:
    """Where a teacher trains: its dataset's spec fields and facts about it."""

    common: Dict[str, Any]
    task: str
    num_classes: int


def _teacher_data(name: str, study: Mapping[str, Any], require_data: bool,
                  cache: Dict[str, TeacherData]) -> TeacherData:
    """The dataset ``name`` a cross-task teacher trains on, with the settings under
    ``study.teacher_datasets.<name>`` (its config's defaults when absent)."""
    if name not in cache:
        field = f"study.teacher_datasets.{name}"
        cfg = validate_dataset(name, (study.get("teacher_datasets") or {}).get(name), field,
                               require_data)
        cache[name] = TeacherData({"dataset": name, "dataset_cfg": dataset_record(cfg),
                                   "labels": {"study": study.get("name") or "study"}},
                                  _task(cfg), cfg.class_count())
    return cache[name]


def expand_study(study: Mapping[str, Any], require_data: bool = True,
                 probe: bool = True) -> JobGraph:
    """Validate ``study`` (the composed ``study`` config) and expand it into its job graph.

    Every name, setting and teacher/student pairing is checked before a single job exists;
    the first problem raises :class:`ConfigError` naming the field. ``require_data=False``
    (a dry run) skips only the check that the datasets' files exist. ``probe=False`` (``kdflow
    status``, which only reads the jobs' records) skips building every model and running it on
    the dataset's input shape, and the methods' checks of the pairs' taps: the graph and its
    job ids are the same, only a pair that cannot run goes unnoticed.
    """
    name = _study_name(study)
    pairs = _require_list(study, "pairs")
    seeds = [_seed(seed, f"study.seeds[{i}]") for i, seed in enumerate(_require_list(study, "seeds"))]
    datasets = study.get("datasets") or {}
    methods = study.get("methods") or {}
    if not datasets:
        raise ConfigError("study.datasets", "no dataset", allowed=[])
    if not methods:
        raise ConfigError("study.methods", "no method", allowed=DISTILLERS.names())

    variants = _method_variants(methods, study.get("ablations") or {})
    _check_method_recipes(study)

    for i, pair in enumerate(pairs):
        for role in ("teacher", "student"):
            if role not in pair:
                raise ConfigError(f"study.pairs[{i}].{role}", "missing",
                                  fix="write each pair as {teacher: <model>, student: <model>}")
            MODELS.get(pair[role], f"study.pairs[{i}].{role}")

    jobs: Dict[str, JobSpec] = {}
    teacher_datasets: Dict[str, TeacherData] = {}
    teacher_seed = _seed(study.get("teacher_seed", 0), "study.teacher_seed")
    for dataset, dataset_values in datasets.items():
        dataset_field = f"study.datasets.{dataset}"
        dataset_cfg = validate_dataset(dataset, dataset_values, dataset_field, require_data)
        try:
            input_shape, num_classes = dataset_cfg.input_shape(), dataset_cfg.class_count()
        except ConfigError as err:
            raise err.under(dataset_field) from None
        task = _task(dataset_cfg)
        for method in methods:
            cls = DISTILLERS.get(method)
            if task not in cls.tasks:
                raise ConfigError(f"study.methods.{method}", f"method {method!r} trains "
                                  f"{' and '.join(cls.tasks)} models, and dataset {dataset!r} is "
                                  f"a {task} dataset", fix="use a method of that task: "
                                  + ", ".join(m for m in DISTILLERS.names()
                                              if task in DISTILLERS.get(m).tasks))
        common = {"dataset": dataset, "dataset_cfg": dataset_record(dataset_cfg),
                  "labels": {"study": name}}
        own_data = TeacherData(common, task, num_classes)
        student_data = _fraction_variants(dataset, dataset_values, dataset_field, require_data,
                                          study.get("train_fractions"), common)
        for i, pair in enumerate(pairs):
            student = pair["student"]
            _require_task(student, task, f"study.pairs[{i}].student", dataset)
            _require_input_size(student, input_shape, f"study.pairs[{i}].student", dataset)
            student_recipe = _resolve_recipe(study.get("student_recipe") or {}, student,
                                             "study.student_recipe")
            for variant in variants:
                method, method_cfg = variant.method, variant.cfg
                request = DISTILLERS.get(method).teacher_request(method_cfg)
                teacher = (request.model or pair["teacher"]) if request else None
                teacher_field = (f"study.methods.{method}.teacher_model"
                                 if request and request.model else f"study.pairs[{i}].teacher")
                teacher_data = own_data
                if request and request.dataset:
                    teacher_data = _teacher_data(request.dataset, study, require_data,
                                                 teacher_datasets)
                if teacher:
                    _require_task(teacher, teacher_data.task, teacher_field,
                                  teacher_data.common["dataset"], teacher=True)
                    _require_input_size(teacher, input_shape, teacher_field, dataset)
                if probe:
                    _check_pair(method, method_cfg, teacher, student, input_shape, num_classes,
                                teacher_data.num_classes, f"study.pairs[{i}]")
                _check_train_size(method, method_cfg, dataset_cfg, f"study.methods.{method}")
                teacher_job = None
                if request:
                    teacher_recipe = _resolve_recipe(study.get("teacher_recipe") or {}, teacher,
                                                     "study.teacher_recipe")
                    teacher_job = _add_teacher(
                        jobs, request, teacher, teacher_seed,
                        functools.partial(_method_recipe, study, "teacher_recipe", teacher,
                                          teacher_recipe), teacher_data.common)
                cross = ({"pair_teacher": pair["teacher"]}
                         if teacher not in (None, pair["teacher"]) or teacher_data is not own_data
                         else {})
                for data in student_data:
                    labels = {**data["labels"], **cross,
                              **({"variant": variant.label} if variant.label else {})}
                    for seed in seeds:
                        spec = JobSpec(
                            stage=variant.stage, method=method, model=student, seed=seed,
                            method_cfg=config_record(method_cfg),
                            recipe=_method_recipe(study, "student_recipe", student,
                                                  student_recipe, method),
                            teacher=teacher, teacher_job=teacher_job,
                            **{**data, "labels": labels})
                        jobs.setdefault(spec.job_id, spec)
    by_stage = sorted(jobs.values(), key=lambda job: STAGES.index(job.stage))
    return JobGraph(study=name, jobs=_dependency_order(by_stage))


def _dependency_order(jobs: List[JobSpec]) -> List[JobSpec]:
    """``jobs`` reordered so that every job comes after the jobs it needs (stable otherwise)."""
    placed: Dict[str, JobSpec] = {}
    by_id = {job.job_id: job for job in jobs}

    def place(job: JobSpec) -> None:
        for need in job.needs:
            if need not in placed:
                place(by_id[need])
        placed.setdefault(job.job_id, job)

    for job in jobs:
        place(job)
    return list(placed.values())
