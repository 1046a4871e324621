"""Periodic validation during pretraining: numbers that say whether a run (or a sweep trial) is any good.

Every ``eval.every`` steps, and at the last step, :class:`Evaluation` runs each evaluator of
:data:`EVALUATORS` on the current weights and returns one flat dict (``val/psnr``, ``val/mse``, ...). The
engine logs it with the step's other metrics (MLflow, ``metrics.jsonl``) and hands it to the reporter, so a
Ray Tune sweep optimises ``eval.metric``.

* **Restoration error** (:class:`RestorationEval`): PSNR and MSE of the full-resolution restoration of
  degraded global views against their clean crops, on ``eval.split`` (held-out) volumes. The views are
  rendered once, by the training view recipe with a fixed seed (``eval.seed``, not ``run.seed``), so the
  number compares across steps and across the trials of a sweep.
* **BatchNorm**: as the reconstruction panel (``pcrl/figures.py``), the model runs in training mode, on
  batch statistics over fixed batches of ``eval.batch_size`` views, on a private copy of the weights: the
  restoration loss sees the network that way (the running statistics lag behind early in a run). The
  training model's mode and statistics are never touched.
* **Representation health** (:class:`HealthEval`): per decoder scale, the collapse indicators of
  :mod:`pcrl.health` (``health/scale<l>/std``, ``rank``, ``paired_cos``, ``unpaired_cos``, ``gap``) on the
  same held-out views, with a console warning when a scale collapses.
* **Several processes**: rank 0 alone evaluates (the views live there only) and
  :meth:`Evaluation.run` broadcasts the result, so every rank returns the same dict and a reporter that must
  be called on every worker (Ray Train) sees the same numbers. Every rank calls ``run`` at the same steps,
  so the broadcast cannot deadlock; the other ranks wait in it while rank 0 evaluates (bounded by
  ``engine.dist_timeout_s``).

Adding an evaluator: write a class with ``METRICS`` (name → ``"max"`` or ``"min"``, the better direction),
``from_config(cfg, device)`` (return None when it has nothing to evaluate) and ``__call__(model)`` returning
floats for those names, then append it to :data:`EVALUATORS`.

Example::

    evaluation = Evaluation.from_config(cfg, engine.device)  # on every rank; renders views on rank 0
    if evaluation.due(step):
        metrics.update(evaluation.run(engine.module.model))  # {"val/psnr": 21.3, "val/mse": 0.0074}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from pcrl import distributed
from pcrl.config import ConfigError, config_hash
from pcrl.health import collapsed, scale_health
from pcrl.model import private_model
from pcrl.probe import LinearProbe

if TYPE_CHECKING:
    from pcrl.config import PretrainConfig

__all__ = [
    "EVALUATORS",
    "Evaluation",
    "Evaluator",
    "HealthEval",
    "RestorationEval",
    "eval_views",
    "fixed_batches",
    "metric_mode",
    "psnr",
]

logger = logging.getLogger(__name__)

# Seed stream of the evaluation views: distinct from the loader's and the panel's streams.
_EVAL_STREAM = 0xE7A1


class Evaluator(Protocol):
    """One evaluator: built once per run on rank 0, called with the training model's weights."""

    METRICS: dict[str, str]
    """Metric name → ``"max"`` or ``"min"`` (which direction is better)."""

    def __call__(self, model: nn.Module) -> dict[str, float]: ...


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, for intensities in [0, 1] (peak 1).

    Args:
        output: (N, ...) restorations.
        target: (N, ...) clean images, same shape.

    Returns:
        (N,) float32, ``10·log10(1 / MSE)``; infinite where the restoration is exact.
    """
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    mse = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse)


def fixed_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fixed evaluation batches of ``n`` rows; a last batch of one row would break
    batch statistics, so it joins the one before."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True))


class RestorationEval:
    """Restoration error of held-out volumes: ``val/psnr`` (mean over views, dB) and ``val/mse``.

    Args:
        views: (N, 1, X, Y, Z) degraded, z-normalised global views.
        targets: (N, 1, X, Y, Z) their clean crops in [0, 1].
        model: private copy of the training architecture (weights replaced at every call).
        batch_size: views per forward, >= 2.
    """

    METRICS: ClassVar[dict[str, str]] = {"val/psnr": "max", "val/mse": "min"}

    def __init__(self, views: Tensor, targets: Tensor, model: nn.Module, batch_size: int) -> None:
        if views.shape != targets.shape or views.ndim != 5:
            raise ValueError(
                f"views {tuple(views.shape)} and targets {tuple(targets.shape)} must both be (N, 1, X, Y, Z)"
            )
        self.views, self.targets, self.model = views, targets, model
        self.batches = fixed_batches(views.shape[0], batch_size)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> RestorationEval | None:
        """Render the fixed held-out views (:func:`eval_views`) and build the private model on ``device``."""
        views, targets, names = _shared_eval_views(cfg)
        logger.info(
            "evaluation every %d steps on %d views of %s", cfg.eval.every, views.shape[0], ", ".join(names)
        )
        return cls(
            views.to(device), targets.to(device), private_model(cfg.model, device), cfg.eval.batch_size
        )

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Copy ``model``'s weights (any dtype or memory format) into the private copy and score the views."""
        self.model.load_state_dict(model.state_dict())
        p = next(self.model.parameters())
        scores, errors = [], []
        for s, e in self.batches:
            out = self.model(self.views[s:e].to(p.dtype)).reconstruction.float()
            scores.append(psnr(out, self.targets[s:e]))
            errors.append((out - self.targets[s:e]).pow(2).flatten(1).mean(1))
        return {"val/psnr": float(torch.cat(scores).mean()), "val/mse": float(torch.cat(errors).mean())}


