"""Encoder export: a verified DeepSpeed checkpoint → ``encoder.safetensors`` + ``encoder.json`` + ``MODEL_CARD.md``.

The exported pair is everything a downstream user needs and nothing that can execute code on load:

* ``encoder.safetensors``: the ``encoder.*`` tensors of the pretrained U-Net (parameters and BatchNorm
  buffers) as float32, keys exactly those of :class:`pcrl.model.PCRLv2Encoder`;
* ``encoder.json``: the architecture (widths, depth, norm), the preprocessing the encoder was trained on
  (input spacing, intensity window, axis order, per-crop z-normalisation), the training step, the config hash
  and the sha256 of the weights file, so a weights file paired with another export's JSON is refused; and
  ``provenance``, the run's ``data_provenance.json`` (:mod:`pcrl.provenance`: data sources, licences, volume
  counts per modality, spacing, window), ``"status": "unknown"`` for a run that recorded none;
* ``MODEL_CARD.md``: the same facts for a reader, with the run's evaluation results and what to check before
  using the weights (:mod:`pcrl.model_card`).

The checkpoint is read with ``torch.load(weights_only=True)`` (its client state holds plain data only, see
:mod:`pcrl.checkpoint`) and the export is read with ``safetensors`` and ``json``: no pickle anywhere.

Example::

    paths = export_encoder(Path("runs/tiny"))          # the latest verified checkpoint
    encoder = load_encoder("runs/tiny")                # PCRLv2Encoder, weights loaded, shapes checked
    features = encoder(x)                              # x: (B, 1, X, Y, Z) → list of (B, C_d, X/2^d, ...)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pcrl.checkpoint import (
    checkpoint_dir,
    checkpoint_step,
    checkpoint_tag,
    find_resume_tag,
    verify_checkpoint,
)
from pcrl.config import PretrainConfig, config_hash, load_config
from pcrl.io import atomic_path, file_sha256
from pcrl.model import PCRLv2Encoder
from pcrl.model_card import MODEL_CARD, evaluation_results, render_model_card
from pcrl.provenance import read_data_provenance

__all__ = [
    "ENCODER_FORMAT",
    "ENCODER_META",
    "ENCODER_WEIGHTS",
    "EncoderLoadError",
    "export_encoder",
    "load_encoder",
    "load_encoder_state",
    "read_encoder_meta",
]

logger = logging.getLogger(__name__)

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"
ENCODER_FORMAT = "pcrl-encoder/1"
# DeepSpeed's model-states file of model-parallel rank 0 holds the whole module for ZeRO stages 0-2.
_MODEL_STATES = "mp_rank_00_model_states.pt"
# PCRLv2Task wraps the U-Net as ``model``; its encoder stages are ``model.encoder.*``.
_PREFIX = "model."


class EncoderLoadError(ValueError):
    """An exported encoder does not fit the module it is loaded into, or its files do not belong together.
    The message lists every missing, unexpected and mis-shaped tensor."""


def _export_tag(run_dir: Path, step: int | None) -> str:
    """The verified tag of checkpoint ``step``, or the one a resume would take when ``step`` is None."""
    ckpt_dir = checkpoint_dir(run_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if checkpoint_step(p.name) is not None)
    if step is None:
        tag = find_resume_tag(run_dir)  # verified; falls back to the previous good tag with a warning
        if tag is None:
            raise FileNotFoundError(
                f"{ckpt_dir}: no checkpoint (no 'latest' pointer); a run writes one at its end and every "
                "train.checkpoint_every steps"
            )
        return tag
    tag = checkpoint_tag(step)
    problem = verify_checkpoint(ckpt_dir / tag)
    if problem is not None:
        steps = ", ".join(str(checkpoint_step(t)) for t in tags) or "none"
        raise FileNotFoundError(
            f"{ckpt_dir / tag}: cannot export step {step}: {problem}. Steps with a checkpoint: {steps}"
        )
    return tag


def _encoder_tensors(tag_dir: Path) -> tuple[dict[str, Tensor], str]:
    """The ``encoder.*`` tensors of a checkpoint as float32, and the dtype they were trained in."""
    path = tag_dir / _MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {tag_dir} a pcrl checkpoint?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError names the refused global; keep its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read without unpickling objects ({first})") from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ValueError(f"{path}: no 'module' state dict in it; is {tag_dir} a pcrl checkpoint?")
    prefix = _PREFIX + "encoder."
    tensors = {k.removeprefix(_PREFIX): v for k, v in module.items() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{path}: the module has no '{prefix}*' tensors; it is not a PCRLv2 U-Net")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()}
    # bf16/fp16 runs keep the module in half precision (the fp32 master copy lives in the optimizer state).
    out = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return out, "/".join(sorted(dtypes))


def _input_spacing(cfg: PretrainConfig) -> list[float] | None:
    """The voxel spacing of the pretraining shards (one value per axis), or None when unknown/mixed."""
    from pcrl.shards import read_manifest

    try:
        spacings = {tuple(r.spacing) for r in read_manifest(cfg.data.shards, "all")}
    except (FileNotFoundError, ValueError, OSError):
        return None
    return list(spacings.pop()) if len(spacings) == 1 else None


def _metadata(
    cfg: PretrainConfig, step: int, trained_dtype: str, tensors_sha: str, provenance: dict[str, Any]
) -> dict[str, Any]:
    encoder = PCRLv2Encoder(1, cfg.model.base_channels, cfg.model.depth, "batch")
    view = cfg.views.global_size
    crops = cfg.views.global_crop_sizes
    # A view is a crop box resampled to the view size: its voxels are box/view times the shard spacing.
    scale = (
        [min(c[i] for c in crops) / view[i] for i in range(3)],
        [max(c[i] for c in crops) / view[i] for i in range(3)],
    )
    return {
        "format": ENCODER_FORMAT,
        "architecture": {
            "name": "PCRLv2Encoder",
            "in_channels": 1,
            "base_channels": cfg.model.base_channels,
            "depth": cfg.model.depth,
            # sync_batch is BatchNorm3d on one device; downstream code gets the plain layer.
            "norm": "batch" if cfg.model.norm == "sync_batch" else cfg.model.norm,
            "stage_channels": list(encoder.stage_channels),
            "input_multiple": 2 ** (cfg.model.depth - 1),
        },
        "preprocessing": {
            "axis_order": "RAS+ canonical; arrays (x, y, z); tensors (B, C, X, Y, Z)",
            "input_spacing_mm": _input_spacing(cfg),
            "view_voxel_scale": scale,
            "view_size": list(view),
            "ct_window_hu": list(cfg.data.ct_window),
            "ct": "HU clipped to ct_window_hu, mapped linearly to [0, 1]",
            "mr": "per volume: percentiles 0.5/99.5 mapped to [0, 1], clipped",
            "normalisation": "z-score over each input crop (mean 0, std 1), after the [0, 1] mapping",
        },
        "training": {
            "step": step,
            "max_steps": cfg.train.max_steps,
            "run_name": cfg.run.name,
            "config_hash": config_hash(cfg),
            "trained_dtype": trained_dtype,
            "batchnorm_running_stats": (
                "tracked over the global views' forwards only (global-size crops of whole volumes)"
                if cfg.model.bn_stats == "global"
                else "updated by every forward of a step, the last one the local sub-crops: fine-tune in train "
                "mode, or re-estimate them on your data before using eval mode"
            ),
        },
        "weights": {"file": ENCODER_WEIGHTS, "sha256": tensors_sha, "dtype": "float32"},
        "provenance": provenance,
    }


def export_encoder(run_dir: Path, step: int | None = None, output: Path | None = None) -> tuple[Path, Path]:
    """Write ``encoder.safetensors``, ``encoder.json`` and ``MODEL_CARD.md`` from a run's checkpoint.

    Args:
        run_dir: the run folder (with ``checkpoints/``).
        step: the checkpoint's step; None = the latest verified one (``checkpoints/latest``, or the newest
            older checkpoint that passes its manifest check).
        output: folder to write into (default ``run_dir``). The files are written under temporary names
            and renamed, the JSON last.

    Returns:
        The paths of the weights and the JSON (the card is ``MODEL_CARD.md`` beside them).

    Raises:
        FileNotFoundError: no (usable) checkpoint, or no checkpoint at ``step``.
        ValueError: the checkpoint cannot be read without pickle, or holds no PCRLv2 encoder; the run's
            ``data_provenance.json`` is damaged.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    tag = _export_tag(run_dir, step)
    tag_dir = checkpoint_dir(run_dir) / tag
    cfg = load_config(tag_dir / "config.yaml")
    tensors, trained_dtype = _encoder_tensors(tag_dir)
    provenance = read_data_provenance(run_dir, cfg)
    step = checkpoint_step(tag) or 0
    evaluation = evaluation_results(run_dir, step)
    output = Path(output) if output is not None else run_dir
    output.mkdir(parents=True, exist_ok=True)
    weights, meta_path = output / ENCODER_WEIGHTS, output / ENCODER_META
    # Renamed in reverse order when the block ends: weights, card, then the metadata (which holds the weights'
    # digest) last.
    with (
        atomic_path(meta_path) as tmp_meta,
        atomic_path(output / MODEL_CARD) as tmp_card,
        atomic_path(weights) as tmp_weights,
    ):
        save_file(tensors, str(tmp_weights), metadata={"format": ENCODER_FORMAT})
        meta = _metadata(cfg, step, trained_dtype, file_sha256(tmp_weights), provenance)
        tmp_card.write_text(render_model_card(meta, evaluation))
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    if provenance["status"] != "recorded":
        logger.warning("%s: data provenance unknown (%s); the export says so", run_dir, provenance["note"])
    logger.info("exported the encoder of %s (step %s) to %s", run_dir, checkpoint_step(tag), output)
    return weights, meta_path


