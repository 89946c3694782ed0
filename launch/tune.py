"""``kdflow tune``: a Ray Tune search over the settings of one distillation job of a study.

Each trial is the study's job with the sampled settings applied, so it is itself a
content-addressed job in the store (a trial equal to a finished job reuses it); it trains
through :func:`orchestrator.runner.run_job`, reporting every epoch to Tune. The teacher the job
needs is trained (or reused) before the search starts; trials never train a teacher.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import yaml

from kdflow.launch.search_space import Param, apply_settings, flat_settings, parse_space, run_overrides, tune_space
from kdflow.methods.config import parse_config, require_positive
from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.atomic import atomic_write
from kdflow.orchestrator.checkpoint import init_checkpoint_path, latest_checkpoint_path
from kdflow.orchestrator.runner import JobInterrupted, RunOptions, run_job
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.store import JobStore
from kdflow.orchestrator.study import JobGraph

if TYPE_CHECKING:
    from kdflow.launch.cli import Session

METRICS = ("val/top1", "val/top5", "val/miou", "val/pixel_acc", "train/loss")
MODES = ("max", "min")
PARENT_RUN_FILE = "mlflow_parent_run_id"
#: In a search's folder: what defines its trials (:class:`SearchRecord`).
SEARCH_RECORD = "search.json"
#: Search settings that do not change which trials a search runs: its name (the folder), how
#: many trials (compared on its own: Tune cannot change it), and where and how they run.
NOT_DEFINING = ("name", "num_samples", "max_concurrent", "cpus_per_trial", "gpus_per_trial",
                "ray_address")
TRIAL_FILE = "trial.json"
DONOR_FILE = "state.pt"


@dataclass
class SearchConfig:
    """The ``search`` config node (``configs/search/<name>.yaml``).

    job: which job of the study is tuned: ``pair`` (index into study.pairs), ``seed`` (None:
    the study's first) and ``dataset`` (None: the first); asha: ``grace_period`` (epochs a
    trial always runs) and ``reduction_factor`` (1 in this many trials goes on at each rung).
    pbt: ``perturbation_interval`` (epochs between exploit/explore steps) and
    ``resample_probability`` (chance a perturbed setting is drawn afresh from its range).
    max_concurrent: trials run at once (None: as many as the resources allow).
    cpus_per_trial / gpus_per_trial: Ray resources of one trial (fractions allowed).
    ray_address: an existing Ray cluster (None: start one on this machine).
    """

    name: str
    method: str
    space: Dict[str, Any]
    job: Dict[str, Any] = field(default_factory=dict)
    num_samples: int = 8
    metric: str = "val/top1"
    mode: str = "max"
    search_alg: str = "random"
    scheduler: str = "asha"
    asha: Dict[str, Any] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    pbt: Dict[str, Any] = field(default_factory=lambda: {"perturbation_interval": 2,
                                                         "resample_probability": 0.25})
    max_concurrent: Optional[int] = None
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    ray_address: Optional[str] = None
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_samples", *(("max_concurrent",) if self.max_concurrent is not None else ())):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}",
                                  fix=f"set search.{name} to a whole number >= 1")
        if self.metric not in METRICS:
            raise ConfigError("metric", f"unknown metric {self.metric!r}", allowed=METRICS)
        if self.mode not in MODES:
            raise ConfigError("mode", f"unknown mode {self.mode!r}", allowed=MODES)
        require_positive("cpus_per_trial", self.cpus_per_trial)
        if self.gpus_per_trial < 0:
            raise ConfigError("gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial!r}")
        if self.search_alg not in SEARCH_ALGS:
            raise ConfigError("search_alg", f"unknown search algorithm {self.search_alg!r}",
                              allowed=list(SEARCH_ALGS))
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("scheduler", f"unknown scheduler {self.scheduler!r}",
                              allowed=list(SCHEDULERS))
        for name in ("grace_period", "reduction_factor"):
            value = self.asha.get(name)
            if not isinstance(value, int) or value < 1 or (name == "reduction_factor" and value < 2):
                raise ConfigError(f"asha.{name}", f"must be an integer >= "
                                  f"{2 if name == 'reduction_factor' else 1}, got {value!r}")
        self._validate_pbt()

    def _validate_pbt(self) -> None:
        interval = self.pbt.get("perturbation_interval")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ConfigError("pbt.perturbation_interval",
                              f"must be an integer >= 1, got {interval!r}")
        chance = self.pbt.get("resample_probability")
        if not isinstance(chance, (int, float)) or isinstance(chance, bool) or not 0 <= chance <= 1:
            raise ConfigError("pbt.resample_probability",
                              f"must be a number in [0, 1], got {chance!r}")
        if self.scheduler == "pbt" and self.search_alg != "random":
            raise ConfigError("search_alg", "scheduler pbt takes no searcher, got "
                              f"{self.search_alg!r}", allowed=["random"], fix="use search_alg=random with scheduler=pbt")


# --- search algorithms and schedulers -------------------------------------------------------

def _no_check(_params: List[Param]) -> None:
    return None


def _all_discrete(params: List[Param]) -> None:
    for param in params:
        if not param.kind.discrete:
            raise ConfigError(f"search.space.{param.path}.type",
                              f"a grid search cannot enumerate a {param.type} parameter",
                              allowed=["choice", "grid"], fix="list its values, or use search_alg=random")


def _no_grid(params: List[Param]) -> None:
    for param in params:
        if param.type == "grid":
            raise ConfigError(f"search.space.{param.path}.type", "Optuna samples; it takes no grid "
                              "parameter", fix="use type: choice")
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("search.search_alg", "optuna is not installed",
                          fix="pip install optuna, or use search_alg=random")


def _optuna(search: SearchConfig) -> Any:
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=search.seed)


def _basic(search: SearchConfig) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed)


@dataclass(frozen=True)
class SearchAlg:
    """check: refuses a space the algorithm cannot search (ConfigError, before Ray starts);
    grid: enumerate every parameter; build: the Tune searcher."""

    check: Callable[[List[Param]], None]
    grid: bool
    build: Callable[[SearchConfig], Any]


SEARCH_ALGS: Dict[str, SearchAlg] = {
    "random": SearchAlg(_no_check, False, _basic),
    "grid": SearchAlg(_all_discrete, True, _basic),
    "optuna": SearchAlg(_no_grid, False, _optuna),
}


def _asha(search: SearchConfig, max_epochs: int, _params: List[Param]) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                         grace_period=min(search.asha["grace_period"], max_epochs),
                         reduction_factor=search.asha["reduction_factor"])


def _fifo(_search: SearchConfig, _max_epochs: int, _params: List[Param]) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def perturbable(params: List[Param]) -> List[Param]:
    """The parameters PBT may change during a trial: all but the ``grid`` ones."""
    return [p for p in params if p.type != "grid"]


def check_pbt(params: List[Param]) -> None:
    """Refuse a PBT search with nothing to perturb (ConfigError, before Ray starts)."""
    if not perturbable(params):
        raise ConfigError("search.space", "scheduler pbt needs at least one parameter it can "
                          "perturb; a grid parameter is fixed for the whole trial",
                          fix="give a parameter type uniform, loguniform, randint or choice")


@dataclass(frozen=True)
class ClampToSpace:
    """PBT's ``custom_explore_fn``: a perturbed value (multiplied by 0.8 or 1.2) is put back
    inside its parameter's range (integers stay integers), so every explored trial is valid."""

    params: Tuple[Param, ...]

    def __call__(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for param in self.params:
            if param.kind.discrete:
                continue
            low, high = param.kind.edges(param.path, param.args)
            value = min(max(config[param.target][param.name], low), high)
            config[param.target][param.name] = round(value) if param.type == "randint" else value
        return config


def _pbt(search: SearchConfig, _max_epochs: int, params: List[Param]) -> Any:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    mutations: Dict[str, Dict[str, Any]] = {}
    for param in perturbable(params):
        mutation = param.values() if param.kind.discrete else param.kind.sampler(tune, param.args)
        mutations.setdefault(param.target, {})[param.name] = mutation
    return PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=search.pbt["perturbation_interval"],
        resample_probability=search.pbt["resample_probability"], hyperparam_mutations=mutations,
        custom_explore_fn=ClampToSpace(tuple(perturbable(params))))