def eval_views(cfg: PretrainConfig) -> tuple[Tensor, Tensor, list[str]]:
    """Render the evaluation views: ``eval.pairs_per_volume`` pairs of global views from each of the first
    ``eval.volumes`` volumes of ``eval.split``, with seeds fixed by ``eval.seed`` and the position.

    The training recipe of ``cfg.views`` (crops, affine, degradation) is used as it is, so the network is
    scored on the task it trains on; with no volume in ``eval.split``, the first volumes of ``data.split``
    are used and a warning says the metric is then not held out.

    Returns:
        views (N, 1, X, Y, Z) degraded inputs, targets (N, 1, X, Y, Z) clean crops, the volumes' names.

    Raises:
        ConfigError: no manifest or no volume at all (names ``data.shards``).
    """
    from pcrl.data import fixed_views
    from pcrl.shards import split_or_fallback
    from pcrl.views import PCRLv2Views

    try:
        records, fell_back = split_or_fallback(cfg.data.shards, cfg.eval.split, cfg.data.split)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.shards={cfg.data.shards}: {e}") from None
    if fell_back:
        logger.warning(
            "eval.split=%s has no volumes in %s; evaluating on the first volumes of %r, which the run trains "
            "on (the metric is not held out: shard with a val split, e.g. --split train=0.9,val=0.1)",
            cfg.eval.split,
            cfg.data.shards,
            cfg.data.split,
        )
    records = records[: cfg.eval.volumes]
    if not records:
        raise ConfigError(f"data.shards={cfg.data.shards}: no volumes to evaluate on")

    samples = [
        (record, (cfg.eval.seed, _EVAL_STREAM, i, j))
        for i, record in enumerate(records)
        for j in range(cfg.eval.pairs_per_volume)
    ]
    inputs, targets = [], []
    for _, sample in fixed_views(cfg, PCRLv2Views(cfg.views), samples):
        inputs.append(sample["global_views"])  # (2, 1, X, Y, Z)
        targets.append(sample["global_targets"])
    return torch.cat(inputs), torch.cat(targets), [r.key for r in records]  # type: ignore[arg-type]


_views_cache: dict[str, tuple[Tensor, Tensor, list[str]]] = {}


def _shared_eval_views(cfg: PretrainConfig) -> tuple[Tensor, Tensor, list[str]]:
    """:func:`eval_views`, rendered once for all the evaluators of a run (one config at a time is kept)."""
    key = config_hash(cfg)
    if key not in _views_cache:
        _views_cache.clear()
        _views_cache[key] = eval_views(cfg)
    return _views_cache[key]


