"""Run tracking: MLflow (rank 0), ``metrics.jsonl`` in the run folder, and the console line.

This is the only module that imports ``mlflow``. Every record sent to MLflow is first appended to
``metrics.jsonl``, so an MLflow outage loses nothing; MLflow failures are reported once and training
goes on.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConsoleProgress", "SweepTracker", "Tracker", "default_tracking_uri", "format_duration"]

logger = logging.getLogger(__name__)

# MLflow 3 reports usage to its vendor by default. Hospital networks and clusters must not phone home
# unasked: off unless the user sets the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow parameters: at most 100 per batch call, values at most 6000 characters (MLflow's limits).
_PARAM_BATCH = 100
_PARAM_MAX_LEN = 6000
_METRIC_BATCH = 1000


def default_tracking_uri(run_dir: Path) -> str:
    """The local store used when ``tracking.uri`` is empty: ``sqlite:///<run_dir>/mlflow.db``."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class Tracker:
    """Metrics to ``metrics.jsonl`` and (on rank 0, when enabled) to an MLflow run.

    Each step is recorded once. A resumed run recomputes the steps after its checkpoint; the records of
    steps that ``metrics.jsonl`` already holds are not written again, here or to MLflow, and records that
    reached ``metrics.jsonl`` but not MLflow (a kill in between, an MLflow outage) are sent when the run is
    continued.

    Args:
        run_dir: the run folder; ``metrics.jsonl`` is appended there.
        uri: MLflow tracking URI ('' = the local sqlite store in ``run_dir``).
        experiment: MLflow experiment name.
        enabled: log to MLflow at all (False with ``tracking.enabled=false``).
        main: this process keeps the records (rank 0); on other ranks the tracker does nothing.
    """

    def __init__(
        self, run_dir: Path, uri: str, experiment: str, enabled: bool = True, main: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.uri = uri or default_tracking_uri(self.run_dir)
        self.experiment = experiment
        self.main = main
        self.enabled = enabled and main
        self.run_id: str | None = None
        self.last_step = 0
        """The last step recorded in ``metrics.jsonl`` (read by :meth:`start`)."""
        self._client: Any = None
        self._jsonl = self.run_dir / "metrics.jsonl"
        self._warned = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open (or, with ``run_id``, continue) the MLflow run and log ``params``; returns the run id."""
        records = self._read_records() if self.main else []
        self.last_step = max((int(r["step"]) for r in records), default=0)
        if not self.enabled:
            return None
        try:
            self._client = self._make_client()
            if run_id is None:
                experiment_id = self._experiment_id()
                run = self._client.create_run(experiment_id, run_name=run_name)
                self.run_id = run.info.run_id
                self._log_params(params)
            else:
                self.run_id = run_id
                self._client.update_run(run_id, status="RUNNING")
                self._send_missing(records)
        except Exception as e:  # any MLflow/backend failure must not stop training
            self._fail(f"could not start the MLflow run at {self.uri}: {e}")
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one record to ``metrics.jsonl`` and send it to MLflow (non-finite values are kept in
        the JSONL as strings and not sent to MLflow, which rejects them). A step already recorded (a
        resumed run recomputing the steps after its checkpoint) is skipped."""
        if not self.main or step <= self.last_step:
            return
        self.last_step = step
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            record[k] = float(v) if math.isfinite(float(v)) else str(float(v))
        with self._jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._client is None or self.run_id is None:
            return
        try:
            self._client.log_batch(self.run_id, metrics=self._metric_batch(record))
        except Exception as e:
            self._fail(f"could not log metrics to MLflow at {self.uri}: {e}")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file to the MLflow run (no-op when MLflow is off)."""
        if self._client is None or self.run_id is None:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            self._fail(f"could not upload {path} to MLflow at {self.uri}: {e}")

    def finish(self, status: str = "FINISHED") -> None:
        """Close the MLflow run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self._client is None or self.run_id is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self._fail(f"could not close the MLflow run at {self.uri}: {e}")

    # -- internals -------------------------------------------------------------------------------
    def _read_records(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``; a last line cut short by a kill is dropped from the file."""
        if not self._jsonl.is_file():
            return []
        lines = self._jsonl.read_text().splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if len(records) < len(lines):
            logger.warning(
                "%s: dropping %d incomplete line(s) at its end", self._jsonl, len(lines) - len(records)
            )
            tmp = self._jsonl.with_name(f".{self._jsonl.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(self._jsonl)
        return records

    @staticmethod
    def _metric_batch(record: Mapping[str, Any]) -> list[Any]:
        from mlflow.entities import Metric

        ts, step = int(record["time"] * 1000), int(record["step"])
        values = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, int | float)}
        return [Metric(k, float(v), ts, step) for k, v in values.items() if math.isfinite(float(v))]

    def _send_missing(self, records: list[dict[str, Any]]) -> None:
        """Send the records whose step the MLflow run lacks (judged by the first metric of the last record)."""
        if not records:
            return
        key = next(k for k in records[-1] if k not in ("step", "time"))
        logged = {m.step for m in self._client.get_metric_history(self.run_id, key)}
        missing = [m for r in records if int(r["step"]) not in logged for m in self._metric_batch(r)]
        for i in range(0, len(missing), _METRIC_BATCH):
            self._client.log_batch(self.run_id, metrics=missing[i : i + _METRIC_BATCH])
        if missing:
            logger.info("sent %d metric values from %s that MLflow did not have", len(missing), self._jsonl)

    def _make_client(self) -> Any:
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///"):
            # A local store keeps its artifacts beside it, inside the run folder, not in the cwd.
            db = Path(self.uri.removeprefix("sqlite:///"))
            artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
        return self._client.create_experiment(self.experiment, artifact_location=artifact_location)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def _fail(self, message: str) -> None:
        # Warn once; metrics.jsonl keeps every record, so nothing is lost.
        if not self._warned:
            logger.warning("%s; training goes on and metrics stay in %s", message, self._jsonl)
            self._warned = True
        self._client = None


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
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
            )
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
                self._params(self.run_id, params)
        except Exception as e:
            self._warn("start the sweep's parent run", e)
        return self.run_id

    def _params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self._client.log_batch(run_id, params=items[i : i + _PARAM_BATCH])

    def _child(self, trial: str, parent: str | None, params: Mapping[str, Any], create: bool) -> str | None:
        client = self._mlflow()
        runs = client.search_runs(
            [self._experiment_id], filter_string=f"attributes.run_name = '{trial}'", max_results=1
        )
        if runs:
            run_id = runs[0].info.run_id
        elif create:
            run_id = client.create_run(self._experiment_id, run_name=trial).info.run_id
            self._params(run_id, params)
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
        self, trial: str, parent: str | None, params: Mapping[str, Any], status: str, tags: Mapping[str, str]
    ) -> None:
        """Give the run of ``trial`` its final ``status`` and ``tags``, creating it if the trial never did."""
        try:
            run_id = self._child(trial, parent, params, create=True)
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


def format_duration(seconds: float) -> str:
    """``3725`` → ``'1:02:05'``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=int(seconds)))


