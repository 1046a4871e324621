"""Run tracking: MLflow (rank 0) and ``metrics.jsonl`` in the run folder.

This is the only module that imports ``mlflow``. Every record is first appended to ``metrics.jsonl``, so an
MLflow outage loses nothing. When the MLflow server is unreachable (at the start or in the middle of a run)
training goes on: one warning says so, the tracker tries again every ``tracking.retry_s`` seconds, and once
the server answers it sends every record the MLflow run lacks (judged per metric and step, so nothing is
sent twice). A run that ended during an outage is brought up to date afterwards with::

    python -m pcrl.tracking sync RUN_DIR [--uri URI]

which is idempotent. The MLflow run id of a run folder is kept in ``<run_dir>/mlflow_run.json`` (one entry
per tracking URI), so a relaunch, a late reconnection and the sync command all continue the same run.
That command is ``pcrl/tracking/__main__.py``; the console progress line is :mod:`pcrl.progress`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pcrl.io import read_jsonl, write_atomic

__all__ = [
    "SweepTracker",
    "Tracker",
    "default_tracking_uri",
    "sync_run_folder",
]

logger = logging.getLogger(__name__)

# Set when this module is imported, not when a Tracker is made: MLflow decides on telemetry once, when it is
# imported, and `import deepspeed` imports it (deepspeed.autotuning), which the engine does before it makes
# its Tracker. The two HTTP settings are read per request, but belong with the first.
# MLflow 3 reports usage to its vendor by default. Hospital networks and clusters must not phone home
# unasked: off unless the user sets the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) by default.
# Training must not stall on a dead server: fail fast, the tracker retries on its own schedule.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# MLflow parameters: at most 100 per batch call, values at most 6000 characters (MLflow's limits).
_PARAM_BATCH = 100
_PARAM_MAX_LEN = 6000
_METRIC_BATCH = 1000
RUN_FILE = "mlflow_run.json"
"""Run-folder file mapping each tracking URI to the MLflow run id of this run folder."""


def default_tracking_uri(run_dir: Path) -> str:
    """The local store used when ``tracking.uri`` is empty: ``sqlite:///<run_dir>/mlflow.db``."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing. A sqlite store keeps the artifacts of an
    experiment it creates beside the database file, never in the current folder (MLflow's default
    ``./mlruns``)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class Tracker:
    """Metrics to ``metrics.jsonl`` and (on rank 0, when enabled) to an MLflow run.

    Each step is recorded once. A resumed run recomputes the steps after its checkpoint; the records of
    steps that ``metrics.jsonl`` already holds are not written again, here or to MLflow. Records that
    reached ``metrics.jsonl`` but not MLflow (a kill in between, an MLflow outage) are sent when the run is
    continued or the server is back.

    Args:
        run_dir: the run folder; ``metrics.jsonl`` is appended there.
        uri: MLflow tracking URI ('' = the local sqlite store in ``run_dir``).
        experiment: MLflow experiment name.
        enabled: log to MLflow at all (False with ``tracking.enabled=false``).
        main: this process keeps the records (rank 0); on other ranks the tracker does nothing.
        retry_s: while MLflow is unreachable, try again at the first log call this many seconds after the
            last failure.
    """

    def __init__(
        self,
        run_dir: Path,
        uri: str,
        experiment: str,
        enabled: bool = True,
        main: bool = True,
        retry_s: float = 60.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.uri = uri or default_tracking_uri(self.run_dir)
        self.experiment = experiment
        self.main = main
        self.enabled = enabled and main
        self.retry_s = retry_s
        self.run_id: str | None = None
        self.last_step = 0
        """The last step recorded in ``metrics.jsonl`` (read by :meth:`start`)."""
        self._client: Any = None
        self._jsonl = self.run_dir / "metrics.jsonl"
        self._run_name = self.run_dir.name
        self._params: dict[str, Any] = {}
        self._params_sent = True
        self._behind = True
        """``metrics.jsonl`` may hold records the MLflow run lacks (checked at the next connection)."""
        self._files_behind = True
        """The run folder may hold files the MLflow run lacks (uploaded at the next connection)."""
        self._failed_at: float | None = None
        """``time.monotonic()`` of the last failed MLflow call; None while connected."""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open (or continue) the MLflow run, log ``params`` to a new run, and send the records of
        ``metrics.jsonl`` it lacks; returns the run id (None while MLflow is unreachable or disabled).

        The run continued is the one ``mlflow_run.json`` records for this URI, else ``run_id`` (from a
        checkpoint), else a new one.
        """
        records = self._read_records() if self.main else []
        self.last_step = max((int(r["step"]) for r in records), default=0)
        if not self.enabled:
            return None
        self._run_name, self._params = run_name, dict(params)
        self.run_id = self._saved_run().get("run_id") or run_id
        self._connect(running=True)
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one record to ``metrics.jsonl`` and send it to MLflow (non-finite values are kept in
        the JSONL as strings and not sent to MLflow, which rejects them). A step already recorded (a
        resumed run recomputing the steps after its checkpoint) is skipped. While MLflow is unreachable the
        record waits in ``metrics.jsonl`` and goes with the next successful connection."""
        if not self.main or step <= self.last_step:
            return
        self.last_step = step
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            record[k] = float(v) if math.isfinite(float(v)) else str(float(v))
        with self._jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.enabled:
            return
        if self._client is None:
            self._retry()
            return
        try:
            self._client.log_batch(self.run_id, metrics=_metric_batch(record))
        except Exception as e:
            self._fail(f"could not log metrics to MLflow at {self.uri}: {e}")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file to the MLflow run (skipped while MLflow is off or unreachable; the file stays in the
        run folder and ``python -m pcrl.tracking sync`` uploads it later)."""
        if self._client is None:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            self._fail(f"could not upload {path} to MLflow at {self.uri}: {e}")

    def finish(self, status: str = "FINISHED") -> None:
        """Close the MLflow run with ``status`` (FINISHED, FAILED or KILLED), after one last attempt to send
        what MLflow lacks. If it is still unreachable, the status is kept in ``mlflow_run.json`` for
        ``python -m pcrl.tracking sync``."""
        if not self.enabled:
            return
        if self._client is None and self._connect(running=False) < 0:
            self._save_run(status=status)
            logger.warning(
                "MLflow at %s is still unreachable at the end of the run; every record is in %s. Once it is "
                "back, send them with: python -m pcrl.tracking sync %s",
                self.uri,
                self._jsonl,
                self.run_dir,
            )
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
            self._save_run(status=None)
        except Exception as e:
            self._save_run(status=status)
            self._fail(f"could not close the MLflow run at {self.uri}: {e}")

    def sync(self, run_name: str, params: Mapping[str, Any]) -> int:
        """Bring the MLflow run of this run folder up to date with ``metrics.jsonl`` and the files of the run
        folder (config, reconstruction panels), creating the run if it never reached this URI, and apply the
        final status a run that ended during an outage left behind. Idempotent.

        Args:
            run_name: the MLflow run name, if the run has to be created.
            params: the params of a created run (the flattened config).

        Returns:
            The number of metric values sent.

        Raises:
            RuntimeError: MLflow at the URI could not be reached (names it).
        """
        self.last_step = max((int(r["step"]) for r in self._read_records()), default=0)
        self._run_name, self._params = run_name, dict(params)
        saved = self._saved_run()
        self.run_id = saved.get("run_id")
        sent = self._connect(running=False, raise_errors=True)
        if saved.get("status"):
            self._client.set_terminated(self.run_id, status=saved["status"])
            self._save_run(status=None)
        return sent

    # -- connection ------------------------------------------------------------------------------
    def _retry(self) -> None:
        if self._failed_at is None or time.monotonic() - self._failed_at >= self.retry_s:
            self._connect(running=True)

    def _connect(self, running: bool, raise_errors: bool = False) -> int:
        """Open the client and the run (creating it when this URI has none for the run folder), log the
        params of a new run and send what the run lacks. Returns the number of metric values sent (>= 0), or
        -1 when MLflow could not be reached (warned once per outage)."""
        try:
            client = self._make_client()
            if self.run_id is None:
                run = client.create_run(self._experiment_id(client), run_name=self._run_name)
                self.run_id = run.info.run_id
                self._params_sent = False
                self._save_run(status=None)
            elif running:
                client.update_run(self.run_id, status="RUNNING")
            if not self._params_sent:
                _log_params(client, self.run_id, self._params)
                self._params_sent = True
            sent = 0
            if self._behind:
                sent = _send_missing(client, self.run_id, self._read_records())
                self._behind = False
        except Exception as e:
            if raise_errors:
                raise RuntimeError(f"could not reach MLflow at {self.uri}: {e}") from e
            self._fail(f"could not reach MLflow at {self.uri}: {e}")
            return -1
        if self._failed_at is not None:
            logger.warning(
                "MLflow at %s is reachable again; sent the %d metric values it missed", self.uri, sent
            )
        elif sent:
            logger.info("sent %d metric values from %s that MLflow did not have", sent, self._jsonl)
        self._client, self._failed_at = client, None
        if self._files_behind:
            # The files are not the metric stream: once the run has its records, a failed upload (the server
            # going away again, an artifact store refusing writes) leaves the metrics flowing.
            try:
                _send_missing_files(client, self.run_id, self.run_dir)
                self._files_behind = False
            except Exception as e:
                if raise_errors:
                    raise RuntimeError(f"could not upload the files of {self.run_dir} to MLflow: {e}") from e
                logger.warning(
                    "could not upload the files of %s to MLflow at %s (%s); they stay in the run folder "
                    "(python -m pcrl.tracking sync %s uploads them)",
                    self.run_dir,
                    self.uri,
                    e,
                    self.run_dir,
                )
        return sent

    def _fail(self, message: str) -> None:
        # Warn once per outage; metrics.jsonl keeps every record, so nothing is lost.
        if self._failed_at is None:
            logger.warning(
                "%s; training goes on, every record stays in %s and is sent when MLflow answers again "
                "(tried every tracking.retry_s=%g s; afterwards: python -m pcrl.tracking sync %s)",
                message,
                self._jsonl,
                self.retry_s,
                self.run_dir,
            )
        else:
            logger.debug("%s", message)
        self._client, self._failed_at, self._behind, self._files_behind = None, time.monotonic(), True, True

    # -- run folder ------------------------------------------------------------------------------
    def _saved_run(self) -> dict[str, Any]:
        path = self.run_dir / RUN_FILE
        try:
            runs = json.loads(path.read_text())["runs"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s is unreadable (%s); a new MLflow run will be created", path, e)
            return {}
        entry = runs.get(self.uri, {})
        return entry if isinstance(entry, dict) else {}

    def _save_run(self, status: str | None) -> None:
        path = self.run_dir / RUN_FILE
        try:
            runs = json.loads(path.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError):
            runs = {}
        runs[self.uri] = {"run_id": self.run_id, "experiment": self.experiment, "status": status}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n")

    def _read_records(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``; a last line cut short by a kill is dropped from the file."""
        records, dropped = read_jsonl(self._jsonl)
        if dropped:
            logger.warning("%s: dropping %d incomplete line(s) at its end", self._jsonl, dropped)
            write_atomic(self._jsonl, "".join(json.dumps(r) + "\n" for r in records))
        return records

    # -- MLflow ----------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client: Any) -> str:
        return experiment_id(client, self.uri, self.experiment)


def _metric_batch(record: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    ts, step = int(record["time"] * 1000), int(record["step"])
    values = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, int | float)}
    return [Metric(k, float(v), ts, step) for k, v in values.items() if math.isfinite(float(v))]


