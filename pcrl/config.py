"""The typed configuration tree of pcrl: one schema, YAML diffs on top, ``key.sub=value`` overrides last.

Precedence is ``CLI overrides > YAML > dataclass defaults``. The defaults are the paper's 3D setting
(``configs/pretrain/base.yaml`` is therefore almost empty). Unknown keys, wrong types and invalid values
raise :class:`ConfigError` naming the dotted key and what to do.

This module is the schema: one dataclass per section, a docstring per key, and the checks of values that
the types cannot express. The loading, coercion and messages live in :mod:`pcrl.config_loading` and are
imported from here. A key with a fixed set of values is typed ``Literal[...]``: the loader checks it from the
type, and other modules (the model, the objective) take their valid values from the same alias.

Example::

    cfg = load_config("configs/pretrain/tiny.yaml", ["train.max_steps=10", "data.shards=shards/"])
    cfg.views.global_size  # (32, 32, 16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pcrl.config_loading import (
    ConfigError,
    check,
    check_choices,
    check_size,
    config_hash,
    config_to_dict,
    flatten_config,
    load_schema,
    parse_overrides,
    save_config,
    schema_from_dict,
)

__all__ = [
    "BetaSchedule",
    "BnStats",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "LossWeights",
    "ModelConfig",
    "Norm",
    "ObjectiveConfig",
    "OptimConfig",
    "PretrainConfig",
    "ProbeConfig",
    "RunConfig",
    "Split",
    "TrackingConfig",
    "TrainConfig",
    "ViewsConfig",
    "check",
    "check_choices",
    "check_size",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "load_schema",
    "parse_overrides",
    "save_config",
]

Split = Literal["train", "val", "test", "all"]
"""A split of the shard manifest."""
Norm = Literal["batch", "sync_batch", "group", "instance"]
"""The U-Net's normalisation (:mod:`pcrl.model` builds it)."""
BnStats = Literal["global", "all"]
"""Which forwards update the BatchNorm running statistics (:class:`pcrl.objective.PCRLv2Task`)."""
BetaSchedule = Literal["cosine", "constant"]
"""β over training (:func:`pcrl.objective.beta_schedule`)."""


@dataclass
class RunConfig:
    name: str = "pcrlv2"
    """Run name; the run folder is ``<output_dir>/<name>``. Launching again on the same folder resumes it."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    seed: int = 42
    """Seed of every random stream (python, numpy, torch, loader workers, views, objective scale draws)."""

    def __post_init__(self) -> None:
        # One plain path component: ".." or a separator would put the run (and later resumes) elsewhere.
        plain = (
            self.name not in ("", ".", "..")
            and not any(c in self.name for c in ("/", "\\", "\0"))
            and self.name.isprintable()
        )
        check(
            plain,
            "run.name",
            f"must be a plain folder name (no '/', '..' or control characters), got {self.name!r}",
        )
        check(self.seed >= 0, "run.seed", f"must be >= 0, got {self.seed}")


@dataclass
class DataConfig:
    shards: str = ""
    """Shard folder (with ``manifest.jsonl``), a manifest file, or a glob/brace pattern of shard folders."""
    split: Split = "train"
    """Which split of the manifest to train on (``train``, ``val``, ``test`` or ``all``)."""
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    """CT intensity window in HU, mapped linearly to [0, 1] and clipped (shards keep raw HU)."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    bad_volumes: Literal["skip", "fail"] = "skip"
    """An unreadable volume (missing or truncated shard, corrupt bytes, non-finite voxels): ``skip`` reports it
    with its shard and key, counts it and trains on the next volume in its place; ``fail`` stops the run."""
    max_bad_fraction: float = 0.01
    """With ``bad_volumes=skip``, stop the run once the unreadable volumes one loader worker has met pass this
    fraction of its share of an epoch (so the run as a whole never skips more than about this fraction)."""

    def __post_init__(self) -> None:
        check_choices(self, "data")
        check(
            len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1],
            "data.ct_window",
            f"must be [low, high] with low < high, got {list(self.ct_window)}",
        )
        check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        check(
            0.0 <= self.max_bad_fraction < 1.0,
            "data.max_bad_fraction",
            f"must be in [0, 1), got {self.max_bad_fraction}",
        )


