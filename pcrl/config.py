"""The typed configuration tree of pcrl: one schema, YAML diffs on top, ``key.sub=value`` overrides last.

Precedence is ``CLI overrides > YAML > dataclass defaults``. The defaults are the paper's 3D setting
(``configs/pretrain/base.yaml`` is therefore almost empty). Unknown keys, wrong types and invalid values
raise :class:`ConfigError` naming the dotted key and what to do.

Example::

    cfg = load_config("configs/pretrain/tiny.yaml", ["train.max_steps=10", "data.shards=shards/"])
    cfg.views.global_size  # (32, 32, 16)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "LossWeights",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PretrainConfig",
    "ProbeConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "ViewsConfig",
    "config_hash",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "load_schema",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names the dotted key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_size(value: Sequence[int], key: str) -> None:
    _check(
        len(value) == 3 and all(int(v) > 0 for v in value),
        key,
        f"expected three positive voxel counts (x, y, z), got {list(value)}",
    )


@dataclass
class RunConfig:
    name: str = "pcrlv2"
    """Run name; the run folder is ``<output_dir>/<name>``. Launching again on the same folder resumes it."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    seed: int = 42
    """Seed of every random stream (python, numpy, torch, loader workers, views, objective scale draws)."""

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and "/" not in self.name,
            "run.name",
            f"must be a non-empty folder name, got {self.name!r}",
        )
        _check(self.seed >= 0, "run.seed", f"must be >= 0, got {self.seed}")