class HealthEval:
    """The ``health/`` statistics of every decoder scale (:mod:`pcrl.health`), warning on a collapse.

    Args:
        views: (N, 2, 1, X, Y, Z) degraded, z-normalised global views of N pairs.
        model: private copy of the training architecture (weights replaced at every call).
        batch_size: pairs per forward, >= 2 (BatchNorm in training mode).
    """

    # Monitors, not scores to optimise: none of them is an eval.metric.
    METRICS: ClassVar[dict[str, str]] = {}

    def __init__(self, views: Tensor, model: nn.Module, batch_size: int) -> None:
        if views.ndim != 6 or views.shape[1] != 2 or views.shape[0] < 2:
            raise ValueError(f"views must be (N, 2, 1, X, Y, Z) with N >= 2 pairs, got {tuple(views.shape)}")
        self.views, self.model = views, model
        self.batches = fixed_batches(views.shape[0], batch_size)
        self._collapsed: set[int] = set()

    @classmethod
    def from_config(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> HealthEval | None:
        """The fixed held-out views of :func:`eval_views` (shared with :class:`RestorationEval`) as pairs."""
        views, _, _ = _shared_eval_views(cfg)
        pairs = views.reshape(-1, 2, *views.shape[1:])  # rows 2k, 2k+1 are the two views of pair k
        if pairs.shape[0] < 2:
            logger.warning("health monitors off: they need at least 2 held-out view pairs (eval.volumes)")
            return None
        return cls(pairs.to(device), private_model(cfg.model, device), cfg.eval.batch_size)

    @torch.no_grad()
    def features(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Per scale, the (N, C) target features of view 1 and of view 2 under ``model``'s weights."""
        self.model.load_state_dict(model.state_dict())
        dtype = next(self.model.parameters()).dtype
        per_view: list[list[list[Tensor]]] = [[], []]
        for s, e in self.batches:
            for v in (0, 1):
                out = self.model(self.views[s:e, v].to(dtype), local=True)
                per_view[v].append([f.target.float() for f in out.scale_features])
        return [
            (torch.cat([b[k] for b in per_view[0]]), torch.cat([b[k] for b in per_view[1]]))
            for k in range(len(per_view[0][0]))
        ]

    def __call__(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for scale, (z1, z2) in enumerate(self.features(model)):
            stats = scale_health(z1, z2)
            metrics.update({f"health/scale{scale}/{k}": v for k, v in stats.items()})
            why = collapsed(stats, z1.shape[1], z1.shape[0])
            if why is not None and scale not in self._collapsed:
                self._collapsed.add(scale)
                logger.warning(
                    "representation collapse at decoder scale %d (%d channels): %s. Different inputs get the "
                    "same or collinear features at that scale; if it lasts, lower optim.lr, raise "
                    "train.micro_batch_size (BatchNorm statistics), or lower objective.weights.global/local",
                    scale,
                    z1.shape[1],
                    why,
                )
            elif why is None and scale in self._collapsed:
                self._collapsed.discard(scale)
                logger.warning("decoder scale %d recovered from its collapse: %s", scale, stats)
        return metrics


EVALUATORS: tuple[Any, ...] = (RestorationEval, HealthEval, LinearProbe)
"""The evaluator classes every run uses (see the module docstring for adding one). ``LinearProbe`` (the
online linear probe, ``probe/accuracy`` and ``probe/auc``) is built only when ``probe.cases`` is set."""


def metric_mode(name: str) -> str:
    """``"max"`` or ``"min"``: which direction of metric ``name`` is better.

    Raises:
        ConfigError: no evaluator reports ``name`` (names ``eval.metric`` and the known metrics).
    """
    modes = {k: v for cls in EVALUATORS for k, v in cls.METRICS.items()}
    if name not in modes:
        raise ConfigError(f"eval.metric: unknown metric {name!r}; choose one of {', '.join(sorted(modes))}")
    return modes[name]


class Evaluation:
    """All evaluators of a run, on rank 0, run every ``eval.every`` steps and at the last step.

    Args:
        evaluators: the built evaluators (on rank 0; empty on other ranks).
        every: evaluate every N steps (0 = never).
        max_steps: the last step, always evaluated when ``every`` > 0.
    """

    def __init__(self, evaluators: Sequence[Evaluator], every: int, max_steps: int) -> None:
        self.evaluators = list(evaluators)
        self.every = every
        self.max_steps = max_steps

    @classmethod
    def from_config(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> Evaluation:
        """Build the evaluators on rank 0 (call on every rank; the others keep none).

        Raises:
            ConfigError: ``eval.metric`` names no known metric, or there is nothing to evaluate on.
        """
        metric_mode(cfg.eval.metric)
        built: list[Evaluator] = []
        if cfg.eval.every and distributed.is_main():
            for evaluator_cls in EVALUATORS:
                evaluator = evaluator_cls.from_config(cfg, device)
                if evaluator is not None:
                    built.append(evaluator)
        return cls(built, cfg.eval.every, cfg.train.max_steps)

    def due(self, step: int) -> bool:
        """True at the steps to evaluate (the same on every rank)."""
        return bool(self.every) and (step % self.every == 0 or step == self.max_steps)

    def run(self, model: nn.Module) -> dict[str, float]:
        """Evaluate ``model`` (the plain training module, not the DeepSpeed engine); call on every rank.

        Returns:
            The metrics of every evaluator, the same dict on every rank.
        """
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator(model))
        return distributed.broadcast_object(metrics)