def _send_missing(client: Any, run_id: str, records: Sequence[Mapping[str, Any]]) -> int:
    """Send the (metric, step) values of ``records`` that the MLflow run lacks; returns how many."""
    metrics = [m for r in records for m in _metric_batch(r)]
    have = {
        k: {m.step for m in client.get_metric_history(run_id, k)} for k in sorted({m.key for m in metrics})
    }
    missing = [m for m in metrics if m.step not in have[m.key]]
    for i in range(0, len(missing), _METRIC_BATCH):
        client.log_batch(run_id, metrics=missing[i : i + _METRIC_BATCH])
    return len(missing)


def _send_missing_files(client: Any, run_id: str, run_dir: Path) -> None:
    """Upload the run folder's config and reconstruction panels that the MLflow run lacks."""
    wanted = [(run_dir / "config.yaml", None), *((p, "images") for p in sorted(run_dir.glob("images/*.png")))]
    listed: dict[str | None, set[str]] = {}
    for path, folder in wanted:
        if not path.is_file():
            continue
        if folder not in listed:
            listed[folder] = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
        if path.name not in listed[folder]:
            client.log_artifact(run_id, str(path), folder)


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAM_BATCH])


def _param_str(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    return text[:_PARAM_MAX_LEN]


class SweepTracker:
    """The MLflow side of a sweep, on its driver: one parent run, every trial's run nested under it.

    Trials open their own runs (a :class:`Tracker` inside :func:`pcrl.engine.train`, named by the trial id);
    the driver finds them by name, tags them as children of the parent, and closes them with the trial's
    outcome (a trial stopped early or failed cannot always close its own run). A trial that failed before
    its run existed gets a run here, so every trial has one. MLflow failures are warned about once and
    the sweep goes on. Picklable (Ray Tune saves its callbacks): the client is made again after unpickling.

    Args:
        uri: MLflow tracking URI.
        experiment: MLflow experiment of the parent and the trials.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            self._experiment_id = experiment_id(self._client, self.uri, self.experiment)
        return self._client

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            logger.warning("MLflow at %s: could not %s (%s); the sweep goes on", self.uri, what, e)
            self._warned = True

    def start(self, name: str, params: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open the parent run (or continue ``run_id``, a resumed sweep's) and log ``params`` to a new one."""
        try:
            client = self._mlflow()
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                run = client.create_run(self._experiment_id, run_name=name, tags={"pcrl.kind": "sweep"})
                self.run_id = run.info.run_id
                _log_params(client, self.run_id, params)
        except Exception as e:
            self._warn("start the sweep's parent run", e)
        return self.run_id

    def _child(
        self,
        trial: str,
        parent: str | None,
        params: Mapping[str, Any],
        create: bool,
        run_id: str | None = None,
    ) -> str | None:
        client = self._mlflow()
        if run_id is None:
            runs = client.search_runs(
                [self._experiment_id], filter_string=f"attributes.run_name = '{trial}'", max_results=1
            )
            if runs:
                run_id = runs[0].info.run_id
            elif create:
                run_id = client.create_run(self._experiment_id, run_name=trial).info.run_id
                _log_params(client, run_id, params)
            else:
                return None
        if parent:
            client.set_tag(run_id, "mlflow.parentRunId", parent)
        client.set_tag(run_id, "pcrl.trial", trial)
        return run_id

    def adopt(self, trial: str, parent: str | None, params: Mapping[str, Any]) -> None:
        """Nest the run of ``trial`` under ``parent`` (once it has reported, so its run exists)."""
        try:
            self._child(trial, parent, params, create=False)
        except Exception as e:
            self._warn(f"nest the run of trial {trial}", e)

    def close_trial(
        self,
        trial: str,
        parent: str | None,
        params: Mapping[str, Any],
        status: str,
        tags: Mapping[str, str],
        run_dir: Path | None = None,
    ) -> None:
        """Give the run of ``trial`` its final ``status`` and ``tags``, creating it if the trial never did.

        With ``run_dir`` (the trial's run folder, once its process has ended), the run is first brought up
        to date with the folder as ``python -m pcrl.tracking sync`` would: a trial whose own MLflow calls
        failed (an outage, a locked SQLite store) still ends with every metric it recorded. A FINISHED trial
        whose folder holds no ``metrics.jsonl`` is warned about (a trial that failed may have recorded
        nothing)."""
        run_id = None
        if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
            try:
                run_id = sync_run_folder(run_dir, self.uri, self.experiment, run_name=trial)[0].run_id
            except Exception as e:
                self._warn(f"send the records of trial {trial} from {run_dir}", e)
        elif run_dir is not None and status == "FINISHED":
            logger.warning(
                "trial %s finished but %s holds no metrics.jsonl; its MLflow run may lack its records "
                "(is the sweep folder on a filesystem the driver sees?)",
                trial,
                run_dir,
            )
        try:
            run_id = self._child(trial, parent, params, create=True, run_id=run_id)
            for k, v in tags.items():
                self._client.set_tag(run_id, k, v)
            self._client.set_terminated(run_id, status=status)
        except Exception as e:
            self._warn(f"close the run of trial {trial}", e)

    def log_best(
        self, metric: str, value: float, params: Mapping[str, Any], trial: str, config: Path
    ) -> None:
        """Record the best result on the parent run: ``best/<metric>``, ``best.<key>`` tags, the trial, and
        the best config file as an artifact."""
        if self.run_id is None:
            return
        try:
            self._client.log_metric(self.run_id, f"best/{metric}", value)
            self._client.set_tag(self.run_id, "pcrl.best_trial", trial)
            for k, v in params.items():
                self._client.set_tag(self.run_id, f"best.{k}", _param_str(v))
            self._client.log_artifact(self.run_id, str(config))
        except Exception as e:
            self._warn("log the best result", e)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the parent run with ``status``."""
        if self.run_id is None or self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self._warn("close the sweep's parent run", e)


def sync_run_folder(
    run_dir: Path, uri: str | None = None, experiment: str | None = None, run_name: str | None = None
) -> tuple[Tracker, int]:
    """Bring the MLflow run of a run folder up to date with its ``metrics.jsonl`` and files (see
    :meth:`Tracker.sync`); returns the tracker (its ``run_id`` and ``uri``) and the metric values sent.

    Args:
        run_dir: the run folder (``config.yaml``, ``metrics.jsonl``).
        uri: MLflow tracking URI (None: the run's ``tracking.uri``).
        experiment: experiment name (None: the run's ``tracking.experiment``).
        run_name: the name of a run created here (None: the run's ``run.name``).

    Raises:
        ConfigError, FileNotFoundError: ``config.yaml`` is missing or invalid.
        RuntimeError: MLflow could not be reached (names the URI).
    """
    from pcrl.config import flatten_config, load_config

    cfg = load_config(run_dir / "config.yaml")
    tracker = Tracker(
        run_dir, cfg.tracking.uri if uri is None else uri, experiment or cfg.tracking.experiment
    )
    return tracker, tracker.sync(run_name or cfg.run.name, flatten_config(cfg))
