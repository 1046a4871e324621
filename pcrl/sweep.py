"""Hyperparameter sweeps with Ray Tune: every trial is a pretraining run through :func:`pcrl.engine.train`.

A sweep YAML (``configs/tune/loss_weights.yaml``) names a base pretraining config, overrides applied to every
trial, and a search space keyed by dotted pretraining keys (``objective.weights.restore``, ``optim.lr``,
...). Trials report ``eval.metric`` (``val/psnr`` by default, see ``pcrl/evaluate.py``) at every evaluation
step; ASHA stops the weak ones early (time axis: the training step).

Layout of ``<output_dir>/<name>/``::

    sweep.json       the parent MLflow run id and the tracking URI (so --resume continues both)
    tune/            Ray Tune's experiment state (what --resume restores)
    trials/<id>/     one pcrl run folder per trial (config.yaml, checkpoints, metrics.jsonl)
    best.yaml        the best trial's full config, accepted by ``launch/pretrain.py --config``

MLflow: one parent run per sweep (params: the search space and the sweep settings; at the end the best
value and, as ``best.*`` tags, the best configuration), one child run per trial (the trial's own pcrl run,
nested under the parent; status FINISHED, KILLED when ASHA stopped it early, FAILED with the error as the
``pcrl.error`` tag; outcome in the ``pcrl.outcome`` tag).

Fault tolerance: a trial that fails (a bad value, a non-finite loss) is reported and the sweep goes on. An
interrupted sweep (Ctrl-C, a killed driver) continues with ``resume=True``: finished and failed trials are
kept as they are, unfinished ones start again and continue from their own pcrl checkpoints
(``train.checkpoint_every``).

Example::

    sweep = load_sweep("configs/tune/loss_weights.yaml", ["data.shards=shards/", "num_samples=8"])
    best = run_sweep(sweep)          # local Ray; address="auto" joins a running cluster
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcrl.config import (
    ConfigError,
    PretrainConfig,
    config_to_dict,
    flatten_config,
    load_config,
    load_schema,
    save_config,
)
from pcrl.io import write_atomic

try:
    from ray.tune import Callback
except ImportError:  # pragma: no cover - the extra is part of the dev install
    raise ImportError("sweeps need Ray Tune: pip install 'pcrl[ray]'") from None

__all__ = [
    "ParamSpace",
    "SchedulerConfig",
    "SweepConfig",
    "SweepResult",
    "load_sweep",
    "run_sweep",
    "trial_config",
    "trial_dir",
]

logger = logging.getLogger(__name__)

_SPACE_TYPES = ("uniform", "loguniform", "randint", "choice", "grid")
_SEARCHERS = ("random", "optuna", "hyperopt", "bayesopt", "ax", "nevergrad", "hebo", "zoopt", "bohb")


@dataclass
class ParamSpace:
    """One dimension of the search space."""

    type: str = "loguniform"
    """``uniform``, ``loguniform``, ``randint`` (integers in [low, high)), ``choice`` (one of ``values``, drawn)
    or ``grid`` (every one of ``values``, each combined with the other dimensions)."""
    low: float = 0.0
    """Lower bound (``uniform``, ``loguniform``, ``randint``)."""
    high: float = 1.0
    """Upper bound (``uniform``, ``loguniform``, ``randint``)."""
    values: list[str] = field(default_factory=list)
    """Candidates of ``choice`` and ``grid``, read as YAML values (``[0.5, 1.0]``, ``[sgd, adamw]``)."""

    def check(self, key: str) -> None:
        if self.type not in _SPACE_TYPES:
            raise ConfigError(f"{key}.type: must be one of {', '.join(_SPACE_TYPES)}, got {self.type!r}")
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ConfigError(f"{key}.values: {self.type} needs at least one value")
        elif not self.low < self.high:
            raise ConfigError(f"{key}: needs low < high, got low={self.low}, high={self.high}")
        elif self.type == "loguniform" and self.low <= 0:
            raise ConfigError(f"{key}.low: loguniform needs low > 0, got {self.low}")

    def domain(self) -> Any:
        """The Ray Tune domain of this dimension."""
        from ray import tune

        values = [_yaml_value(v) for v in self.values]
        match self.type:
            case "uniform":
                return tune.uniform(self.low, self.high)
            case "loguniform":
                return tune.loguniform(self.low, self.high)
            case "randint":
                return tune.randint(int(self.low), int(self.high))
            case "choice":
                return tune.choice(values)
            case _:
                return tune.grid_search(values)


@dataclass
class SchedulerConfig:
    name: str = "asha"
    """``asha`` (stop trials whose metric falls behind at a rung) or ``fifo`` (run every trial to the end)."""
    grace_period: int = 100
    """ASHA: training steps a trial runs before it can be stopped (the first rung)."""
    reduction_factor: float = 2.0
    """ASHA: a trial passes a rung when it is in the best 1/reduction_factor of the trials seen there."""

    def __post_init__(self) -> None:
        if self.name not in ("asha", "fifo"):
            raise ConfigError(f"scheduler.name: must be asha or fifo, got {self.name!r}")
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period: must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """A sweep: which pretraining config, what to vary, how to search, where to run."""

    name: str = "sweep"
    """Sweep name: the folder ``<output_dir>/<name>`` and the parent MLflow run."""
    output_dir: str = "runs/sweeps"
    """Parent folder of sweep folders."""
    base: str = "configs/pretrain/base.yaml"
    """The pretraining YAML every trial starts from."""
    overrides: list[str] = field(default_factory=list)
    """``key.sub=value`` pretraining overrides for every trial (e.g. ``data.shards=...``); the command line
    adds to them."""
    space: dict[str, ParamSpace] = field(default_factory=dict)
    """Search space: dotted pretraining key → :class:`ParamSpace`."""
    num_samples: int = 8
    """Trials drawn (with ``grid`` dimensions: drawn per grid point)."""
    searcher: str = "random"
    """``random`` or a searcher of Ray's integrations (``optuna``, ``hyperopt``, ...; its package must be
    installed)."""
    max_concurrent: int = 0
    """Trials running at once (0 = as many as the cluster's CPUs/GPUs allow)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping."""
    workers_per_trial: int = 1
    """Training processes per trial; above 1 a trial runs through Ray Train's TorchTrainer (DeepSpeed over
    the trial's workers)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training process."""
    gpus_per_worker: float = 0.0
    """GPUs reserved per training process."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty folder name, got {self.name!r}")
        if not self.space:
            raise ConfigError("space: the search space is empty; add e.g. optim.lr: {type: loguniform, ...}")
        for key, dim in self.space.items():
            dim.check(f"space.{key}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.searcher not in _SEARCHERS:
            raise ConfigError(f"searcher: must be one of {', '.join(_SEARCHERS)}, got {self.searcher!r}")
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent: must be >= 0, got {self.max_concurrent}")
        if self.workers_per_trial < 1:
            raise ConfigError(f"workers_per_trial: must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class SweepResult:
    """What a finished sweep hands back."""

    best_params: dict[str, Any]
    """The best trial's values of the searched keys."""
    best_value: float
    """Its best ``eval.metric``."""
    best_config: Path
    """``best.yaml``: the full pretraining config of the best trial."""
    trials: dict[str, str]
    """Trial id → outcome (``finished``, ``stopped_early``, ``failed``)."""
    parent_run_id: str | None
    """The MLflow parent run."""


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if isinstance(text, str) else text


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Load a sweep YAML; command-line ``key=value`` items whose first part is a sweep key (``num_samples``,
    ``scheduler.grace_period``, ...) set the sweep, every other item is a pretraining override for every
    trial (``data.shards=...``).

    The base config, the overrides and every searched key are checked against the pretraining schema
    here, so a typo fails before any trial starts.

    Raises:
        ConfigError: a key is unknown or a value invalid (names the key and the file).
        FileNotFoundError: the sweep YAML or the base config does not exist.
    """
    sweep_keys = set(SweepConfig.__dataclass_fields__)
    own = [o for o in overrides if o.split("=", 1)[0].removeprefix("--").split(".")[0] in sweep_keys]
    trial = [o for o in overrides if o not in own]
    sweep = load_schema(SweepConfig, path, own)
    sweep.overrides = [*sweep.overrides, *trial]
    # Trials run in other processes, possibly on other nodes: paths are made absolute here.
    sweep.base = str(Path(sweep.base).resolve())
    sweep.output_dir = str(Path(sweep.output_dir).resolve())
    base = base_config(sweep)
    known = flatten_config(base)
    for key in sweep.space:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"space.{key}: not a key of the pretraining config ({sweep.base}).{hint}")
    if not base.data.shards:
        raise ConfigError(
            "data.shards: no shards given; add data.shards=PATH to the command line or to overrides in "
            f"{path}"
        )
    return sweep


def base_config(sweep: SweepConfig) -> PretrainConfig:
    """The base pretraining config with the sweep's overrides (what every trial starts from)."""
    try:
        return load_config(sweep.base, sweep.overrides)
    except FileNotFoundError:
        raise FileNotFoundError(f"base: the pretraining config {sweep.base} does not exist") from None
    except ConfigError as e:
        raise ConfigError(f"{e} (base {sweep.base} with the sweep's overrides)") from None


def trial_dir(sweep: SweepConfig, trial_id: str) -> Path:
    """The run folder of a trial (absolute: trials run in Ray workers with other working folders)."""
    return (sweep.sweep_dir / "trials").resolve() / trial_id


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def trial_config(
    sweep: SweepConfig, params: dict[str, Any], trial_id: str, uri: str, parent: str = ""
) -> PretrainConfig:
    """The pretraining config of one trial: base + overrides + the trial's values, its run folder under
    ``trials/`` and the sweep's MLflow store.

    Raises:
        ConfigError: a searched value is invalid (names the key); the trial fails, the sweep goes on.
    """
    run_dir = trial_dir(sweep, trial_id)
    extra = [
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        f"tracking.uri={uri}",
    ]
    return load_config(sweep.base, [*sweep.overrides, *(_override(k, v) for k, v in params.items()), *extra])


# --- what runs inside a trial -----------------------------------------------------------------------


def _train_and_report(cfg: PretrainConfig, report: Callable[[dict[str, Any]], None]) -> None:
    from pcrl.engine import train

    metric = cfg.eval.metric

    def reporter(metrics: dict[str, float], step: int) -> None:
        # Only evaluation steps carry the metric; Tune and ASHA need it in every result.
        if metric in metrics:
            report({**metrics, "step": step})

    train(cfg, reporter=reporter)


def _run_trial(params: dict[str, Any], sweep: SweepConfig, uri: str) -> None:
    """Ray Tune function trainable: one pretraining run (or a TorchTrainer of several processes)."""
    from ray import tune

    from pcrl.engine import configure_logging

    configure_logging()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep, params, trial_id, uri)
    if sweep.workers_per_trial == 1:
        # A trial is its own process group of one (Ray reuses no actor): whatever launcher variables the
        # Ray worker inherited (an srun task's) go, and init_distributed fills in one process on a free port.
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        _train_and_report(cfg, tune.report)
        return

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if sweep.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=sweep.workers_per_trial,
            use_gpu=sweep.gpus_per_worker > 0,
            resources_per_worker={"CPU": sweep.cpus_per_worker, "GPU": sweep.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=trial_id,
            storage_path=str((sweep.sweep_dir / "train").resolve()),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One TorchTrainer worker: Ray Train made the process group; DeepSpeed runs on top of it."""
    import ray.train

    from pcrl.config import config_from_dict
    from pcrl.engine import configure_logging

    configure_logging()
    cfg = config_from_dict(loop_config["config"])
    _train_and_report(cfg, ray.train.report)


# --- the driver -------------------------------------------------------------------------------------


def _searcher(sweep: SweepConfig, metric: str, mode: str) -> Any:
    if sweep.searcher == "random":
        return None
    from ray.tune.search import ConcurrencyLimiter, create_searcher

    try:
        searcher = create_searcher(sweep.searcher, metric=metric, mode=mode)
    except ImportError as e:
        raise ConfigError(f"searcher: {sweep.searcher} needs a package that is not installed ({e})") from None
    return ConcurrencyLimiter(searcher, sweep.max_concurrent) if sweep.max_concurrent else searcher


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_sweep(
    sweep: SweepConfig, address: str | None = None, resume: bool = False, verbose: int = 1
) -> SweepResult:
    """Run (or with ``resume`` continue) a sweep on a Ray cluster and write ``best.yaml``.

    Args:
        sweep: the loaded sweep (:func:`load_sweep`).
        address: a Ray cluster to join (``auto``, ``HOST:PORT``); None (or ``local``) starts a local one, with
            token authentication (:func:`pcrl.ray_local.start_local_ray`).
        resume: continue the sweep in ``<output_dir>/<name>`` (finished trials are not run again).
        verbose: Ray Tune's console verbosity (0 silent, 1 status tables).

    Raises:
        ConfigError: the sweep folder exists without ``resume`` (or is missing with it), or no trial
            reported the metric.
    """
    import ray
    from ray import tune

    from pcrl.evaluate import metric_mode
    from pcrl.ray_local import start_local_ray
    from pcrl.tracking import SweepTracker

    base = base_config(sweep)
    metric = base.eval.metric
    mode = metric_mode(metric)
    if base.eval.every == 0:
        raise ConfigError("eval.every: is 0, so no trial would report a metric; set it (e.g. eval.every=100)")
    sweep_dir = sweep.sweep_dir.resolve()
    state_file = sweep_dir / "sweep.json"
    experiment = sweep_dir / "tune"
    if resume and not experiment.is_dir():
        raise ConfigError(f"--resume: {sweep_dir} holds no sweep to continue; run without --resume")
    if not resume and experiment.exists():
        raise ConfigError(
            f"name: the sweep folder {sweep_dir} exists; continue it with --resume or choose another name"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(state_file)
    uri = state.get("uri") or base.tracking.uri or f"sqlite:///{sweep_dir / 'mlflow.db'}"

    tracker = SweepTracker(uri, base.tracking.experiment)
    space_params = {f"space.{k}": json.dumps(config_to_dict_space(v)) for k, v in sweep.space.items()}
    sweep_params = {
        "metric": metric,
        "mode": mode,
        "num_samples": sweep.num_samples,
        "searcher": sweep.searcher,
        "scheduler": sweep.scheduler.name,
        "scheduler.grace_period": sweep.scheduler.grace_period,
        "scheduler.reduction_factor": sweep.scheduler.reduction_factor,
        "train.max_steps": base.train.max_steps,
        "workers_per_trial": sweep.workers_per_trial,
        "base": sweep.base,
    }
    parent = tracker.start(sweep.name, {**space_params, **sweep_params}, run_id=state.get("parent_run_id"))
    write_atomic(state_file, json.dumps({"uri": uri, "parent_run_id": parent}, indent=1))

    # Trial processes inherit these from a local cluster (a remote one sets its own, e.g. tune.sbatch).
    if sweep.gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Trials keep the driver's working directory, so relative paths in the overrides (data.shards=...)
    # mean what they mean on the command line.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Save the experiment state (what --resume reads) every second: it is small, and a driver killed right
    # after a trial finished must not run that trial again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not ray.is_initialized():
        if address and address != "local":
            ray.init(address=address, include_dashboard=False)
        else:
            # A new instance, with token authentication on: its ports listen on every interface.
            start_local_ray(include_dashboard=False)

    trainable = tune.with_parameters(_run_trial, sweep=sweep, uri=uri)
    per_trial: dict[str, float] = {"CPU": sweep.cpus_per_worker, "GPU": sweep.gpus_per_worker}
    concurrent = sweep.max_concurrent or None
    if sweep.workers_per_trial > 1:
        # The TorchTrainer's workers reserve their own resources; the trial only runs their controller. Tune
        # refuses an empty request, and a sliver of a CPU would leave a full node's worker group one CPU
        # short (it waits, then times out): the trial holds a token byte of memory instead.
        per_trial = {"CPU": 0, "memory": 1}
        if concurrent is None:
            # Holding no CPU, every trial would start at once and their worker groups would wait for each
            # other: as many trials at once as the cluster holds worker groups.
            have = ray.cluster_resources()
            fits = have.get("CPU", 0) // (sweep.workers_per_trial * sweep.cpus_per_worker)
            if sweep.gpus_per_worker:
                fits = min(fits, have.get("GPU", 0) // (sweep.workers_per_trial * sweep.gpus_per_worker))
            concurrent = max(1, int(fits))
    trainable = tune.with_resources(trainable, per_trial)

    if resume:
        # Tuner.restore (Ray 2.60) takes no run config: the callbacks are those pickled by the first launch.
        # _TrialRuns reconnects in its setup() from sweep.json, so it nests the trials under this launch's
        # parent run (a new one if MLflow was down at the first launch) without reaching into the Tuner.
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = None
        if sweep.scheduler.name == "asha":
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="step",
                # One past the last step: ASHA would stop a trial at max_t itself, at the report of the last
                # step and before train() saves that step's checkpoint and closes its run.
                max_t=base.train.max_steps + 1,
                grace_period=sweep.scheduler.grace_period,
                reduction_factor=sweep.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space={k: v.domain() for k, v in sweep.space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=sweep.num_samples,
                scheduler=scheduler,
                search_alg=_searcher(sweep, metric, mode),
                max_concurrent_trials=concurrent,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(sweep_dir),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_TrialRuns(state_file, base.tracking.experiment, sweep, base.train.max_steps)],
                verbose=verbose,
            ),
        )
    status = "FAILED"
    try:
        grid = tuner.fit()
        result = _finish(sweep, grid, metric, mode, uri, tracker)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def config_to_dict_space(dim: ParamSpace) -> dict[str, Any]:
    """A search dimension as plain data (MLflow params of the parent run)."""
    if dim.type in ("choice", "grid"):
        return {"type": dim.type, "values": [_yaml_value(v) for v in dim.values]}
    return {"type": dim.type, "low": dim.low, "high": dim.high}


def _finish(sweep: SweepConfig, grid: Any, metric: str, mode: str, uri: str, tracker: Any) -> SweepResult:
    """Pick the best trial (best value of the metric over its whole history), write best.yaml, log it."""
    outcomes: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    best: tuple[float, str, dict[str, Any]] | None = None
    for result in grid:
        trial_id = Path(result.path).name
        configs[trial_id] = dict(result.config)
        df = result.metrics_dataframe
        if result.error is not None:
            outcomes[trial_id] = "failed"
        values = [] if df is None or metric not in df else [float(v) for v in df[metric] if math.isfinite(v)]
        if not values:
            outcomes.setdefault(trial_id, "failed")
            continue
        steps = [] if df is None or "step" not in df else list(df["step"])
        outcomes.setdefault(
            trial_id, "finished" if max(steps) >= base_config(sweep).train.max_steps else "stopped_early"
        )
        value = max(values) if mode == "max" else min(values)
        better = best is None or (value > best[0] if mode == "max" else value < best[0])
        if better:
            best = (value, trial_id, dict(result.config))
    for trial_id, outcome in sorted(outcomes.items()):
        logger.info("trial %s: %s", trial_id, outcome)
        if outcome == "stopped_early":
            # Ray ends a stopped trial while its train() may still close its own run as FAILED, after the
            # callback closed it as KILLED: now that every trial has ended, the status is set once more.
            tags = {"pcrl.outcome": outcome}
            params = _params(sweep, configs[trial_id])
            run_dir = trial_dir(sweep, trial_id)
            tracker.close_trial(trial_id, tracker.run_id, params, "KILLED", tags, run_dir=run_dir)
    if best is None:
        raise ConfigError(
            f"eval.metric: no trial reported {metric} (all {len(outcomes)} failed); see the trial errors above"
        )
    value, trial_id, params = best
    cfg = trial_config(sweep, params, f"{sweep.name}-best", uri="")
    # The best config as a standalone pretraining config: its own run name, the default local store.
    cfg.run.output_dir = "runs"
    cfg.tracking.uri = ""
    path = sweep.sweep_dir / "best.yaml"
    save_config(cfg, path)
    tracker.log_best(metric, value, {k: params[k] for k in sweep.space}, trial_id, path)
    logger.info("best trial %s: %s = %.4g with %s; config in %s", trial_id, metric, value, params, path)
    return SweepResult(
        best_params={k: params[k] for k in sweep.space},
        best_value=value,
        best_config=path,
        trials=outcomes,
        parent_run_id=tracker.run_id,
    )


class _TrialRuns(Callback):
    """Ray Tune callback (driver side): nests each trial's MLflow run under the sweep's parent run and
    closes it with the trial's outcome, including trials that failed before their run existed and trials
    ASHA stopped (whose process Ray ends without letting train() close its run).

    Tune pickles it with the experiment and a resumed sweep gets that copy back, so it holds no connection:
    :meth:`setup` (called at the start of every launch, the first and each ``--resume``) reads the tracking
    URI and the parent run from ``sweep.json``, which the driver has just written."""

    def __init__(self, state_file: Path, experiment: str, sweep: SweepConfig, max_steps: int) -> None:
        self.state_file, self.experiment = state_file, experiment
        self.sweep, self.max_steps = sweep, max_steps
        self.tracker: Any = None
        self.parent: str | None = None
        self.adopted: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracker": None, "parent": None, "adopted": set()}

    def setup(self, **info: Any) -> None:
        from pcrl.tracking import SweepTracker

        state = _read_state(self.state_file)
        self.tracker = SweepTracker(state.get("uri", ""), self.experiment)
        self.parent = state.get("parent_run_id")
        self.adopted = set()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id not in self.adopted:
            self.adopted.add(trial.trial_id)
            self.tracker.adopt(trial.trial_id, self.parent, _params(self.sweep, trial.config))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = int((trial.last_result or {}).get("step", 0))
        outcome = "finished" if step >= self.max_steps else "stopped_early"
        self.tracker.close_trial(
            trial.trial_id,
            self.parent,
            _params(self.sweep, trial.config),
            "FINISHED" if outcome == "finished" else "KILLED",
            {"pcrl.outcome": outcome, "pcrl.last_step": str(step)},
            # A trial stopped early may still be ending (its records are sent once all trials have ended).
            run_dir=trial_dir(self.sweep, trial.trial_id) if outcome == "finished" else None,
        )
        logger.info("trial %s %s at step %d", trial.trial_id, outcome.replace("_", " "), step)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _trial_error(trial)
        self.tracker.close_trial(
            trial.trial_id,
            self.parent,
            _params(self.sweep, trial.config),
            "FAILED",
            {"pcrl.outcome": "failed", "pcrl.error": error[-5000:]},
            run_dir=trial_dir(self.sweep, trial.trial_id),
        )
        logger.warning("trial %s failed (the sweep goes on): %s", trial.trial_id, error)


def _params(sweep: SweepConfig, config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in sweep.space if k in config}


def _trial_error(trial: Any) -> str:
    """The last line of the trial's error (a ConfigError message, a NonFiniteLossError, ...)."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error (see the Ray logs)"
