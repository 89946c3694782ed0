"""MLflow tracking of jobs: one experiment per study, one run per job, per-epoch metrics.

Every call a job makes to MLflow is first written to its outbox
(:mod:`orchestrator.tracking_outbox`), then sent. A server that is down, or stops mid-run,
never stops training: what could not be sent stays in the job folder and goes out, in order
and exactly once, at the next epoch or through ``kdflow sync`` (:func:`sync_job`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, TypeVar
from urllib.parse import parse_qsl, urlsplit

from kdflow.methods.errors import ConfigError
from kdflow.orchestrator.spec import JobSpec
from kdflow.orchestrator.tracking_outbox import Outbox, OutboxContents

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The scheme of an embedded (file) SQLite store's URI.
SQLITE_PREFIX = "sqlite:///"
TAG_FIELDS = ("job_id", "stage", "method", "teacher", "student", "dataset", "seed", "settings")
#: The experiment tag by which MLflow's UI decides what an experiment's link opens: without
#: it, MLflow 3 may open the GenAI traces page ("No data"); with ``custom_model_development``
#: it opens the runs table. Set on every experiment kdflow creates or uses.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: Metric names as sent to MLflow, where they differ from the job's history (``lr`` would
#: come first in MLflow's charts, before the ``train/`` and ``val/`` sections).
MLFLOW_METRIC_NAMES = {"lr": "train/lr"}
#: A tag naming the outbox record that created a run, so that a ``create_run`` whose reply was
#: lost is found again instead of making a second run.
RUN_TOKEN_TAG = "kdflow.run_token"
#: MLflow's HTTP client retries a refused connection for minutes by default; a job whose server
#: is down should notice in seconds and carry on (the outbox keeps what it could not send).
#: Values already set in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


#: Schemes a ``tracking_uri`` may have (MLflow's stores; a SQLAlchemy driver may follow ``+``).
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
#: A query parameter whose name holds one of these words (any case) carries a secret.
SECRET_WORDS = "token|password|passwd|pwd|secret|key|signature|sig|auth|credential"
SECRET_PARAM_NAME = re.compile(SECRET_WORDS, re.IGNORECASE)
#: In any text: the user info (``user:password@``) of a URL, up to its authority's last ``@``,
#: and the value of a secret query parameter.
URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
URL_SECRET_PARAM = re.compile(rf"([?&][\w.-]*(?:{SECRET_WORDS})[\w.-]*=)[^&#\s]*", re.IGNORECASE)
CREDENTIALS_FIX = ("drop them from the URI and export MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead: MLflow reads "
                   "them, and SLURM jobs inherit them without kdflow writing them anywhere")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it hidden: ``user:password@`` becomes
    ``***@`` and the value of a token-like query parameter ``***``. Every tracking URI kdflow
    shows, and every error message that may echo one, goes through it."""
    return URL_SECRET_PARAM.sub(r"\1***", URL_USERINFO.sub(r"\1***@", text))


def check_tracking_uri(uri: str) -> None:
    """ConfigError (field ``tracking_uri``) unless ``uri`` is a tracking store MLflow can use and
    holds no credentials. Accepted: ``http(s)://host...``, ``sqlite:///path``, ``file:path``,
    ``postgresql|mysql|mssql[+driver]://host...``, ``databricks[://profile]``, or a folder path
    (absolute or relative) that has no ``:`` and no ``//`` unless it exists. Refused, e.g.:
    ``http//oops`` (a URL missing its colon would become a local folder), ``htp://x``."""
    problem = _credentials_problem(uri) or _shape_problem(uri)
    if problem is not None:
        why, fix = problem
        raise ConfigError("tracking_uri", why, fix=fix)