SCHEDULERS: Dict[str, Callable[[SearchConfig, int, List[Param]], Any]] = {
    "asha": _asha, "fifo": _fifo, "pbt": _pbt}


# --- the search's identity: a changed search is a new search --------------------------------

def search_definition(search: SearchConfig, base: JobSpec) -> Dict[str, str]:
    """What decides a search's trials, as flat ``name -> value`` text: every resolved setting
    of the tuned job (``job.recipe.epochs``...) and the search's settings but
    :data:`NOT_DEFINING` (``search.space.method.temperature.high``...)."""
    from kdflow.orchestrator.tracking import flatten

    job = {k: v for k, v in base.to_json().items() if k != "labels"}
    settings = {k: v for k, v in dataclasses.asdict(search).items() if k not in NOT_DEFINING}
    return flatten({"job": job, "search": settings})


def fingerprint(definition: Mapping[str, str]) -> str:
    """8 hex digits of sha256 over ``definition`` (its keys sorted)."""
    text = json.dumps(dict(sorted(definition.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SearchRecord:
    """A search as made (``search.json`` in its folder): what defines its trials, how many it
    runs, and the overrides of the command that made it."""

    definition: Dict[str, str]
    num_samples: int
    overrides: List[str]

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the definition (the trial count left out)."""
        return fingerprint(self.definition)

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**dataclasses.asdict(self), "fingerprint": self.fingerprint}, indent=1)
        atomic_write(folder / SEARCH_RECORD, lambda f: f.write(text.encode()))

    @staticmethod
    def read(folder: Path) -> Optional["SearchRecord"]:
        """The record in ``folder``; None when there is none."""
        path = folder / SEARCH_RECORD
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return SearchRecord(data["definition"], data["num_samples"], data["overrides"])


def differences(old: Mapping[str, str], new: Mapping[str, str], count: int = 6) -> str:
    """``job.recipe.epochs 4 -> 2, ...``: the first ``count`` settings that differ."""
    keys = sorted(set(old) | set(new))
    changed = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys
               if old.get(k) != new.get(k)]
    more = f" and {len(changed) - count} more" if len(changed) > count else ""
    return ", ".join(changed[:count]) + more


def why_new(old: Optional[SearchRecord], new: SearchRecord, folder: Path) -> Optional[str]:
    """Why the search ``new`` cannot continue the one in ``folder`` (whose record is ``old``);
    None when it can (same definition, same number of trials)."""
    if old is None:
        return (f"{folder} holds a search with no recorded definition (made by an older "
                "kdflow), so it may have tested other settings")
    if old.fingerprint != new.fingerprint:
        return (f"the search differs from the one in {folder}: "
                f"{differences(old.definition, new.definition)}")
    if old.num_samples != new.num_samples:
        return (f"Ray Tune cannot change the number of trials of an existing search (it "
                f"restores {folder.name} with its {old.num_samples}), and "
                f"search.num_samples={new.num_samples} asks for {new.num_samples}")
    return None


def search_name(output_dir: str, study: str, name: str,
                record: SearchRecord) -> Tuple[str, Optional[str]]:
    """The name the search ``record`` runs under, and why it is not ``name`` (None when it is).

    ``name`` when its folder is free or holds this very search; else ``<name>-<8 hex>`` of the
    definition and trial count, so that the same command always finds the same search again.
    The reason compares ``record`` with an earlier search of the same definition (another
    trial count) if there is one, else with the search under ``name``.
    """
    folder = Path(output_dir) / "tune" / study / name
    made = folder.exists() or (Path(output_dir) / "tune" / f"{study}-tune-{name}").exists()
    why = why_new(SearchRecord.read(folder), record, folder) if made else None
    if why is None:
        return name, None
    renamed = f"{name}-{fingerprint({**record.definition, 'num_samples': str(record.num_samples)})}"
    same = _same_definition(folder, record, renamed)
    return renamed, why if same is None else why_new(SearchRecord.read(same), record, same)


def _same_definition(folder: Path, record: SearchRecord, skip: str) -> Optional[Path]:
    """The folder of a search named ``<folder's name>-...`` but ``skip`` whose definition is
    ``record``'s (so it differs in its trial count only); None when there is none."""
    for sibling in sorted(folder.parent.glob(f"{folder.name}-*")):
        other = SearchRecord.read(sibling)
        if sibling.name != skip and other is not None and other.fingerprint == record.fingerprint:
            return sibling
    return None


# --- the plan: everything validated before Ray starts ---------------------------------------

@dataclass
class SearchPlan:
    """A validated search: the tuned job ``base``, its parameters and where things go.

    overrides: the ``kdflow`` overrides of the command without the search ones (the best
    trial's ``kdflow run`` line starts from them, so it composes the same study).
    name: the name the search runs under: ``search.name``, or a new name when a different
    search (or the same with another number of trials) has that one (:func:`search_name`);
    renamed: why it was renamed (None when it was not).
    """

    search: SearchConfig
    params: List[Param]
    base: JobSpec
    graph: JobGraph
    output_dir: str
    tracking_uri: str
    overrides: List[str]
    name: str = ""
    renamed: Optional[str] = None

    def __post_init__(self) -> None:
        self.name = self.name or self.search.name

    @property
    def record(self) -> SearchRecord:
        """What this search is (written into its folder when it starts)."""
        return SearchRecord(search_definition(self.search, self.base), self.search.num_samples,
                            list(self.overrides))

    @property
    def experiment_name(self) -> str:
        """The Tune experiment's and MLflow experiment's name: ``<study>-tune-<name>``."""
        return f"{self.graph.study}-tune-{self.name}"

    @property
    def search_dir(self) -> Path:
        """``<output_dir>/tune/<study>/<name>``: search.json, best.yaml, best.overrides and
        the parent run id."""
        return Path(self.output_dir) / "tune" / self.graph.study / self.name

    @property
    def tune_path(self) -> Path:
        """The Tune experiment: ``<output_dir>/tune/<experiment_name>``."""
        return Path(self.output_dir) / "tune" / self.experiment_name

    @property
    def expected_trials(self) -> int:
        """Trials a complete search runs: num_samples times every grid's size."""
        grid = SEARCH_ALGS[self.search.search_alg].grid
        sizes = [len(p.values()) for p in self.params if grid or p.type == "grid"]
        return self.search.num_samples * math.prod(sizes)


def plan_search(session: "Session") -> SearchPlan:
    """Validate the ``search`` node of ``session``'s config against its study; the plan."""
    values = session.plain.get("search")
    if not values:
        raise ConfigError("search", "no search chosen", allowed=_search_names(),
                          fix="pass search=<name>, e.g. kdflow tune search=kd study=quick")
    search = parse_config(SearchConfig, values, "search")
    base = _base_job(session.graph, session.plain["study"], search)
    params = parse_space(search.space, base)
    SEARCH_ALGS[search.search_alg].check(params)
    if search.scheduler == "pbt":
        check_pbt(params)
    plan = SearchPlan(search, params, base, session.graph, session.output_dir,
                      session.tracking_uri, session.overrides)
    plan.name, plan.renamed = search_name(plan.output_dir, plan.graph.study, search.name,
                                          plan.record)
    return plan


def _search_names() -> List[str]:
    from kdflow.launch.compose import group_options

    return group_options("search")


def _base_job(graph: JobGraph, study: Mapping[str, Any], search: SearchConfig) -> JobSpec:
    """The study's distill job of ``search.method`` for the chosen pair, seed and dataset."""
    if search.method not in (study.get("methods") or {}):
        raise ConfigError("search.method", f"{search.method!r} is not a method of study "
                          f"{graph.study}", allowed=list(study.get("methods") or {}),
                          fix="pick a study that has it (study=cifar100_benchmark has every method)")
    choice = dict(search.job)
    pairs = study["pairs"]
    pair_index = choice.get("pair", 0)
    if not isinstance(pair_index, int) or not 0 <= pair_index < len(pairs):
        raise ConfigError("search.job.pair", f"no pair {pair_index!r}",
                          allowed=list(range(len(pairs))))
    pair = pairs[pair_index]
    seed = choice.get("seed")
    seed = study["seeds"][0] if seed is None else seed
    dataset = choice.get("dataset") or next(iter(study["datasets"]))
    for job in graph.jobs:
        if (job.stage, job.method, job.model, job.teacher, job.seed, job.dataset) == (
                "distill", search.method, pair["student"], pair["teacher"], seed, dataset):
            return job
    raise ConfigError("search.job", f"study {graph.study} has no {search.method} job for pair "
                      f"{pair_index}, seed {seed}, dataset {dataset}",
                      fix="pick a seed from study.seeds and a dataset from study.datasets")


def tune_overrides(overrides: List[str]) -> List[str]:
    """``overrides`` with ``search=<name>`` turned into ``+search=<name>`` (``search`` is a
    config group that the top-level config does not list: only ``kdflow tune`` uses it)."""
    return [f"+{o}" if o.startswith("search=") else o for o in overrides]


# --- the trials ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, shipped to Ray once (``tune.with_parameters``).

    keep_state: each Tune checkpoint also holds the job's training checkpoint of that epoch
    (PBT: a trial that exploits this one starts from it, whatever this job has pruned since).
    """

    base: JobSpec
    output_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    keep_state: bool = False


class _EpochReporter:
    """Reports each epoch of one trial's job to Tune, with a checkpoint naming the job.

    The job's real state is in its store checkpoints; Tune's checkpoint records the job id, its
    ``init_from``, the epochs reported and the job's newest checkpoint step (with
    ``keep_state``, that checkpoint too), so a restored trial reports only the epochs it has
    not reported yet, and a PBT trial that exploits this one starts from that step.
    The last epoch is reported once the job has written its result (Tune may end the trial at
    that report). A trial the scheduler stops ends its job as ``interrupted``: it resumes from
    its checkpoint if a later trial asks for the same settings.
    """

    def __init__(self, spec: JobSpec, context: TrialContext, reported: int) -> None:
        self.spec = spec
        self.context = context
        self.store = JobStore(Path(context.output_dir) / "jobs")
        self.reported = reported
        self.tagged = False
        self.epochs = int(spec.recipe["epochs"])

    def epoch(self, index: int, metrics: Dict[str, float]) -> None:
        """:class:`RunOptions` ``on_epoch``: ``index`` is the 0-based epoch just finished."""
        if index + 1 < self.epochs:
            try:
                self._report(index, metrics)
            except SystemExit as stop:  # how Tune ends a trial it stops, inside report()
                raise JobInterrupted(f"stopped by the search after epoch {index + 1}", 0) from stop

    def _report(self, index: int, metrics: Dict[str, float]) -> None:
        from ray import tune

        if index < self.reported:
            return
        self._tag_parent()
        self.reported = index + 1
        with tempfile.TemporaryDirectory() as folder:
            latest = latest_checkpoint_path(self.store.checkpoint_dir(self.spec.job_id))
            state = {"job_id": self.spec.job_id, "init_from": self.spec.init_from,
                     "epochs": self.reported, "step": _step_of(latest)}
            (Path(folder) / TRIAL_FILE).write_text(json.dumps(state))
            if self.context.keep_state and latest is not None:
                _link_or_copy(latest, Path(folder) / DONOR_FILE)
            tune.report({**metrics, "epoch": self.reported, "job_id": self.spec.job_id},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    def catch_up(self, history: List[Dict[str, float]]) -> None:
        """Report the epochs of the finished job not reported yet (the last one; all of them
        for a job that was already done)."""
        for index, metrics in enumerate(history):
            self._report(index, {k: v for k, v in metrics.items() if k != "epoch"})

    def _tag_parent(self) -> None:
        """Nest the job's MLflow run under the search's run (once, on its first epoch)."""
        if self.tagged:
            return
        from mlflow.tracking import MlflowClient

        from kdflow.orchestrator.tracking import _retry

        run_id = self.store.state(self.spec.job_id).mlflow_run_id
        if run_id:
            client = MlflowClient(self.context.tracking_uri)
            _retry(lambda: client.set_tag(run_id, "mlflow.parentRunId",
                                          self.context.parent_run_id), "set_tag")
        self.tagged = True


def _step_of(path: Optional[Path]) -> Optional[int]:
    """The global step of the checkpoint file ``path`` (``step-<n>.pt``)."""
    return None if path is None else int(path.stem.split("-", 1)[1])


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def trial_job(spec: JobSpec, store: JobStore) -> tuple[JobSpec, int]:
    """The job a trial with settings ``spec`` runs, and the epochs it has reported already.

    A trial Tune restores from its own checkpoint goes on with the job it names (which may
    start from a donor). A trial restored from another trial's checkpoint (PBT exploited it)
    runs ``spec`` started from that trial's job at its checkpoint step; the donor's training
    checkpoint in Tune's checkpoint, if any, is kept in the new job's ``init`` folder.
    """
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return spec, 0
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / TRIAL_FILE).read_text())
        own = dataclasses.replace(spec, init_from=state.get("init_from"))
        if state["job_id"] == own.job_id or state.get("step") is None:
            return own, state["epochs"]
        job = dataclasses.replace(spec, init_from=f"{state['job_id']}@{state['step']}")
        kept = init_checkpoint_path(store.checkpoint_dir(job.job_id), state["step"])
        donated = Path(folder) / DONOR_FILE
        if donated.exists() and not kept.exists():
            atomic_write(kept, lambda f: f.write(donated.read_bytes()))
        return job, state["epochs"]


def run_trial(config: Dict[str, Any], context: TrialContext) -> None:
    """One trial: the base job with ``config``'s settings, trained (or resumed, or reused);
    after a PBT exploit, the same started from the donor trial's job (:func:`trial_job`)."""
    store = JobStore(Path(context.output_dir) / "jobs")
    spec, reported = trial_job(apply_settings(context.base, flat_settings(config)), store)
    reporter = _EpochReporter(spec, context, reported)
    options = RunOptions(tracking_uri=context.tracking_uri, experiment=context.experiment,
                         progress=False, on_epoch=reporter.epoch)
    try:
        result = run_job(spec, store, options)
    except JobInterrupted:
        return
    reporter.catch_up(result["history"])


# --- the driver ----------------------------------------------------------------------------

def _progress_callback(metric: str, mode: str, max_epochs: int) -> Any:
    """A Tune callback printing one line per finished or failed trial."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done = sum(t.status == "TERMINATED" for t in trials) + 1
            last = trial.last_result or {}
            epochs = last.get("epoch", 0)
            best = trial.metric_analysis.get(metric, {}).get(mode)
            how = "" if epochs >= max_epochs else " (stopped early)"
            print(f"trial {trial.trial_id} finished [{done}/{len(trials)}]: {epochs} epochs{how}, "
                  f"best {metric} {best if best is None else round(best, 2)}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"trial {trial.trial_id} failed: {trial.error_file}", flush=True)

    return TrialLines()


def _init_ray(address: Optional[str]) -> None:
    """Connect to ``address``, or start Ray here on this machine's CPUs, without a dashboard."""
    import logging

    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints nothing of Ray's
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    else:
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)


def _parent_run(plan: SearchPlan) -> str:
    """The search's MLflow run (the same run again when the search resumes); its id."""
    from mlflow.tracking import MlflowClient

    from kdflow.orchestrator.tracking import _retry, ensure_experiment, flatten

    saved = plan.search_dir / PARENT_RUN_FILE
    client = MlflowClient(plan.tracking_uri)
    if saved.exists():
        run_id = saved.read_text().strip()
        _retry(lambda: client.update_run(run_id, status="RUNNING"), "update_run")
        return run_id
    experiment_id = ensure_experiment(plan.tracking_uri, plan.experiment_name)
    run = _retry(lambda: client.create_run(experiment_id, run_name=f"tune {plan.name}", tags={
        "kdflow.search": plan.name, "kdflow.base_job": plan.base.job_id}), "create_run")
    base = plan.base
    params = flatten({
        **{k: v for k, v in dataclasses.asdict(plan.search).items() if k != "name"},
        "method": base.method, "teacher": base.teacher, "student": base.model,
        "dataset": base.dataset, "seed": base.seed})
    for key, value in params.items():
        _retry(lambda: client.log_param(run.info.run_id, key, value[:6000]), "log_param")
    plan.search_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(run.info.run_id)
    return run.info.run_id


def _tuner(plan: SearchPlan, context: TrialContext) -> Any:
    """A new Tuner for ``plan``, or the unfinished experiment of the same name restored."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": plan.search.cpus_per_trial,
                                     "gpu": plan.search.gpus_per_trial})
    path = plan.tune_path
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the search in {path}")
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    search, max_epochs = plan.search, int(plan.base.recipe["epochs"])
    algorithm = SEARCH_ALGS[search.search_alg]
    return tune.Tuner(
        trainable,
        param_space=tune_space(plan.params, tune, grid=algorithm.grid),
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, num_samples=search.num_samples,
            search_alg=algorithm.build(search),
            scheduler=SCHEDULERS[search.scheduler](search, max_epochs, plan.params),
            max_concurrent_trials=search.max_concurrent),
        run_config=tune.RunConfig(
            name=plan.experiment_name, storage_path=str(path.parent), verbose=0,
            callbacks=[_progress_callback(search.metric, search.mode, max_epochs)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=_checkpoints_kept(search)),
            failure_config=tune.FailureConfig(max_failures=0)))


def _checkpoints_kept(search: SearchConfig) -> Optional[int]:
    """Tune checkpoints kept per trial: the newest, or every one under PBT (a trial may exploit
    another's checkpoint after that trial has reported newer ones)."""
    return None if search.scheduler == "pbt" else 1


def _train_teacher(plan: SearchPlan) -> bool:
    """Train (or reuse) the teacher jobs the tuned job needs, before any trial; True if done."""
    from kdflow.launch.local import run_local

    by_id = plan.graph.by_id()
    needed: List[JobSpec] = []
    todo = list(plan.base.needs)
    while todo:
        job = by_id[todo.pop()]
        needed.insert(0, job)
        todo.extend(job.needs)
    if not needed:
        return True
    options = RunOptions(tracking_uri=plan.tracking_uri, experiment=plan.graph.study, progress=False)
    summary = run_local(JobGraph(plan.graph.study, needed), plan.output_dir, options, workers=1)
    print(f"teacher: {summary.render()}")
    return summary.ok


def _saved_outcome(plan: SearchPlan) -> tuple[int, int]:
    """Trials finished and failed, as the experiment's saved state records them (the in-memory
    ResultGrid of an interrupted search shows its pending trials as terminated)."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    trials = ExperimentAnalysis(str(plan.tune_path)).trials
    return (sum(t.status == "TERMINATED" for t in trials), sum(t.status == "ERROR" for t in trials))


def run_search(plan: SearchPlan) -> int:
    """Run (or resume) the search of ``plan``; print the top trials and write the best one.

    Returns 0 when every trial finished, 1 when the search stopped early (Ctrl-C, SIGTERM:
    the same command resumes it) or a trial failed.
    """
    from mlflow.tracking import MlflowClient

    from kdflow.orchestrator.tracking import ensure_experiment

    if plan.renamed:
        print(f"{plan.renamed}; so this search is {plan.name}, a search of its own (trials "
              "whose settings match a finished job reuse it; to name it, pass search.name=...)")
    print(f"search {plan.name}: tuning {plan.base.title} (job {plan.base.job_id}), "
          f"{plan.expected_trials} trials, outputs in {plan.search_dir}")
    if SearchRecord.read(plan.search_dir) is None:
        plan.record.write(plan.search_dir)
    if not _train_teacher(plan):
        return 1
    ensure_experiment(plan.tracking_uri, plan.experiment_name)
    parent = _parent_run(plan)
    context = TrialContext(plan.base, plan.output_dir, plan.tracking_uri, plan.experiment_name,
                           parent, keep_state=plan.search.scheduler == "pbt")
    _init_ray(plan.search.ray_address)
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        grid = _tuner(plan, context).fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = trial_rows(grid, plan.search.metric, plan.search.mode)
    finished, errors = _saved_outcome(plan)
    complete = finished >= plan.expected_trials and not errors
    client = MlflowClient(plan.tracking_uri)
    print(top_table(rows, plan.search.metric))
    if rows:
        print(write_best(plan, rows[0]))
        log_best(client, parent, plan, rows[0])
    client.set_terminated(parent, status="FINISHED" if complete else "KILLED")
    if not complete:
        print(f"search incomplete: {finished} of {plan.expected_trials} trials finished, "
              f"{errors} failed; run the same command again to continue")
    return 0 if complete else 1


# --- the results -----------------------------------------------------------------------------

@dataclass
class TrialRow:
    """One trial's outcome: metric values in the metric's unit (percent for top-1)."""

    trial: str
    settings: Dict[str, Any]
    best: float
    last: float
    epochs: int
    job_id: str


def trial_rows(grid: Any, metric: str, mode: str) -> List[TrialRow]:
    """The trials of Tune's ResultGrid that reported at least one epoch, best first."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame:
            continue
        values = frame[metric]
        rows.append(TrialRow(result.metrics["trial_id"], flat_settings(result.config),
                             float(values.max() if mode == "max" else values.min()),
                             float(values.iloc[-1]), int(frame["epoch"].max()),
                             str(frame["job_id"].iloc[-1])))
    return sorted(rows, key=lambda r: r.best, reverse=mode == "max")


def top_table(rows: List[TrialRow], metric: str, count: int = 5) -> str:
    """A markdown table of the ``count`` best trials."""
    lines = [f"| trial | settings | best {metric} | last {metric} | epochs |",
             "|---|---|---|---|---|"]
    for row in rows[:count]:
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.settings.items())
        lines.append(f"| {row.trial} | {settings} | {row.best:.2f} | {row.last:.2f} | {row.epochs} |")
    return "\n".join(lines)


def best_overrides(plan: SearchPlan, best: TrialRow) -> List[str]:
    """The ``kdflow run`` overrides of the best trial: every override of the command that
    made the search (the study, its recipes such as ``study.student_recipe.epochs``, the
    output_dir...) but the search's own, then the trial's settings."""
    tuned = run_overrides(plan.search.method, best.settings)
    tuned_keys = {o.split("=", 1)[0] for o in tuned}
    kept = [o for o in plan.overrides
            if not o.lstrip("+~").startswith("search") and o.split("=", 1)[0] not in tuned_keys]
    return [*kept, *tuned]


def write_best(plan: SearchPlan, best: TrialRow) -> str:
    """Write ``best.yaml`` (the best trial) and ``best.overrides`` (a ``kdflow run`` line's
    arguments, one per line, that give the study with the best settings); the line to run.

    The overrides are checked to compose a study that holds the best trial's job; the message
    warns when they do not. A best trial whose job starts from another's checkpoint (a PBT
    exploit) has a lineage the overrides cannot give: they carry its settings only,
    ``best.yaml`` records its ``init_from``, and the message says so."""
    overrides = best_overrides(plan, best)
    plan.search_dir.mkdir(parents=True, exist_ok=True)
    init_from = _init_from(plan, best.job_id)
    record = {"study": plan.graph.study, "search": plan.name, "trial": best.trial,
              "job_id": best.job_id, "init_from": init_from, "metric": plan.search.metric,
              "best": best.best, "settings": best.settings, "overrides": overrides}
    (plan.search_dir / "best.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    path = plan.search_dir / "best.overrides"
    path.write_text("\n".join(overrides) + "\n")
    lines = f"best settings written to {plan.search_dir / 'best.yaml'}; run them with:\n" \
            f"  kdflow run $(cat {path})"
    trial = apply_settings(plan.base, best.settings)
    if not reproduces(overrides, trial):
        lines += f"\nwarning: these overrides do not give the best trial's job {trial.job_id}; " \
                 "check best.yaml's settings against `kdflow run --cfg $(cat best.overrides)`"
    if init_from is None:
        return lines
    return lines + f"\nnote: the best trial descends from another via PBT (job {best.job_id} " \
                   f"starts from job {init_from}); this run trains its settings from scratch " \
                   "and does not reproduce that lineage"


def log_best(client: Any, parent: str, plan: SearchPlan, best: TrialRow) -> None:
    """Give the search's MLflow run the best trial: its metric (under the metric's own name,
    e.g. ``val/top1``, so the runs table shows it beside the trials') and, as ``best.<setting>``
    tags, its settings, trial and job (tags: a resumed search may find a better trial)."""
    from kdflow.orchestrator.tracking import _retry

    tags = {**{f"best.{k}": str(v) for k, v in best.settings.items()},
            "best.trial": best.trial, "best.job_id": best.job_id}
    _retry(lambda: client.log_metric(parent, plan.search.metric, best.best), "log_metric")
    for key, value in tags.items():
        _retry(lambda: client.set_tag(parent, key, value), "set_tag")


def reproduces(overrides: List[str], job: JobSpec) -> bool:
    """Whether ``kdflow run <overrides>`` composes a study that holds ``job`` (by its id)."""
    from kdflow.launch.cli import Session

    try:
        graph = Session.compose(overrides, require_data=False).graph
    except ConfigError:
        return False
    return job.job_id in {j.job_id for j in graph.jobs}


def _init_from(plan: SearchPlan, job_id: str) -> Optional[str]:
    """The ``init_from`` of the stored job ``job_id`` (None if it has none or is not stored)."""
    store = JobStore(Path(plan.output_dir) / "jobs")
    try:
        return store.spec(job_id).init_from
    except FileNotFoundError:
        return None
