"""Fine-tuning on labelled tasks, pretrained against scratch, leave-one-case-out, several seeds.

Two tasks on the labelled cases of :mod:`pcrl.tasks` (real lesion masks):

* ``segmentation``: the project's U-Net with its skip connections restored (:class:`SegmentationUNet`: the
  pretrained :class:`pcrl.model.PCRLv2Encoder`, then per stage ConvTranspose ×2, concatenation with the
  encoder stage of that size, two LUConvs), Dice + cross-entropy, scored by Dice of sliding-window inference
  over the held-out case's lesion region;
* ``classification``: lesion versus background patches (:class:`PatchClassifier`: the encoder, global
  average pooling of every stage, one linear layer), scored by AUC and accuracy on the held-out case; with
  ``task.dataset=aal``, Colin27 patches classified into their AAL lobe (6 classes, one-vs-rest macro AUC),
  the two hemispheres as the two cases (trained on one, scored on the other; :func:`pcrl.tasks.aal_patches`).

For every seed, label fraction and held-out case, a model is trained on the patches of the other cases
(the fraction of them, drawn with the seed) and scored on the held-out one. ``encoder=PATH`` starts from an
export; ``encoder=none`` from a random initialisation; with ``scratch_baseline=true`` (default) a run with an
encoder also trains the scratch model with everything else identical (same architecture, window, patches,
seeds, steps, and the same initialisation of everything but the encoder). Results (mean ± std over seeds)
go to ``results.json``, ``results.md`` and MLflow.

Example::

    cfg = load_finetune_config("configs/finetune/lesion_classification.yaml", ["encoder=runs/tiny"])
    results = finetune(cfg)      # {"rows": [...], "gains": [...]} also in <run_dir>/results.json
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcrl.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    check,
    check_choices,
    check_size,
    config_hash,
    config_to_dict,
    flatten_config,
    load_schema,
)
from pcrl.io import write_atomic
from pcrl.model import LUConv, PCRLv2Encoder
from pcrl.probe import class_accuracy, class_auc
from pcrl.tasks import (
    LabelledCase,
    Patches,
    aal_patches,
    lesion_patches,
    lesion_roi,
    normalise_patches,
    read_aal,
    read_cases,
)

__all__ = [
    "FinetuneConfig",
    "PatchClassifier",
    "SegmentationUNet",
    "dice_ce_loss",
    "finetune",
    "load_finetune_config",
    "sliding_window",
]

logger = logging.getLogger(__name__)


@dataclass
class TaskConfig:
    kind: Literal["segmentation", "classification"] = "classification"
    """``classification`` (patch labels, AUC) or ``segmentation`` (lesion masks, Dice)."""
    dataset: Literal["lesion", "aal"] = "lesion"
    """``lesion`` (the pyradiomics cases: lesion vs background, leave-one-case-out; they are the demo's
    pretraining volumes) or ``aal`` (Colin27 patches → AAL lobe, hemisphere against hemisphere; not in the
    pretraining data; classification only)."""
    cases: str = ".cache/labelled"
    """Folder made by ``python -m data_prep.labelled`` (``--task aal`` adds the Colin27 data)."""
    names: list[str] = field(default_factory=list)
    """Lesion cases to use, at least two; each is held out once (empty = all cases in the folder)."""
    patch_size: tuple[int, int, int] = (32, 32, 16)
    """Patch size (x, y, z) in voxels; divisible by 2^(depth-1) of the encoder."""
    per_class: int = 16
    """Patches per class and case: lesion and background patches per case, or per lobe and hemisphere."""
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    """CT window in HU for ``encoder=none``; with an encoder, the window in its encoder.json is used."""
    overlap: float = 0.5
    """Overlap of neighbouring windows in sliding-window inference (segmentation)."""

    def __post_init__(self) -> None:
        check_choices(self, "task")
        check(
            self.dataset == "lesion" or self.kind == "classification",
            "task.kind",
            "task.dataset=aal has patch labels only: use task.kind=classification",
        )
        check(
            self.dataset == "lesion" or not self.names,
            "task.names",
            "selects lesion cases; task.dataset=aal has none (use [])",
        )
        check(bool(self.cases), "task.cases", "must name the folder of labelled cases")
        check(len(self.names) != 1, "task.names", "needs at least two cases (leave-one-case-out), or []")
        check_size(self.patch_size, "task.patch_size")
        check(self.per_class >= 1, "task.per_class", f"must be >= 1, got {self.per_class}")
        check(0.0 <= self.overlap < 1.0, "task.overlap", f"must be in [0, 1), got {self.overlap}")


@dataclass
class FinetuneTrainConfig:
    steps: int = 150
    """Optimizer steps per model (one model per seed, label fraction and held-out case)."""
    batch_size: int = 8
    """Patches per step (>= 2: BatchNorm)."""
    lr: float = 1e-3
    """AdamW learning rate, the same for encoder and head."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Fractions of the training patches used (drawn per seed, per class)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; results are mean ± std over them."""
    freeze_encoder: bool = False
    """Train the head (and decoder) only."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 2, "train.batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(
            len(self.label_fractions) > 0 and all(0 < f <= 1 for f in self.label_fractions),
            "train.label_fractions",
            f"must be fractions in (0, 1], got {self.label_fractions}",
        )
        check(len(self.seeds) > 0, "train.seeds", "needs at least one seed")


@dataclass
class FinetuneTrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = a sqlite store ``mlflow.db`` inside the run folder."""
    experiment: str = "pcrl-finetune"
    """MLflow experiment name."""
    enabled: bool = True
    """Log to MLflow (``results.json`` and ``metrics.jsonl`` are always written)."""