def _credentials_problem(uri: str) -> Optional[Tuple[str, str]]:
    """(why, fix) when ``uri`` carries credentials; the answer never repeats them."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # a malformed authority: refused as such by _shape_problem
        return None
    secrets = [name for name, _ in parse_qsl(parts.query) if SECRET_PARAM_NAME.search(name)]
    if "@" in parts.netloc:
        return "it holds credentials (user info before the host)", CREDENTIALS_FIX
    if secrets:
        return f"it holds credentials (query parameter {', '.join(secrets)})", CREDENTIALS_FIX
    return None


def _shape_problem(uri: str) -> Optional[Tuple[str, str]]:
    """(why, fix) when ``uri`` is not a store MLflow can use; None when it is. The answer
    names the scheme at most, never the value (which may hold a secret in a shape no rule
    foresaw)."""
    if uri == "databricks" or Path(uri).exists():
        return None
    scheme_match = URI_SCHEME.match(uri)
    if scheme_match is None:
        if "//" in uri or ":" in uri:
            return ("it is neither a URI (scheme://...) nor an existing folder, and a misspelt "
                    "URL would become a local folder", "write it as http://host:5000 (scheme, "
                    "colon, two slashes), or give a folder path without ':' and '//'")
        return None
    scheme = scheme_match.group(1).lower()
    base = scheme.split("+")[0]
    if base in SERVER_SCHEMES + DATABASE_SCHEMES and not _hostname(uri):
        return (f"this {scheme}:// URI has no host (or a port that is not a number)",
                f"write it as {base}://host:port")
    if scheme == "sqlite" and not uri.startswith(SQLITE_PREFIX):
        return ("this sqlite: URI names no database file",
                "write it as sqlite:////abs/path/mlflow.db")
    if base in (*SERVER_SCHEMES, *DATABASE_SCHEMES, "sqlite", "file", "databricks"):
        return None
    return (f"unknown scheme {scheme!r}",
            "use http(s)://host:port (an `mlflow server`), sqlite:///path, file:/path, "
            "postgresql|mysql|mssql://host/db, databricks, or null for the embedded store")


def _hostname(uri: str) -> Optional[str]:
    """The host ``uri`` names; None when it names none or its port is not a number."""
    try:
        parts = urlsplit(uri)
        parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        return None
    return parts.hostname


def resolve_tracking_uri(tracking_uri: Optional[str], output_dir: Path | str) -> str:
    """``tracking_uri`` as given (checked by :func:`check_tracking_uri`), or the embedded SQLite
    store ``<output_dir>/mlflow.db``."""
    if tracking_uri:
        check_tracking_uri(tracking_uri)
        return tracking_uri
    return SQLITE_PREFIX + str((Path(output_dir) / "mlflow.db").resolve())


def is_file_store(tracking_uri: Optional[str]) -> bool:
    """Whether ``tracking_uri`` keeps runs in files that every writer opens itself: null (the
    embedded SQLite store), ``sqlite:``, ``file:`` or a folder path. Such a store on a network
    file system shared by cluster nodes is slow and breaks under concurrent writers."""
    if not tracking_uri:
        return True
    match = URI_SCHEME.match(tracking_uri)
    return match is None or match.group(1).lower() in ("sqlite", "file")


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the server could not be reached:
    connection refused or reset, or no answer in time."""
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _retry(call: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Run ``call`` with exponential backoff (SQLite answers 'database is locked' under load).

    An unreachable server is not retried here: MLflow's HTTP client has already retried it.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # mlflow raises several unrelated types for a busy store
            if attempt == attempts - 1 or unreachable(err):
                raise
            delay = 0.2 * 2 ** attempt * (1 + random.random())
            log.debug("mlflow %s failed (%s); retrying in %.1fs", what, redact(str(err)), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    flat: Dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def default_method_settings(method: str) -> Dict[str, Any]:
    """The settings of ``method``'s Config at their defaults, as a job spec records them;
    empty for a method kdflow does not know (every setting then counts as chosen)."""
    from kdflow.methods.config import config_record
    from kdflow.methods.distillers import DISTILLERS

    try:
        config = DISTILLERS.get(method).Config
    except (KeyError, ConfigError):
        return {}
    return json.loads(json.dumps(config_record(config())))


def chosen_settings(spec: JobSpec) -> str:
    """``setting=value, ...`` telling this job apart from others of its method: its ``variant``
    label (an ablation's settings, a Tune trial's ``method.<setting>=...``) followed by every
    other method setting that differs from the method's default. "" when all are at their
    defaults."""
    variant = spec.labels.get("variant") or ""
    named = {key.rpartition(".")[2] for key in re.findall(r"(?:^|, )([\w.]+)=", variant)}
    defaults = default_method_settings(spec.method)
    chosen = [f"{key}={_short(value)}" for key, value in spec.method_cfg.items()
              if key not in named and (key not in defaults or defaults[key] != value)]
    return ", ".join(filter(None, [variant, *chosen]))


def _short(value: Any) -> str:
    """``value`` as a run name shows it: JSON for lists and mappings, else ``str``."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def run_name(spec: JobSpec) -> str:
    """The MLflow run name: the job's title with its :func:`chosen_settings`, so that sweep
    points and ablations differ, e.g. ``kd [temperature=8] resnet14->resnet8 digits s0``."""
    settings = chosen_settings(spec)
    labels = {**spec.labels, "variant": settings} if settings else spec.labels
    return dataclasses.replace(spec, labels=labels).title


def job_tags(spec: JobSpec) -> Dict[str, str]:
    """The run's ``kdflow.*`` tags (``kdflow.settings``: :func:`chosen_settings`)."""
    values = {
        "job_id": spec.job_id, "stage": spec.stage, "method": spec.method,
        "teacher": spec.teacher or "", "student": spec.model, "dataset": spec.dataset,
        "seed": str(spec.seed), "settings": chosen_settings(spec),
    }
    return {f"kdflow.{key}": values[key] for key in TAG_FIELDS}


def job_params(spec: JobSpec) -> Dict[str, str]:
    """The run's params: ``method``, ``teacher``, ``student`` (and its old name ``model``),
    ``dataset``, ``seed`` and every resolved setting (``method_cfg.*``, ``recipe.*``...)."""
    return flatten({
        "stage": spec.stage, "method": spec.method, "model": spec.model, "student": spec.model,
        "teacher": spec.teacher, "teacher_job": spec.teacher_job, "dataset": spec.dataset,
        "seed": spec.seed, "method_cfg": spec.method_cfg, "dataset_cfg": spec.dataset_cfg,
        "recipe": spec.recipe,
    })


def mlflow_metrics(metrics: Mapping[str, float]) -> Dict[str, float]:
    """``metrics`` (a job's epoch history entry) under their MLflow names
    (:data:`MLFLOW_METRIC_NAMES`), as floats."""
    return {MLFLOW_METRIC_NAMES.get(k, k): float(v) for k, v in metrics.items()}


@contextlib.contextmanager
def _schema_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive flock beside the database file: processes that open a
    fresh store at once (sweep points starting together) would race creating its tables."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        yield
        return
    database = Path(tracking_uri[len(SQLITE_PREFIX):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def mlflow_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri``, with short HTTP retries (:data:`HTTP_DEFAULTS`).

    Opening a SQLite store creates its tables if needed, under :func:`_schema_lock`.
    """
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    with _schema_lock(tracking_uri):
        return MlflowClient(tracking_uri)


def artifact_location(tracking_uri: str) -> Optional[str]:
    """Where a new experiment of ``tracking_uri`` keeps its artifacts: ``mlartifacts/`` beside
    an embedded SQLite store (MLflow's default, ``./mlruns``, would follow the working
    directory); None for a server, which decides."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(tracking_uri[len(SQLITE_PREFIX):]).parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the study's experiment if needed (also creates the SQLite schema); its id.

    Processes creating it at once agree: the losers of the race read the winner's.
    """
    return _ensure_experiment(mlflow_client(tracking_uri), name, artifact_location(tracking_uri))


def mark_experiments(tracking_uri: str) -> List[str]:
    """Mark every experiment of ``tracking_uri`` that has no kind yet (made before kdflow set
    one) as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`); their names."""
    from mlflow.entities import ViewType

    client = mlflow_client(tracking_uri)
    experiments = _retry(lambda: client.search_experiments(view_type=ViewType.ALL),
                         "search_experiments")
    marked = [e for e in experiments if EXPERIMENT_KIND_TAG not in e.tags]
    for experiment in marked:
        _retry(lambda: client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                 MODEL_TRAINING_KIND), "set_experiment_tag")
    return [e.name for e in marked]


def prepare_experiment(tracking_uri: str, name: str) -> None:
    """:func:`ensure_experiment`, or a warning if the store cannot be reached: the study runs
    anyway and its jobs keep what they could not send in their outboxes."""
    try:
        ensure_experiment(tracking_uri, name)
    except Exception as err:
        log.warning("MLflow at %s is unreachable (%s); jobs run anyway and keep their tracking "
                    "in their folders until `kdflow sync` sends it", redact(tracking_uri),
                    redact(str(err)))


def _ensure_experiment(client: Any, name: str, artifacts: Optional[str]) -> str:
    """The id of experiment ``name``, created if needed; either way marked as a model-training
    experiment (:data:`EXPERIMENT_KIND_TAG`) unless it already has a kind."""
    def get_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:  # fails if another process won: try again
            return client.create_experiment(name, artifact_location=artifacts,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                      MODEL_TRAINING_KIND)
        return experiment.experiment_id

    return _retry(get_or_create, "create_experiment")


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class FlushReport:
    """What one :meth:`OutboxSender.flush` did.

    sent:    the records that reached MLflow, in order (outbox records: ``seq``, ``op``...);
    pending: how many records are still unsent;
    error:   why sending stopped early (None: everything was sent).
    """

    sent: List[Dict[str, Any]] = field(default_factory=list)
    pending: int = 0
    error: Optional[BaseException] = None


class OutboxSender:
    """Sends a job's outbox to MLflow in order, each record exactly once.

    A record sent in an earlier attempt whose acknowledgement may be missing (the process died,
    the reply was lost) is checked against the server first: a run is looked up by its
    :data:`RUN_TOKEN_TAG`, a metric by its (name, step), which MLflow would otherwise store twice.
    ``on_run`` is called with the run id as soon as it is known.
    """

    def __init__(self, tracking_uri: str, outbox: Outbox, run_id: Optional[str] = None,
                 on_run: Optional[Callable[[str], None]] = None) -> None:
        self.tracking_uri = tracking_uri
        self.outbox = outbox
        self.on_run = on_run
        self.run_id = run_id
        self._client: Any = None
        self._fresh: Set[int] = set()  # seqs appended by this process and never tried
        self._steps_on_server: Dict[str, Set[int]] = {}  # per flush: metric name -> its steps

    @property
    def client(self) -> Any:
        """The MLflow client, made on first use (inside a flush, whose errors it may raise)."""
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def contents(self) -> OutboxContents:
        """The outbox as on disk (call under ``outbox.locked()``); learns its run id."""
        contents = self.outbox.read()
        if contents.run_id and contents.run_id != self.run_id:
            self.set_run(contents.run_id)
        return contents

    def append(self, contents: OutboxContents, op: str, **fields: Any) -> None:
        self._fresh.add(self.outbox.append(contents, op, **fields)["seq"])

    def flush(self) -> FlushReport:
        """Send every pending record, stopping at the first that fails."""
        with self.outbox.locked():
            contents = self.contents()
            report = FlushReport()
            self._steps_on_server = {}
            for record in contents.pending:
                verify = record["seq"] not in self._fresh
                self._fresh.discard(record["seq"])
                try:
                    run_id = self._send(record, contents, verify)
                except Exception as err:
                    report.error = err
                    break
                self.outbox.ack(contents, record["seq"], run_id)
                report.sent.append(record)
            report.pending = len(contents.pending)
            return report

    def set_run(self, run_id: str) -> None:
        """Note that the job's run is ``run_id`` (and tell ``on_run``)."""
        self.run_id = run_id
        if self.on_run is not None:
            self.on_run(run_id)

    def _send(self, record: Dict[str, Any], contents: OutboxContents,
              verify: bool) -> Optional[str]:
        """Make ``record``'s call; the run id a ``create_run`` made (None for other ops)."""
        op = record["op"]
        if op == "create_run":
            return self._create_run(record, verify)
        if self.run_id is None:
            raise RuntimeError(f"outbox record {record['seq']} ({op}) precedes any run")
        if op == "params":
            self._log_params(record["params"])
        elif op == "tags":
            self._set_tags(record["tags"])
        elif op == "metrics":
            self._log_metrics(record, contents, verify)
        elif op == "artifact":
            self._log_artifact(Path(record["path"]))
        elif op == "status" and record["status"] == "RUNNING":
            _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "update_run")
        elif op == "status":
            _retry(lambda: self.client.set_terminated(self.run_id, status=record["status"],
                                                      end_time=record["time_ms"]), "terminate")
        else:
            raise ValueError(f"outbox record {record['seq']} has unknown op {op!r}")
        return None

    def _create_run(self, record: Dict[str, Any], verify: bool) -> str:
        if self.run_id is not None:  # the run exists already (recorded in the job's state)
            return self.run_id
        experiment_id = ensure_experiment(self.tracking_uri, record["experiment"])
        token = record["tags"][RUN_TOKEN_TAG]
        found = _retry(lambda: self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TOKEN_TAG}` = '{token}'"),
            "search_runs") if verify else []
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = _retry(lambda: self.client.create_run(
                experiment_id, start_time=record["time_ms"], tags=record["tags"],
                run_name=record["run_name"]), "create_run").info.run_id
        self.set_run(run_id)
        return run_id

    def _log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            _retry(lambda: self.client.log_batch(self.run_id, params=chunk), "log_params")

    def _set_tags(self, tags: Dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        _retry(lambda: self.client.log_batch(self.run_id, tags=batch), "set_tags")

    def _log_metrics(self, record: Dict[str, Any], contents: OutboxContents,
                     verify: bool) -> None:
        from mlflow.entities import Metric

        step = record["step"]
        done = contents.acked_metric_steps()
        names = [name for name in record["metrics"] if (name, step) not in done]
        if verify:
            names = [name for name in names if step not in self._server_steps(name)]
        batch = [Metric(name, float(record["metrics"][name]), record["time_ms"], step)
                 for name in names]
        if batch:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=batch), "log_metrics")
        for name in names:
            if name in self._steps_on_server:
                self._steps_on_server[name].add(step)

    def _server_steps(self, name: str) -> Set[int]:
        """The steps at which the run has metric ``name`` in MLflow (fetched once per flush)."""
        if name not in self._steps_on_server:
            history = _retry(lambda: self.client.get_metric_history(self.run_id, name),
                             "get_metric_history")
            self._steps_on_server[name] = {m.step for m in history}
        return self._steps_on_server[name]

    def _log_artifact(self, path: Path) -> None:
        if not path.exists():
            log.warning("%s is gone; not uploading it to MLflow", path)
            return
        _retry(lambda: self.client.log_artifact(self.run_id, str(path)), "log_artifact")


def sync_job(tracking_uri: str, job_dir: Path, run_id: Optional[str],
             on_run: Optional[Callable[[str], None]] = None) -> FlushReport:
    """Send what the job in ``job_dir`` (whose run is ``run_id``, if known) still keeps."""
    return OutboxSender(tracking_uri, Outbox(job_dir), run_id, on_run).flush()


def reachability_problem(tracking_uri: str) -> Optional[str]:
    """Why the tracking server at ``tracking_uri`` cannot be reached; None if it answers
    (an embedded SQLite store always does)."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        return None
    try:
        mlflow_client(tracking_uri).search_experiments(max_results=1)
    except Exception as err:
        return redact(str(err))
    return None


class JobTracker:
    """Logs one job to MLflow through the outbox in ``job_dir``; a resumed job continues its
    earlier run (``run_id``, or the one its outbox created).

    Tracking failures never stop training: each call is kept in the outbox, and every call
    (each epoch at least) first sends what is still pending. ``on_run`` is called with the
    run id once MLflow has it (at once if the run exists already).
    """

    def __init__(self, tracking_uri: str, experiment: str, spec: JobSpec,
                 run_id: Optional[str], job_dir: Path,
                 on_run: Optional[Callable[[str], None]] = None) -> None:
        self.tracking_uri = tracking_uri
        self.sender = OutboxSender(tracking_uri, Outbox(job_dir), run_id, on_run)
        self.offline = False
        with self.sender.outbox.locked():
            contents = self.sender.contents()
            if self.sender.run_id is not None:
                self.sender.append(contents, "status", status="RUNNING", time_ms=_now_ms())
            elif not any(r["op"] == "create_run" for r in contents.records):
                tags = {**job_tags(spec), RUN_TOKEN_TAG: uuid.uuid4().hex}
                self.sender.append(contents, "create_run", experiment=experiment, tags=tags,
                                   run_name=run_name(spec), time_ms=_now_ms())
                self.sender.append(contents, "params", params=job_params(spec))
        self._flush()

    @property
    def run_id(self) -> Optional[str]:
        """The job's MLflow run (None while the server has not been reached yet)."""
        return self.sender.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` (name -> value, under :func:`mlflow_metrics` names) at ``step``
        (the epoch's 0-based index)."""
        self._record("metrics", metrics=mlflow_metrics(metrics), step=step, time_ms=_now_ms())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (name -> value, sent as strings; a later value replaces an earlier
        one, so a job resumed elsewhere records where it last ran)."""
        self._record("tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path) -> None:
        """Upload the file at ``path`` (while the server is down: at the next flush)."""
        self._record("artifact", flush=not self.offline, path=str(Path(path).resolve()))

    def finish(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED (interrupted, to be resumed)."""
        report = self._record("status", status=status, time_ms=_now_ms())
        if report is not None and report.pending:
            log.warning("%d MLflow call(s) of this job are kept in %s; `kdflow sync` sends them "
                        "once %s answers", report.pending, self.sender.outbox.path,
                        redact(self.tracking_uri))

    def _record(self, op: str, flush: bool = True, **fields: Any) -> Optional[FlushReport]:
        """Keep an ``op`` call in the outbox; then, if ``flush``, send what is pending."""
        with self.sender.outbox.locked():
            self.sender.append(self.sender.contents(), op, **fields)
        return self._flush() if flush else None

    def _flush(self) -> FlushReport:
        report = self.sender.flush()
        if report.error is not None and not self.offline:
            log.warning("MLflow at %s failed (%s); training goes on, %d call(s) kept in %s and "
                        "sent at the next epoch or by `kdflow sync`", redact(self.tracking_uri),
                        redact(str(report.error)), report.pending, self.sender.outbox.path)
        elif report.error is None and self.offline:
            log.info("MLflow at %s answers again: sent %d kept call(s)",
                     redact(self.tracking_uri), len(report.sent))
        self.offline = report.error is not None
        return report