class ConsoleProgress:
    """One readable line per log step (with progress and ETA), plus a live bar when stderr is a terminal.

    The line carries the progress itself, so logs captured by Slurm or CI (no terminal) stay readable.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total = total_steps
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._s0 = start_step
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def update(self, step: int) -> None:
        self._bar.n = step
        self._bar.refresh()

    def eta(self, step: int) -> float:
        done = step - self._s0
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        pct = 100.0 * step / self.total
        parts = [f"step {step}/{self.total} ({pct:.0f}%)"]
        loss_keys = [k for k in metrics if k.startswith("loss/")]
        parts.append(" ".join(f"{k.removeprefix('loss/')} {metrics[k]:.4f}" for k in loss_keys))
        if "optim/lr" in metrics:
            parts.append(f"lr {metrics['optim/lr']:.2e}")
        if "schedule/beta" in metrics:
            parts.append(f"β {metrics['schedule/beta']:.3f}")
        if "perf/samples_per_s" in metrics:
            parts.append(f"{metrics['perf/samples_per_s']:.2f} samples/s")
        if "perf/tflops_per_device" in metrics:
            parts.append(f"{metrics['perf/tflops_per_device']:.3g} TFLOP/s per device")
        if "perf/data_wait_frac" in metrics:
            parts.append(f"data wait {100 * metrics['perf/data_wait_frac']:.0f}%")
        if "memory/peak_gib" in metrics:
            parts.append(f"peak {metrics['memory/peak_gib']:.2f} GiB")
        parts.append(f"eta {format_duration(self.eta(step))}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._bar.write(self.line(step, metrics), file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