@dataclass
class FinetuneConfig:
    encoder: str = "none"
    """An export (folder, ``encoder.safetensors`` or ``encoder.json``) or ``none`` to train from scratch."""
    scratch_baseline: bool = True
    """With an encoder, also train from scratch with everything else identical and report the gain."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="finetune"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_channels=8))
    """Architecture for ``encoder=none``; with an encoder, its encoder.json's architecture is used."""
    task: TaskConfig = field(default_factory=TaskConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    tracking: FinetuneTrackingConfig = field(default_factory=FinetuneTrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def load_finetune_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Defaults, then the YAML diff at ``path``, then ``key=value`` overrides (``encoder=PATH`` ...).

    Raises:
        ConfigError: unknown key or bad value (names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    return load_schema(FinetuneConfig, path, overrides)


# --- models -----------------------------------------------------------------------------------------


class SegmentationUNet(nn.Module):
    """The U-Net with skip connections: encoder stages, then per stage (coarsest first)
    ``ConvTranspose3d(C, C, 2, s2) → cat(skip of C/2 channels) → LUConv(3C/2, C/2) → LUConv(C/2, C/2)``, then
    ``Conv3d(2·base, num_classes, 1)``.

    Args:
        encoder: the (pretrained or fresh) encoder; its norm is used in the decoder.
        num_classes: output classes (2: background, lesion).

    Shapes:
        (B, 1, X, Y, Z) -> logits (B, num_classes, X, Y, Z).
    """

    def __init__(self, encoder: PCRLv2Encoder, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        chans = encoder.stage_channels
        norm = encoder.norm
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(chans[d + 1], chans[d + 1], 2, stride=2)
            for d in reversed(range(len(chans) - 1))
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(LUConv(chans[d + 1] + chans[d], chans[d], norm), LUConv(chans[d], chans[d], norm))
            for d in reversed(range(len(chans) - 1))
        )
        self.head = nn.Conv3d(chans[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips[:-1]), strict=True):
            h = block(torch.cat([up(h), skip], dim=1))
        return self.head(h)


class PatchClassifier(nn.Module):
    """Encoder, global average pooling of every stage (concatenated), one linear layer.

    Shapes:
        (B, 1, X, Y, Z) -> logits (B, num_classes).
    """

    def __init__(self, encoder: PCRLv2Encoder, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(sum(encoder.stage_channels), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([f.mean(dim=(2, 3, 4)) for f in self.encoder(x)], dim=1))


def dice_ce_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Cross-entropy plus soft Dice loss of the foreground classes.

    Args:
        logits: (B, K, X, Y, Z).
        target: (B, X, Y, Z) class indices.

    Returns:
        Scalar ``CE + (1 - mean Dice over classes 1..K-1)``; Dice pools the batch, so patches without lesion
        do not make it undefined.
    """
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3, 4))
    denom = probs.sum(dim=(0, 2, 3, 4)) + onehot.sum(dim=(0, 2, 3, 4))
    return ce + (1.0 - ((2 * inter + eps) / (denom + eps)).mean())


def _starts(n: int, size: int, step: int) -> list[int]:
    starts = list(range(0, max(n - size, 0) + 1, step))
    if starts[-1] != n - size:
        starts.append(n - size)  # the last window ends at the border
    return starts


@torch.no_grad()
def sliding_window(
    model: nn.Module, image: Tensor, size: Sequence[int], overlap: float, batch: int = 8
) -> Tensor:
    """Class probabilities of a whole region by overlapping windows, averaged where they overlap.

    Each window is z-normalised on its own, as training patches are.

    Args:
        model: maps (B, 1, *size) to logits (B, K, *size).
        image: (X, Y, Z) in [0, 1], each side at least ``size``.
        size: window (x, y, z).
        overlap: fraction of a window shared with its neighbour, in [0, 1).

    Returns:
        (K, X, Y, Z) probabilities.
    """
    steps = [max(1, round(s * (1 - overlap))) for s in size]
    grid = [_starts(n, s, st) for n, s, st in zip(image.shape, size, steps, strict=True)]
    corners = [(a, b, c) for a in grid[0] for b in grid[1] for c in grid[2]]
    total: Tensor | None = None
    counts = torch.zeros(image.shape)
    for i in range(0, len(corners), batch):
        chunk = corners[i : i + batch]
        crops = [tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True)) for corner in chunk]
        x = normalise_patches(torch.stack([image[c] for c in crops])[:, None])
        probs = model(x).float().softmax(1)
        if total is None:
            total = torch.zeros(probs.shape[1], *image.shape)
        for p, c in zip(probs, crops, strict=True):
            total[(slice(None), *c)] += p
            counts[c] += 1
    assert total is not None
    return total / counts


# --- the protocol -----------------------------------------------------------------------------------


@dataclass
class _Encoder:
    """What the runs of one encoder share: a name, how to build it, its preprocessing."""

    name: str
    arch: dict[str, Any]
    weights: dict[str, Tensor] | None
    ct_window: tuple[float, float]


def _encoders(cfg: FinetuneConfig) -> list[_Encoder]:
    from pcrl.export import read_encoder_meta

    if cfg.encoder.lower() in ("none", ""):
        arch = {"in_channels": 1, "base_channels": cfg.model.base_channels, "depth": cfg.model.depth}
        arch["norm"] = "batch" if cfg.model.norm == "sync_batch" else cfg.model.norm
        return [_Encoder("scratch", arch, None, tuple(cfg.task.ct_window))]
    from pcrl.export import load_encoder

    try:
        meta = read_encoder_meta(cfg.encoder)
        loaded = load_encoder(cfg.encoder)  # checks the sha256 and every shape
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"encoder={cfg.encoder}: {e}") from None
    arch = {k: meta["architecture"][k] for k in ("in_channels", "base_channels", "depth", "norm")}
    window = tuple(float(v) for v in meta["preprocessing"]["ct_window_hu"])
    out = [_Encoder("pretrained", arch, loaded.state_dict(), window)]
    if cfg.scratch_baseline:
        out.append(_Encoder("scratch", arch, None, window))
    return out


def _build(cfg: FinetuneConfig, enc: _Encoder, seed: int, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)  # the same initial decoder/head for pretrained and scratch
    encoder = PCRLv2Encoder(**enc.arch)
    if cfg.task.kind == "segmentation":
        model: nn.Module = SegmentationUNet(encoder)
    else:
        model = PatchClassifier(encoder, num_classes)
    if enc.weights is not None:
        from pcrl.export import load_encoder_state

        load_encoder_state(model.encoder, enc.weights, source=cfg.encoder)
    return model


def _fraction(train: Patches, fraction: float, seed: int) -> Patches:
    """``fraction`` of each class, drawn with ``seed`` (at least one patch per class)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for cls in torch.unique(train.labels).tolist():
        idx = torch.nonzero(train.labels == cls).flatten()
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return train.subset(torch.cat(keep))


def _train(cfg: FinetuneConfig, model: nn.Module, data: Patches, seed: int) -> float:
    tc = cfg.train
    params = [p for n, p in model.named_parameters() if not (tc.freeze_encoder and n.startswith("encoder."))]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    batch = min(tc.batch_size, len(data))
    loss = torch.tensor(float("nan"))
    for _ in range(tc.steps):
        idx = torch.randperm(len(data), generator=g)[: max(2, batch)]
        x = data.images[idx]
        flip = torch.rand(3, generator=g) < 0.5  # random flips: the only augmentation, cheap and label-safe
        dims = [d + 2 for d in range(3) if flip[d]]
        x = x.flip(dims) if dims else x
        if cfg.task.kind == "segmentation":
            y = data.masks[idx][:, 0]
            y = y.flip([d - 1 for d in dims]) if dims else y
            loss = dice_ce_loss(model(x), y)
        else:
            loss = F.cross_entropy(model(x), data.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    last = loss.item()
    if not math.isfinite(last):
        raise RuntimeError(f"the fine-tuning loss became non-finite ({last}); lower train.lr")
    return last


def _dice(pred: Tensor, target: Tensor) -> float:
    inter = float((pred & target).sum())
    denom = float(pred.sum() + target.sum())
    return 1.0 if denom == 0 else 2 * inter / denom


def _score_segmentation(cfg: FinetuneConfig, model: nn.Module, case: LabelledCase) -> float:
    size = cfg.task.patch_size
    roi = lesion_roi(case, size)
    image, label = case.image[roi], case.label[roi]
    pad = [max(0, s - n) for s, n in zip(size, image.shape, strict=True)]
    if any(pad):  # a region thinner than a window (a small crop such as breast1): pad, score the real voxels
        spec = [v for p in reversed(pad) for v in (0, p)]
        padded = F.pad(image[None, None], spec, mode="replicate")[0, 0]
        probs = sliding_window(model.eval(), padded, size, cfg.task.overlap)
        probs = probs[:, : image.shape[0], : image.shape[1], : image.shape[2]]
    else:
        probs = sliding_window(model.eval(), image, size, cfg.task.overlap)
    return _dice(probs.argmax(0) == 1, label)


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch: int = 16) -> Tensor:
    """(N, K) class probabilities."""
    model.eval()
    return torch.cat([model(images[s : s + batch]).softmax(1) for s in range(0, len(images), batch)])


def _summary(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "per_seed": values}


def _markdown(results: dict[str, Any]) -> str:
    metric = results["metric"]
    lines = [
        f"# Fine-tuning: {results['task']} ({results['cases']}), leave-one-"
        f"{'hemisphere' if results.get('dataset') == 'aal' else 'case'}-out",
        "",
        f"{len(results['seeds'])} seeds, {results['steps']} steps per model; mean ± std over seeds.",
        "",
        f"| encoder | label fraction | {metric} | accuracy |"
        if metric == "auc"
        else f"| encoder | label fraction | {metric} |",
        "|---|---|---|---|" if metric == "auc" else "|---|---|---|",
    ]
    for row in results["rows"]:
        cell = f"{row[metric]['mean']:.3f} ± {row[metric]['std']:.3f}"
        extra = f" {row['accuracy']['mean']:.3f} ± {row['accuracy']['std']:.3f} |" if metric == "auc" else ""
        lines.append(f"| {row['encoder']} | {row['label_fraction']:g} | {cell} |{extra}")
    if results["gains"]:
        lines += ["", "| label fraction | gain of pretraining (pretrained − scratch) |", "|---|---|"]
        for g in results["gains"]:
            lines.append(
                f"| {g['label_fraction']:g} | {g['gain']:+.3f} ± {g['std']:.3f} (paired over seeds) |"
            )
    return "\n".join(lines) + "\n"


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the whole protocol of ``cfg`` and write ``results.json`` / ``results.md`` in ``cfg.run_dir``.

    Returns:
        The results: ``rows`` (encoder, label fraction, metric mean/std/per seed) and ``gains`` (pretrained −
        scratch per label fraction, paired by seed) when both were trained.

    Raises:
        ConfigError: unreadable encoder or cases, or a patch size the encoder cannot pool (names the key).
    """
    from tqdm import tqdm

    from pcrl.tracking import Tracker

    encoders = _encoders(cfg)
    factor = 2 ** (int(encoders[0].arch["depth"]) - 1)
    if any(s % factor for s in cfg.task.patch_size):
        raise ConfigError(
            f"task.patch_size: {list(cfg.task.patch_size)} must be divisible by {factor} (2^(depth-1))"
        )
    window = encoders[0].ct_window
    tc = cfg.train
    cases: list[LabelledCase] = []
    try:
        if cfg.task.dataset == "aal":
            atlas = read_aal(cfg.task.cases)
            case_names = ["left", "right"]  # hemispheres: aal_patches' cases 0 and 1
            patches = {s: aal_patches(atlas, cfg.task.patch_size, cfg.task.per_class, s) for s in tc.seeds}
        else:
            cases = read_cases(cfg.task.cases, window, cfg.task.names)
            case_names = [c.name for c in cases]
            size, per_class = cfg.task.patch_size, cfg.task.per_class
            patches = {
                s: Patches.cat([lesion_patches(c, size, per_class, s, i) for i, c in enumerate(cases)])
                for s in tc.seeds
            }
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"task.cases={cfg.task.cases} (task.dataset={cfg.task.dataset}): {e}") from None
    if len(case_names) < 2:
        raise ConfigError(
            f"task.cases={cfg.task.cases}: leave-one-case-out needs two cases, got {len(case_names)}"
        )
    num_classes = max(2, int(max(int(p.labels.max()) for p in patches.values())) + 1)
    metric = "dice" if cfg.task.kind == "segmentation" else "auc"
    runs = len(encoders) * len(tc.label_fractions) * len(tc.seeds) * len(case_names)
    bar = tqdm(total=runs, unit="model", desc=f"fine-tuning ({cfg.task.kind})", dynamic_ncols=True)
    scores: dict[tuple[str, float], dict[str, list[float]]] = {}
    try:
        for enc in encoders:
            for fraction in tc.label_fractions:
                per_seed: dict[str, list[float]] = {metric: [], "accuracy": []}
                for seed in tc.seeds:
                    data = patches[seed]
                    fold_scores, labels, probs = [], [], []
                    for held in range(len(case_names)):
                        train = _fraction(data.subset(data.cases != held), fraction, seed)
                        model = _build(cfg, enc, seed, num_classes)
                        _train(cfg, model, train, seed)
                        if cfg.task.kind == "segmentation":
                            fold_scores.append(_score_segmentation(cfg, model, cases[held]))
                        else:
                            test = data.subset(data.cases == held)
                            labels.append(test.labels.numpy())
                            probs.append(_predict(model, test.images).numpy())
                        bar.update(1)
                    if cfg.task.kind == "segmentation":
                        per_seed[metric].append(float(np.mean(fold_scores)))
                    else:
                        y, p = np.concatenate(labels), np.concatenate(probs)
                        per_seed[metric].append(class_auc(y, p))
                        per_seed["accuracy"].append(class_accuracy(y, p))
                scores[(enc.name, fraction)] = per_seed
    finally:
        bar.close()

    rows = []
    for (name, fraction), values in scores.items():
        row: dict[str, Any] = {"encoder": name, "label_fraction": fraction, metric: _summary(values[metric])}
        if values["accuracy"]:
            row["accuracy"] = _summary(values["accuracy"])
        rows.append(row)
    gains = []
    names = {e.name for e in encoders}
    if {"pretrained", "scratch"} <= names:
        for fraction in tc.label_fractions:
            diff = np.subtract(
                scores[("pretrained", fraction)][metric], scores[("scratch", fraction)][metric]
            )
            gains.append(
                {
                    "label_fraction": fraction,
                    "gain": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                }
            )
    results = {
        "task": cfg.task.kind,
        "dataset": cfg.task.dataset,
        "metric": metric,
        "cases": ", ".join(case_names),
        "classes": num_classes,
        "encoder": cfg.encoder,
        "architecture": encoders[0].arch,
        "ct_window": list(window),
        "seeds": list(tc.seeds),
        "steps": tc.steps,
        "config_hash": config_hash(cfg),
        "rows": rows,
        "gains": gains,
    }
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(run_dir / "results.md", _markdown(results))
    write_atomic(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")

    tracker = Tracker(run_dir, cfg.tracking.uri, cfg.tracking.experiment, enabled=cfg.tracking.enabled)
    tracker.start(cfg.run.name, flatten_config(cfg))
    flat: dict[str, float] = {}
    for row in rows:
        for key in (metric, "accuracy"):
            if key in row:
                prefix = f"{row['encoder']}/{key}/frac_{row['label_fraction']:g}"
                flat[f"{prefix}/mean"], flat[f"{prefix}/std"] = row[key]["mean"], row[key]["std"]
    for g in gains:
        flat[f"gain/{metric}/frac_{g['label_fraction']:g}"] = g["gain"]
    tracker.log_metrics(flat, tc.steps)
    for name in ("results.json", "results.md"):
        tracker.log_artifact(run_dir / name)
    tracker.finish("FINISHED")
    return results