@dataclass
class ViewsConfig:
    """The PCRLv2 sub-crop views (docs/method.md §1) with the reference's values as defaults, in voxels of
    1 mm."""

    backend: Literal["torch", "dali", "auto"] = "torch"
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
        check_choices(self, "views")
        check_size(self.global_size, "views.global_size")
        check_size(self.local_size, "views.local_size")
        check(self.num_locals >= 1, "views.num_locals", f"must be >= 1, got {self.num_locals}")
        check(
            self.pairs_per_volume >= 1, "views.pairs_per_volume", f"must be >= 1, got {self.pairs_per_volume}"
        )
        check(len(self.global_crop_sizes) > 0, "views.global_crop_sizes", "needs at least one size")
        for i, s in enumerate(self.global_crop_sizes):
            check_size(s, f"views.global_crop_sizes[{i}]")
        check(len(self.local_crop_sizes) > 0, "views.local_crop_sizes", "needs at least one size")
        for i, s in enumerate(self.local_crop_sizes):
            check_size(s, f"views.local_crop_sizes[{i}]")
        check(
            len(self.border) == 3 and min(self.border) >= 0,
            "views.border",
            f"must be three values >= 0, got {list(self.border)}",
        )
        check(0.0 <= self.min_iou < 1.0, "views.min_iou", f"must be in [0, 1), got {self.min_iou}")
        check(self.local_margin >= 0, "views.local_margin", f"must be >= 0, got {self.local_margin}")
        check(self.tissue_depth >= 2, "views.tissue_depth", f"must be >= 2, got {self.tissue_depth}")
        check(
            0.0 < self.tissue_max_fraction <= 1.0,
            "views.tissue_max_fraction",
            f"must be in (0, 1], got {self.tissue_max_fraction}",
        )
        check(self.max_tries >= 1, "views.max_tries", f"must be >= 1, got {self.max_tries}")
        check(0.0 <= self.flip_prob <= 1.0, "views.flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        check(
            all(a in (0, 1, 2) for a in self.flip_axes),
            "views.flip_axes",
            f"axes must be 0, 1 or 2, got {self.flip_axes}",
        )
        check(
            0.0 < self.scale_range[0] <= self.scale_range[1],
            "views.scale_range",
            f"must be [low, high] with 0 < low <= high, got {list(self.scale_range)}",
        )
        check(
            0.0 <= self.rotation_deg <= 180.0,
            "views.rotation_deg",
            f"must be in [0, 180], got {self.rotation_deg}",
        )
        for key in ("blur_sigma", "noise_std"):
            lo, hi = getattr(self, key)
            check(
                0.0 <= lo <= hi, f"views.{key}", f"must be [low, high] with 0 <= low <= high, got {[lo, hi]}"
            )
        check(
            self.gamma_log_range >= 0.0, "views.gamma_log_range", f"must be >= 0, got {self.gamma_log_range}"
        )
        check_size(self.swap_patch, "views.swap_patch")
        check(self.swap_count >= 0, "views.swap_count", f"must be >= 0, got {self.swap_count}")
        check(
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
    norm: Norm = "batch"
    """Normalisation in the U-Net: ``batch``, ``sync_batch`` (across ranks), ``group`` or ``instance``."""
    activation_checkpointing: bool = False
    """Recompute decoder stages in backward to save activation memory."""
    bn_stats: BnStats = "global"
    """Which forwards update the BatchNorm running statistics (what eval mode and the exported encoder use;
    no training step reads them): ``global`` (the global views only, so they describe global-size crops) or
    ``all`` (every forward, the local views' last: the reference's behaviour)."""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        check(self.base_channels >= 1, "model.base_channels", f"must be >= 1, got {self.base_channels}")
        check(2 <= self.depth <= 6, "model.depth", f"must be in [2, 6], got {self.depth}")
        if self.norm == "group":
            check(
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
            check(v >= 0.0, f"objective.weights.{f.name.rstrip('_')}", f"must be >= 0, got {v}")


@dataclass
class ObjectiveConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    """Per-term weights; these are what the sweeps tune."""
    restore_views: list[int] = field(default_factory=lambda: [1])
    """Global views that are restored: ``[1]`` = the reference, ``[1, 2]`` restores both."""
    beta_schedule: BetaSchedule = "cosine"
    """β over training: ``cosine`` (½(1+cos(π·step/total))) or ``constant`` (β = 1)."""

    def __post_init__(self) -> None:
        check_choices(self, "objective")
        check(
            len(self.restore_views) > 0
            and set(self.restore_views) <= {1, 2}
            and len(set(self.restore_views)) == len(self.restore_views),
            "objective.restore_views",
            f"must be [1], [2] or [1, 2], got {self.restore_views}",
        )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
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
        check_choices(self, "optim")
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(
            all(0.0 <= b < 1.0 for b in self.betas),
            "optim.betas",
            f"must be in [0, 1), got {list(self.betas)}",
        )
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(
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
        check(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        check(
            self.max_nonfinite_skips >= 0,
            "train.max_nonfinite_skips",
            f"must be >= 0, got {self.max_nonfinite_skips}",
        )
        check(
            self.micro_batch_size >= 2,
            "train.micro_batch_size",
            f"must be >= 2: the BatchNorm1d heads need two samples per device (got {self.micro_batch_size})",
        )
        check(
            self.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}"
        )
        check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        check(
            self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"
        )
        check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        check(
            self.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}"
        )


@dataclass
class EngineConfig:
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """``fp32``, ``bf16``, ``fp16`` (DeepSpeed loss scaling) or ``auto``: bf16 on a GPU or on a CPU with bf16
    instructions (AVX512-BF16/AMX), else fp32. The engine logs what it picked, and the run folder's
    ``config.yaml`` records it."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage, 0-2."""
    channels_last: bool = False
    """Use the channels-last 3D memory format (fast bf16 convolutions on CPUs with AMX)."""
    compile: bool = False
    """Compile the U-Net's forward with ``torch.compile`` (static shapes, inductor). Only the model: the
    objective and its random scale draws stay eager, so there is one graph per kind of forward (view 1, view
    2, the local views), compiled once at the first step (minutes on a few CPU cores, cached on disk by
    torch), never again. Logged as ``compile/graphs``."""
    deepspeed_overlay: str = ""
    """Optional JSON file of extra DeepSpeed keys; refused where it contradicts a pcrl setting."""
    dist_timeout_s: int = 600
    """Collective timeout in seconds, so a dead rank cannot hang the others forever."""

    def __post_init__(self) -> None:
        check_choices(self, "engine")
        check(self.dist_timeout_s >= 1, "engine.dist_timeout_s", f"must be >= 1, got {self.dist_timeout_s}")


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
    image_split: Split = "val"
    """Split the panel's volumes come from (``train``, ``val``, ``test`` or ``all``); when it holds none, the
    first volumes of ``data.split`` are shown instead."""

    def __post_init__(self) -> None:
        check_choices(self, "tracking")
        check(bool(self.experiment), "tracking.experiment", "must not be empty")
        check(self.retry_s > 0, "tracking.retry_s", f"must be > 0, got {self.retry_s}")
        check(self.image_every >= 0, "tracking.image_every", f"must be >= 0, got {self.image_every}")
        check(
            2 <= self.image_volumes <= 8,
            "tracking.image_volumes",
            "must be in [2, 8] (BatchNorm needs two samples; more do not fit a picture), "
            f"got {self.image_volumes}",
        )


@dataclass
class EvalConfig:
    """Periodic validation on held-out volumes (``pcrl/evaluate.py``): the number a sweep optimises."""

    every: int = 1000
    """Evaluate every N steps and at the last step (0 = never)."""
    split: Split = "val"
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
        check_choices(self, "eval")
        check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        check(self.volumes >= 1, "eval.volumes", f"must be >= 1, got {self.volumes}")
        check(
            self.pairs_per_volume >= 1, "eval.pairs_per_volume", f"must be >= 1, got {self.pairs_per_volume}"
        )
        check(
            self.batch_size >= 2,
            "eval.batch_size",
            f"must be >= 2: BatchNorm runs on batch statistics (got {self.batch_size})",
        )
        check(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")
        check(bool(self.metric), "eval.metric", "must name a metric, e.g. val/psnr")


@dataclass
class ProbeConfig:
    """The online linear probe (``pcrl/probe.py``), run with the evaluation every ``eval.every`` steps."""

    cases: str = ""
    """Folder of labelled cases made by ``python -m data_prep.labelled`` (empty = no probe)."""
    task: Literal["auto", "aal", "lesion"] = "auto"
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
        check_choices(self, "probe")
        check_size(self.patch_size, "probe.patch_size")
        check(self.per_class >= 2, "probe.per_class", f"must be >= 2, got {self.per_class}")
        check(self.regularization > 0, "probe.regularization", f"must be > 0, got {self.regularization}")
        check(self.seed >= 0, "probe.seed", f"must be >= 0, got {self.seed}")
        check(
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
        check(
            not (self.engine.channels_last and self.engine.zero_stage > 0),
            "engine.channels_last",
            "needs engine.zero_stage=0 (ZeRO flattens parameters into dense buffers); turn one of them off",
        )
        check(
            not (self.engine.compile and self.model.activation_checkpointing),
            "engine.compile",
            "cannot compile activation checkpointing (torch.compile refuses its BatchNorm-preserving context); "
            "turn model.activation_checkpointing or engine.compile off",
        )
        factor = 2 ** (self.model.depth - 1)
        for key, size in (
            ("views.global_size", self.views.global_size),
            ("views.local_size", self.views.local_size),
        ):
            check(
                all(s % factor == 0 for s in size),
                key,
                f"{list(size)} must be divisible by {factor} (2^(model.depth-1)) so the U-Net can pool it",
            )

    @property
    def run_dir(self) -> Path:
        """The run folder, ``<run.output_dir>/<run.name>``."""
        return Path(self.run.output_dir) / self.run.name


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load a config: dataclass defaults, then the YAML diff at ``path``, then ``key.sub=value`` overrides.

    Raises:
        ConfigError: a key is unknown, a value has the wrong type or is invalid (names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    return load_schema(PretrainConfig, path, overrides)


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Rebuild a config from :func:`config_to_dict` output (checkpoints, MLflow), with the same checks."""
    return schema_from_dict(PretrainConfig, data)
