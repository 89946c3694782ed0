"""MLflow tracking of jobs: one experiment per study, one run per job, per-epoch metrics."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, TypeVar

from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_FIELDS = ("job_id", "stage", "method", "teacher", "student", "dataset", "seed")


def resolve_tracking_uri(tracking_uri: Optional[str], output_dir: Path | str) -> str:
    """``tracking_uri`` as given, or the embedded SQLite store ``<output_dir>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    return "sqlite:///" + str((Path(output_dir) / "mlflow.db").resolve())


def _retry(call: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Run ``call`` with exponential backoff (SQLite answers 'database is locked' under load)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # mlflow raises several unrelated types for a busy store
            if attempt == attempts - 1:
                raise
            delay = 0.2 * 2 ** attempt * (1 + random.random())
            log.debug("mlflow %s failed (%s); retrying in %.1fs", what, err, delay)
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


def job_tags(spec: JobSpec) -> Dict[str, str]:
    values = {
        "job_id": spec.job_id, "stage": spec.stage, "method": spec.method,
        "teacher": spec.teacher or "", "student": spec.model, "dataset": spec.dataset,
        "seed": str(spec.seed),
    }
    return {f"kdflow.{key}": values[key] for key in TAG_FIELDS}


def job_params(spec: JobSpec) -> Dict[str, str]:
    return flatten({
        "stage": spec.stage, "method": spec.method, "model": spec.model,
        "teacher": spec.teacher, "teacher_job": spec.teacher_job, "dataset": spec.dataset,
        "seed": spec.seed, "method_cfg": spec.method_cfg, "dataset_cfg": spec.dataset_cfg,
        "recipe": spec.recipe,
    })


@contextlib.contextmanager
def _schema_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive flock beside the database file: processes that open a
    fresh store at once (sweep points starting together) would race creating its tables."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    database = Path(tracking_uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the study's experiment if needed (also creates the SQLite schema); its id."""
    with _schema_lock(tracking_uri):
        return _ensure_experiment(tracking_uri, name)


def _ensure_experiment(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = _retry(lambda: client.get_experiment_by_name(name), "get_experiment")
    if experiment is not None:
        return experiment.experiment_id
    try:
        return _retry(lambda: client.create_experiment(name), "create_experiment")
    except Exception:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class JobTracker:
    """Logs one job to MLflow; a resumed job continues its earlier run.

    Tracking failures never stop training: they are logged as warnings and the job goes on.
    """

    def __init__(self, tracking_uri: str, experiment: str, spec: JobSpec,
                 run_id: Optional[str]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.ok = True
        try:
            if self.run_id is None:
                experiment_id = ensure_experiment(tracking_uri, experiment)
                run = _retry(lambda: self.client.create_run(
                    experiment_id, tags=job_tags(spec), run_name=spec.title), "create_run")
                self.run_id = run.info.run_id
                self._log_params(job_params(spec))
            else:
                _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "update_run")
        except Exception as err:
            self._disable(err)

    def _disable(self, err: Exception) -> None:
        log.warning("MLflow tracking unavailable, training goes on without it: %s", err)
        self.ok = False

    def _log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            _retry(lambda: self.client.log_batch(self.run_id, params=chunk), "log_params")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.ok:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        try:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=batch), "log_metrics")
        except Exception as err:
            self._disable(err)

    def log_artifact(self, path: Path) -> None:
        if not self.ok:
            return
        try:
            _retry(lambda: self.client.log_artifact(self.run_id, str(path)), "log_artifact")
        except Exception as err:
            log.warning("could not upload %s to MLflow: %s", path, err)

    def finish(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED (interrupted, to be resumed)."""
        if not self.ok:
            return
        try:
            _retry(lambda: self.client.set_terminated(self.run_id, status=status), "terminate")
        except Exception as err:
            self._disable(err)