@dataclass
class DataConfig:
    shards: str = ""
    """Shard folder (with ``manifest.jsonl``), a manifest file, or a glob/brace pattern of shard folders."""
    split: str = "train"
    """Which split of the manifest to train on (``train``, ``val``, ``test`` or ``all``)."""
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    """CT intensity window in HU, mapped linearly to [0, 1] and clipped (shards keep raw HU)."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    bad_volumes: str = "skip"
    """An unreadable volume (missing or truncated shard, corrupt bytes, non-finite voxels): ``skip`` reports it
    with its shard and key, counts it and trains on the next volume in its place; ``fail`` stops the run."""
    max_bad_fraction: float = 0.01
    """With ``bad_volumes=skip``, stop the run once the unreadable volumes one loader worker has met pass this
    fraction of its share of an epoch (so the run as a whole never skips more than about this fraction)."""

    def __post_init__(self) -> None:
        _check(
            self.split in ("train", "val", "test", "all"),
            "data.split",
            f"must be train, val, test or all, got {self.split!r}",
        )
        _check(
            len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1],
            "data.ct_window",
            f"must be [low, high] with low < high, got {list(self.ct_window)}",
        )
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        _check(
            self.bad_volumes in ("skip", "fail"),
            "data.bad_volumes",
            f"must be skip or fail, got {self.bad_volumes!r}",
        )
        _check(
            0.0 <= self.max_bad_fraction < 1.0,
            "data.max_bad_fraction",
            f"must be in [0, 1), got {self.max_bad_fraction}",
        )


@dataclass
class ViewsConfig:
    """The PCRLv2 sub-crop views (docs/method.md §1) with the reference's values as defaults, in voxels of
    1 mm."""

    backend: str = "torch"
    """Renderer: ``torch`` (CPU or GPU), ``dali`` (DALI pipeline, GPU or CPU mode) or ``auto`` (the renderer
    measured fastest on the device: torch on CPUs and GPUs, see ``bench/views.py``)."""
    global_size: tuple[int, int, int] = (64, 64, 32)
    """Output size (x, y, z) of each global view."""
    local_size: tuple[int, int, int] = (16, 16, 16)
    """Output size (x, y, z) of each local sub-crop."""
    num_locals: int = 6
    """Local sub-crops per pair of global views."""
    pairs_per_volume: int = 1
    """Pairs of global views (each a training sample) drawn from one decoded volume, to amortise I/O."""
    global_crop_sizes: list[list[int]] = field(
        default_factory=lambda: [[96, 96, 64], [96, 96, 96], [112, 112, 64], [64, 64, 32]]
    )
    """Candidate box sizes (x, y, z) of a global crop, drawn uniformly per view."""
    local_crop_sizes: list[list[int]] = field(
        default_factory=lambda: [[32, 32, 16], [16, 16, 16], [32, 32, 32], [8, 8, 8]]
    )
    """Candidate box sizes (x, y, z) of a local sub-crop, drawn uniformly per crop."""
    border: tuple[int, int, int] = (70, 70, 15)
    """Margin (x, y, z) kept between a global box and the volume edge; shrunk where the volume is too small."""
    min_iou: float = 0.3
    """A pair of global boxes is accepted only if their 3D IoU is above this."""
    local_margin: int = 3
    """Local boxes start within the union of the two global boxes, widened by this many voxels."""
    tissue_filter: bool = True
    """Reject CT pairs whose views are dominated by tissue (the reference keeps lung/air-rich crops)."""
    tissue_threshold_hu: float = -150.0
    """A voxel counts as tissue at or above this HU value."""
    tissue_depth: int = 3
    """Slices looked at for the tissue score (first tissue slice k of d..d+depth-1 scores 1 - k/(depth-1))."""
    tissue_max_fraction: float = 0.15
    """A view whose mean tissue score is above this fraction is rejected (the same for every crop size)."""
    max_tries: int = 200
    """Draws before the least-tissue candidate is taken anyway, so sampling always terminates."""
    flip_prob: float = 0.5
    """Probability of flipping each axis listed in ``flip_axes``."""
    flip_axes: list[int] = field(default_factory=lambda: [0])
    """Spatial axes (0=x, 1=y, 2=z) that may be flipped (the reference flips x only)."""
    scale_range: tuple[float, float] = (0.9, 1.1)
    """Per-axis scale factor range of the random affine."""
    rotation_deg: float = 10.0
    """Per-axis rotation drawn from U(-rotation_deg, rotation_deg)."""
    blur_sigma: tuple[float, float] = (0.0, 2.0)
    """Gaussian blur sigma range in voxels, drawn per axis."""
    noise_std: tuple[float, float] = (0.0, 0.25)
    """Additive Gaussian noise: std drawn from this range."""
    gamma_log_range: float = 0.3
    """Gamma = exp(U(-r, r)), applied as sign(x)|x|^gamma."""
    swap_patch: tuple[int, int, int] = (8, 4, 4)
    """Patch size (x, y, z) of the random patch swap (global views only)."""
    swap_count: int = 100
    """Number of patch swaps per global view."""

    @property
    def filter_threshold_hu(self) -> float | None:
        """The tissue threshold in HU the geometry sampler applies: ``tissue_threshold_hu``, or None with
        ``tissue_filter`` off."""
        return self.tissue_threshold_hu if self.tissue_filter else None

    def __post_init__(self) -> None:
        _check(
            self.backend in ("torch", "dali", "auto"),
            "views.backend",
            f"must be torch, dali or auto, got {self.backend!r}",
        )
        _check_size(self.global_size, "views.global_size")
        _check_size(self.local_size, "views.local_size")
        _check(self.num_locals >= 1, "views.num_locals", f"must be >= 1, got {self.num_locals}")
        _check(
            self.pairs_per_volume >= 1, "views.pairs_per_volume", f"must be >= 1, got {self.pairs_per_volume}"
        )
        _check(len(self.global_crop_sizes) > 0, "views.global_crop_sizes", "needs at least one size")
        for i, s in enumerate(self.global_crop_sizes):
            _check_size(s, f"views.global_crop_sizes[{i}]")
        _check(len(self.local_crop_sizes) > 0, "views.local_crop_sizes", "needs at least one size")
        for i, s in enumerate(self.local_crop_sizes):
            _check_size(s, f"views.local_crop_sizes[{i}]")
        _check(
            len(self.border) == 3 and min(self.border) >= 0,
            "views.border",
            f"must be three values >= 0, got {list(self.border)}",
        )
        _check(0.0 <= self.min_iou < 1.0, "views.min_iou", f"must be in [0, 1), got {self.min_iou}")
        _check(self.local_margin >= 0, "views.local_margin", f"must be >= 0, got {self.local_margin}")
        _check(self.tissue_depth >= 2, "views.tissue_depth", f"must be >= 2, got {self.tissue_depth}")
        _check(
            0.0 < self.tissue_max_fraction <= 1.0,
            "views.tissue_max_fraction",
            f"must be in (0, 1], got {self.tissue_max_fraction}",
        )
        _check(self.max_tries >= 1, "views.max_tries", f"must be >= 1, got {self.max_tries}")
        _check(0.0 <= self.flip_prob <= 1.0, "views.flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        _check(
            all(a in (0, 1, 2) for a in self.flip_axes),
            "views.flip_axes",
            f"axes must be 0, 1 or 2, got {self.flip_axes}",
        )
        _check(
            0.0 < self.scale_range[0] <= self.scale_range[1],
            "views.scale_range",
            f"must be [low, high] with 0 < low <= high, got {list(self.scale_range)}",
        )
        _check(
            0.0 <= self.rotation_deg <= 180.0,
            "views.rotation_deg",
            f"must be in [0, 180], got {self.rotation_deg}",
        )
        for key in ("blur_sigma", "noise_std"):
            lo, hi = getattr(self, key)
            _check(
                0.0 <= lo <= hi, f"views.{key}", f"must be [low, high] with 0 <= low <= high, got {[lo, hi]}"
            )
        _check(
            self.gamma_log_range >= 0.0, "views.gamma_log_range", f"must be >= 0, got {self.gamma_log_range}"
        )
        _check_size(self.swap_patch, "views.swap_patch")
        _check(self.swap_count >= 0, "views.swap_count", f"must be >= 0, got {self.swap_count}")
        _check(
            all(p <= g for p, g in zip(self.swap_patch, self.global_size, strict=True)),
            "views.swap_patch",
            f"{list(self.swap_patch)} does not fit in views.global_size {list(self.global_size)}",
        )


@dataclass
class ModelConfig:
    base_channels: int = 32
    """Width of the first convolution; encoder stage d has widths (base·2^d, 2·base·2^d). 32 = the paper."""
    depth: int = 4
    """Encoder stages (depth - 1 poolings and decoder stages). 4 = the paper."""
    norm: str = "batch"
    """Normalisation in the U-Net: ``batch``, ``sync_batch`` (across ranks), ``group`` or ``instance``."""
    activation_checkpointing: bool = False
    """Recompute decoder stages in backward to save activation memory."""
    bn_stats: str = "global"
    """Which forwards update the BatchNorm running statistics (what eval mode and the exported encoder use;
    no training step reads them): ``global`` (the global views only, so they describe global-size crops) or
    ``all`` (every forward, the local views' last: the reference's behaviour)."""

    def __post_init__(self) -> None:
        _check(self.base_channels >= 1, "model.base_channels", f"must be >= 1, got {self.base_channels}")
        _check(2 <= self.depth <= 6, "model.depth", f"must be in [2, 6], got {self.depth}")
        _check(
            self.norm in ("batch", "sync_batch", "group", "instance"),
            "model.norm",
            f"must be batch, sync_batch, group or instance, got {self.norm!r}",
        )
        _check(
            self.bn_stats in ("global", "all"),
            "model.bn_stats",
            f"must be global or all, got {self.bn_stats!r}",
        )
        if self.norm == "group":
            _check(
                self.base_channels % 8 == 0,
                "model.base_channels",
                "must be a multiple of 8 with model.norm=group (8 groups)",
            )


@dataclass
class LossWeights:
    restore: float = 1.0
    """Weight of the pixel-restoration MSE (full-resolution output)."""
    multiscale: float = 1.0
    """Weight of β·MSE of the randomly chosen decoder scale's restoration head."""
    global_: float = 1.0
    """Weight of the siamese global↔global term (YAML key ``global``)."""
    local: float = 1.0
    """Weight of the local↔global sub-crop term."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(v >= 0.0, f"objective.weights.{f.name.rstrip('_')}", f"must be >= 0, got {v}")


@dataclass
class ObjectiveConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    """Per-term weights; these are what the sweeps tune."""
    restore_views: list[int] = field(default_factory=lambda: [1])
    """Global views that are restored: ``[1]`` = the reference, ``[1, 2]`` restores both."""
    beta_schedule: str = "cosine"
    """β over training: ``cosine`` (½(1+cos(π·step/total))) or ``constant`` (β = 1)."""

    def __post_init__(self) -> None:
        _check(
            len(self.restore_views) > 0
            and set(self.restore_views) <= {1, 2}
            and len(set(self.restore_views)) == len(self.restore_views),
            "objective.restore_views",
            f"must be [1], [2] or [1, 2], got {self.restore_views}",
        )
        _check(
            self.beta_schedule in ("cosine", "constant"),
            "objective.beta_schedule",
            f"must be cosine or constant, got {self.beta_schedule!r}",
        )


@dataclass
class OptimConfig:
    name: str = "sgd"
    """``sgd`` (the paper: momentum 0.9) or ``adamw``."""
    lr: float = 1e-3
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 1e-4
    """Weight decay (on all parameters, as the reference)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``lr * min_lr_ratio``."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "adamw"), "optim.name", f"must be sgd or adamw, got {self.name!r}")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            "optim.betas",
            f"must be in [0, 1), got {list(self.betas)}",
        )
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "optim.min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )


@dataclass
class TrainConfig:
    max_steps: int = 75_000
    """Optimizer steps of the run (the paper: 241 epochs × 312 steps ≈ 75 k)."""
    micro_batch_size: int = 8
    """Samples per device per forward (the paper: 32 over 4 GPUs). BatchNorm heads need >= 2."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 = off, as the reference)."""
    checkpoint_every: int = 1000
    """Save a checkpoint every N steps (and always at the end, and on a preemption signal). 0 = only then."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run folder, the newest ones (older tags are deleted once ``latest`` moves past
    them); 0 keeps all. Keep at least 2, so a checkpoint damaged on disk has a predecessor to resume from."""
    log_every: int = 10
    """Log metrics every N steps."""
    max_nonfinite_skips: int = 0
    """Micro-batches whose loss is NaN/inf (on any rank) skipped, with a warning naming the step, before the
    run stops (exit 3) at the next one; 0 = stop at the first. A skipped micro-batch adds no gradient, so
    with ``grad_accum_steps=1`` its step makes no update. Counted as ``train/nonfinite_skips``."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(
            self.max_nonfinite_skips >= 0,
            "train.max_nonfinite_skips",
            f"must be >= 0, got {self.max_nonfinite_skips}",
        )
        _check(
            self.micro_batch_size >= 2,
            "train.micro_batch_size",
            f"must be >= 2: the BatchNorm1d heads need two samples per device (got {self.micro_batch_size})",
        )
        _check(
            self.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}"
        )
        _check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(
            self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"
        )
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(
            self.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}"
        )


@dataclass
class EngineConfig:
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (DeepSpeed loss scaling)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-2."""
    channels_last: bool = False
    """Use the channels-last 3D memory format (fast bf16 convolutions on CPUs with AMX)."""
    deepspeed_overlay: str = ""
    """Optional JSON file of extra DeepSpeed keys; refused where it contradicts a pcrl setting."""
    dist_timeout_s: int = 600
    """Collective timeout in seconds, so a dead rank cannot hang the others forever."""

    def __post_init__(self) -> None:
        _check(
            self.precision in ("fp32", "bf16", "fp16"),
            "engine.precision",
            f"must be fp32, bf16 or fp16, got {self.precision!r}",
        )
        _check(self.zero_stage in (0, 1, 2), "engine.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        _check(self.dist_timeout_s >= 1, "engine.dist_timeout_s", f"must be >= 1, got {self.dist_timeout_s}")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = a sqlite store ``mlflow.db`` inside the run folder."""
    experiment: str = "pcrl"
    """MLflow experiment name."""
    enabled: bool = True
    """Log to MLflow (``metrics.jsonl`` in the run folder is always written)."""
    retry_s: float = 60.0
    """While the MLflow server is unreachable, try again (and send what it missed) every N seconds; records
    wait in ``metrics.jsonl`` meanwhile."""
    sample_keys: bool = False
    """Record which volume keys each rank trained on at each step (``sample_keys/rank<r>.jsonl``), to audit
    the data a run saw."""
    image_every: int = 1000
    """Draw the reconstruction panel every N steps and at the last step (0 = never). Rank 0 writes
    ``images/recon_step_<step>.png`` in the run folder and logs it to MLflow under ``images/``."""
    image_volumes: int = 2
    """Fixed volumes shown in the panel, 2-8 (the model runs on them with batch statistics, as in training,
    and BatchNorm needs two samples)."""
    image_split: str = "val"
    """Split the panel's volumes come from (``train``, ``val``, ``test`` or ``all``); when it holds none, the
    first volumes of ``data.split`` are shown instead."""

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "must not be empty")
        _check(self.retry_s > 0, "tracking.retry_s", f"must be > 0, got {self.retry_s}")
        _check(self.image_every >= 0, "tracking.image_every", f"must be >= 0, got {self.image_every}")
        _check(
            2 <= self.image_volumes <= 8,
            "tracking.image_volumes",
            "must be in [2, 8] (BatchNorm needs two samples; more do not fit a picture), "
            f"got {self.image_volumes}",
        )
        _check(
            self.image_split in ("train", "val", "test", "all"),
            "tracking.image_split",
            f"must be train, val, test or all, got {self.image_split!r}",
        )