def _export_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / ENCODER_WEIGHTS, p / ENCODER_META
    if p.name.endswith(".safetensors"):
        return p, p.with_name(p.name.removesuffix(".safetensors") + ".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p, p  # reported as missing below


def read_encoder_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``encoder.json`` of an export (``path``: the export folder, the ``.safetensors`` or the ``.json``).

    Raises:
        FileNotFoundError: no export there.
        EncoderLoadError: the JSON is not a pcrl encoder description.
    """
    weights, meta_path = _export_paths(path)
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path}: no exported encoder ({ENCODER_WEIGHTS} + {ENCODER_META}); make one with "
            "python launch/export.py RUN_DIR"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise EncoderLoadError(f"{meta_path}: not valid JSON ({e}); export again") from None
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EncoderLoadError(f"{meta_path}: format {found!r}, expected {ENCODER_FORMAT!r}")
    return meta


def load_encoder_state(module: nn.Module, tensors: dict[str, Tensor], source: str = "the export") -> None:
    """Load exported ``tensors`` into ``module`` after checking names and shapes, all of them at once.

    Args:
        module: a :class:`pcrl.model.PCRLv2Encoder` (or any module with the same state-dict keys).
        tensors: name → tensor, e.g. from ``safetensors.torch.load_file``.
        source: what to call the tensors' origin in the error.

    Raises:
        EncoderLoadError: keys missing from ``tensors``, keys ``module`` lacks, or shapes that differ; the
            message lists each with both shapes.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: {source} has {tuple(tensors[k].shape)}, the model expects {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es):")
            lines += [f"    {m}" for m in mismatched]
        if missing:
            lines.append(
                f"  {len(missing)} tensor(s) the model needs but {source} lacks: {', '.join(missing)}"
            )
        if unexpected:
            lines.append(
                f"  {len(unexpected)} tensor(s) in {source} the model has no place for: {', '.join(unexpected)}"
            )
        lines.append("  build the model with the architecture in encoder.json (or use pcrl.load_encoder)")
        raise EncoderLoadError("\n".join(lines))
    module.load_state_dict(tensors, strict=True)


def load_encoder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> PCRLv2Encoder:
    """Build the exported encoder and load its weights (safetensors + JSON; no pickle).

    Args:
        path: the export folder (e.g. the run folder), its ``encoder.safetensors`` or its ``encoder.json``.
        device: where to put the module.

    Returns:
        A :class:`pcrl.model.PCRLv2Encoder` in eval mode: ``encoder(x)`` maps (B, 1, X, Y, Z), sizes divisible
        by ``encoder.json``'s ``input_multiple``, to one feature map per stage, finest first. Preprocess
        inputs as ``encoder.json``'s ``preprocessing`` says.

    Raises:
        FileNotFoundError: no export at ``path``.
        EncoderLoadError: the weights do not match the JSON (sha256 or tensor shapes).
    """
    from safetensors.torch import load_file

    meta = read_encoder_meta(path)
    weights, meta_path = _export_paths(path)
    expected_sha = meta.get("weights", {}).get("sha256")
    if expected_sha and file_sha256(weights) != expected_sha:
        raise EncoderLoadError(
            f"{weights} does not match {meta_path} (sha256 differs): the two files come from different "
            "exports or one was modified; export again with python launch/export.py RUN_DIR"
        )
    arch = meta["architecture"]
    encoder = PCRLv2Encoder(
        in_channels=int(arch["in_channels"]),
        base_channels=int(arch["base_channels"]),
        depth=int(arch["depth"]),
        norm=arch["norm"],
    )
    load_encoder_state(encoder, load_file(str(weights)), source=str(weights))
    return encoder.to(device).eval()