@dataclass
class EvalConfig:
    """Periodic validation on held-out volumes (``pcrl/evaluate.py``): the number a sweep optimises."""

    every: int = 1000
    """Evaluate every N steps and at the last step (0 = never)."""
    split: str = "val"
    """Held-out split of the manifest evaluated on (``train``, ``val``, ``test`` or ``all``); when it holds no
    volume, the first volumes of ``data.split`` are used instead, with a warning (then nothing is held out)."""
    volumes: int = 8
    """At most this many volumes of ``eval.split`` (manifest order)."""
    pairs_per_volume: int = 2
    """Pairs of global views rendered per volume (each pair gives two restorations to score)."""
    batch_size: int = 4
    """Views per forward, >= 2 (BatchNorm runs on batch statistics, as in training)."""
    seed: int = 0
    """Seed of the evaluation views, separate from ``run.seed``, so every trial of a sweep sees the same
    views and the numbers compare across steps and trials."""
    metric: str = "val/psnr"
    """The metric a sweep optimises (``val/psnr`` higher is better, ``val/mse`` lower is better)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _check(
            self.split in ("train", "val", "test", "all"),
            "eval.split",
            f"must be train, val, test or all, got {self.split!r}",
        )
        _check(self.volumes >= 1, "eval.volumes", f"must be >= 1, got {self.volumes}")
        _check(
            self.pairs_per_volume >= 1, "eval.pairs_per_volume", f"must be >= 1, got {self.pairs_per_volume}"
        )
        _check(
            self.batch_size >= 2,
            "eval.batch_size",
            f"must be >= 2: BatchNorm runs on batch statistics (got {self.batch_size})",
        )
        _check(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")
        _check(bool(self.metric), "eval.metric", "must name a metric, e.g. val/psnr")


@dataclass
class ProbeConfig:
    """The online linear probe (``pcrl/probe.py``), run with the evaluation every ``eval.every`` steps."""

    cases: str = ""
    """Folder of labelled cases made by ``python -m data_prep.labelled`` (empty = no probe)."""
    task: str = "auto"
    """``aal`` (Colin27 patches → AAL lobe, one hemisphere against the other; not in the pretraining data),
    ``lesion`` (lesion vs background patches of the pyradiomics cases, leave-one-case-out), or ``auto``: aal
    when ``probe.cases`` holds its data (``python -m data_prep.labelled --task aal``), else lesion."""
    names: list[str] = field(default_factory=list)
    """Lesion cases to use, at least two (empty = all cases in the folder); lesion task only."""
    patch_size: tuple[int, int, int] = (32, 32, 16)
    """Patch size (x, y, z) in voxels; divisible by 2^(model.depth-1)."""
    per_class: int = 16
    """Patches per class and case: lesion and background patches per case, or per lobe and hemisphere."""
    regularization: float = 1.0
    """Inverse L2 strength of the logistic regression (scikit-learn's ``C``)."""
    seed: int = 0
    """Seed of the patch positions and the solver, separate from ``run.seed`` so runs compare."""

    def __post_init__(self) -> None:
        _check_size(self.patch_size, "probe.patch_size")
        _check(
            self.task in ("auto", "aal", "lesion"),
            "probe.task",
            f"must be auto, aal or lesion, got {self.task!r}",
        )
        _check(self.per_class >= 2, "probe.per_class", f"must be >= 2, got {self.per_class}")
        _check(self.regularization > 0, "probe.regularization", f"must be > 0, got {self.regularization}")
        _check(self.seed >= 0, "probe.seed", f"must be >= 0, got {self.seed}")
        _check(
            len(self.names) != 1,
            "probe.names",
            "needs at least two cases (leave-one-case-out), or [] for all",
        )


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        # The U-Net pools depth-1 times, so view sizes must divide by 2^(depth-1); crop boxes need not.
        _check(
            not (self.engine.channels_last and self.engine.zero_stage > 0),
            "engine.channels_last",
            "needs engine.zero_stage=0 (ZeRO flattens parameters into dense buffers); turn one of them off",
        )
        factor = 2 ** (self.model.depth - 1)
        for key, size in (
            ("views.global_size", self.views.global_size),
            ("views.local_size", self.views.local_size),
        ):
            _check(
                all(s % factor == 0 for s in size),
                key,
                f"{list(size)} must be divisible by {factor} (2^(model.depth-1)) so the U-Net can pool it",
            )

    @property
    def run_dir(self) -> Path:
        """The run folder, ``<run.output_dir>/<run.name>``."""
        return Path(self.run.output_dir) / self.run.name


# --- loading ---------------------------------------------------------------------------------------

# YAML spells the siamese weight ``global`` (a Python keyword, so the field is ``global_``).
_ALIASES = {"global": "global_"}


def _to_yaml_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        inv = {v: k for k, v in _ALIASES.items()}
        return {inv.get(k, k): _to_yaml_keys(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_yaml_keys(v) for v in obj]
    return obj


def _from_yaml_keys(obj: Any, where: str = "") -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where or '<root>'}: keys must be strings, got {k!r}")
            key = _ALIASES.get(k, k) if where.endswith("weights") else k
            out[key] = _from_yaml_keys(v, f"{where}.{k}" if where else k)
        return out
    return obj


def _merge_into(dc_type: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``dc_type`` from ``data`` with exact key and type checks (names the dotted key)."""
    fields = {f.name: f for f in dataclasses.fields(dc_type)}
    hints = _type_hints(dc_type)
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        dotted = f"{where}.{k.rstrip('_')}" if where else k.rstrip("_")
        if k not in fields:
            close = _closest(k, [n.rstrip("_") for n in fields])
            hint = f" Did you mean '{close}'?" if close else ""
            known = ", ".join(n.rstrip("_") for n in fields)
            raise ConfigError(f"{dotted}: unknown key.{hint} Known keys here: {known}")
        kwargs[k] = _coerce(v, hints[k], dotted)
    try:
        return dc_type(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(f"{where or '<root>'}: {e}") from e


def _type_hints(dc_type: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(dc_type)


@dataclass(frozen=True)
class _OverrideScalar:
    """A command-line value that YAML read as a number, a boolean, a date or null: a string field takes the
    text as written (``run.name=28683_00000`` stays that, not the integer 2868300000; ``data.shards=0123``
    is not octal 83), every other field the value YAML read."""

    text: str
    value: Any

    def for_type(self, tp: Any) -> Any:
        if tp is str:
            return "" if self.value is None else self.text
        return self.value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    import typing

    if isinstance(value, _OverrideScalar):
        value = value.for_type(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
        return _merge_into(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is dict:
        # Free-form string keys (a sweep's search space is keyed by dotted config keys).
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_inline_list(value, key)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({list(value)})")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _parse_inline_list(text: str, key: str) -> list[Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse {text!r} as a list: {e}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list like [1, 2], got {text!r}")
    return value


def _closest(name: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return m[0] if m else None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists, except
    that a string field given an unquoted number, boolean, date or null keeps the text as written."""
    import yaml

    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, str | list | dict):
            value = _OverrideScalar(raw.strip(), value)
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load a config: dataclass defaults, then the YAML diff at ``path``, then ``key.sub=value`` overrides.

    Raises:
        ConfigError: a key is unknown, a value has the wrong type or is invalid (names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    return load_schema(PretrainConfig, path, overrides)


_Schema = TypeVar("_Schema")


def load_schema(
    schema: type[_Schema], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> _Schema:
    """:func:`load_config` for another dataclass tree (the fine-tuning config): same precedence and checks.

    Raises:
        ConfigError: a key is unknown, a value has the wrong type or is invalid (names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    import yaml

    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded
    tree = _deep_update(tree, parse_overrides(overrides))
    try:
        return _merge_into(schema, _from_yaml_keys(tree), "")  # type: ignore[no-any-return]
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{e} (in {path} or the overrides)") from None
        raise


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Rebuild a config from :func:`config_to_dict` output (checkpoints, MLflow), with the same checks."""
    return _merge_into(PretrainConfig, _from_yaml_keys(data), "")


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-safe nested dict (tuples as lists, ``global_`` spelled ``global``)."""
    return _to_yaml_keys(dataclasses.asdict(cfg))


def flatten_config(cfg: PretrainConfig) -> dict[str, Any]:
    """Dotted keys to plain values, e.g. ``{"objective.weights.global": 1.0}`` (MLflow params, Ray Tune)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", config_to_dict(cfg))
    return out


def config_hash(cfg: PretrainConfig) -> str:
    """A short stable hash of the resolved config (recorded with checkpoints and exports)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary name, then rename)."""
    import yaml

    from pcrl.io import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
