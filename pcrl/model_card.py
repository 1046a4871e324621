"""``MODEL_CARD.md``: what an exported encoder is, what it was trained on, and what to check before using it.

The export (:func:`pcrl.export.export_encoder`) writes the card beside ``encoder.safetensors``, rendered from
the facts of ``encoder.json`` (architecture, preprocessing, training, weights, data ``provenance``) and the
evaluation results the run folder holds (:func:`evaluation_results`). Nothing in the card is not also in
those two files; the card only makes them readable, and says plainly what is unknown.

Example::

    text = render_model_card(meta, evaluation_results(run_dir, step=meta["training"]["step"]))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pcrl.io import read_jsonl
from pcrl.shards import UNKNOWN

__all__ = ["EVAL_PREFIXES", "MODEL_CARD", "evaluation_results", "render_model_card"]

MODEL_CARD = "MODEL_CARD.md"
EVAL_PREFIXES = ("val/", "probe/")
"""The metrics of ``metrics.jsonl`` the card reports: the restoration validation and the online linear probe
(:mod:`pcrl.evaluate`)."""


def evaluation_results(run_dir: str | os.PathLike[str], step: int) -> dict[str, dict[str, float]]:
    """The last value of each evaluation metric (:data:`EVAL_PREFIXES`) in the run's ``metrics.jsonl`` at or
    before ``step`` (the exported checkpoint's: later values describe other weights).

    Returns:
        Metric name → ``{"value", "step"}``, sorted by name; empty when the run evaluated nothing by then.
    """
    records, _ = read_jsonl(Path(run_dir) / "metrics.jsonl")
    found: dict[str, dict[str, float]] = {}
    for record in records:
        at = record.get("step")
        if not isinstance(at, int) or at > step:
            continue
        for key, value in record.items():
            if key.startswith(EVAL_PREFIXES) and isinstance(value, int | float):
                found[key] = {"value": float(value), "step": at}
    return dict(sorted(found.items()))


def _mm(spacing: Sequence[float] | None) -> str:
    return " × ".join(f"{float(v):g}" for v in spacing) + " mm" if spacing else "unknown or mixed"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _provenance(p: Mapping[str, Any]) -> list[str]:
    if p.get("status") != "recorded":
        return [
            f"**Unknown.** {p.get('note') or 'The run recorded no data provenance.'} Nothing is recorded "
            "about the sources or licences of the pretraining data: find them out before using these weights.",
        ]
    sets = p.get("shard_sets", [])
    names = ", ".join(
        f"`{s['name']}`" + (f" (job fingerprint `{s['fingerprint'][:16]}`)" if s.get("fingerprint") else "")
        for s in sets
    )
    lines = [
        f"{p['volumes']} volumes of split `{p['split']}` ({_counts(p['per_modality'])}) from "
        f"{len(sets)} shard set(s): {names}.",
        "",
        "| data source | licence | volumes | per modality |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['data_source']} | {s['license']} | {s['volumes']} | {_counts(s['per_modality'])} |"
        for s in p["sources"]
    ]
    lines += ["", f"Volumes per licence: {_counts(p['per_license'])}."]
    undeclared = sum(s["volumes"] for s in p["sources"] if UNKNOWN in (s["data_source"], s["license"]))
    if undeclared:
        lines += [
            "",
            f"**{undeclared} of {p['volumes']} volumes have an unknown source or licence** (sharded without "
            "`--source`/`--license` or a `SOURCE.json`): find out where they came from before relying on "
            "these weights.",
        ]
    spacings = p.get("spacing_mm", [])
    lines += [
        "",
        "Voxel spacing of the training volumes: " + ("; ".join(_mm(s) for s in spacings) or "none") + ".",
    ]
    return lines


def _preprocessing(pre: Mapping[str, Any]) -> list[str]:
    window = pre.get("ct_window_hu")
    return [
        f"- orientation and axes: {pre.get('axis_order', 'unknown')}",
        f"- voxel spacing: {_mm(pre.get('input_spacing_mm'))} (resample your volumes to it)",
        f"- CT: {pre.get('ct', 'unknown')}; window {list(window) if window else 'unknown'} HU",
        f"- MR: {pre.get('mr', 'unknown')}",
        f"- then: {pre.get('normalisation', 'unknown')}",
        f"- pretraining views: {_views(pre.get('view_size'), pre.get('view_voxel_scale'))}",
    ]


def _views(size: Sequence[int] | None, scale: Sequence[Sequence[float]] | None) -> str:
    if not size or not scale:
        return "unknown"
    ranges = " × ".join(f"{lo:g}–{hi:g}" for lo, hi in zip(*scale, strict=True))
    return (
        f"{' × '.join(map(str, size))} voxels, each a crop of {ranges} times as many voxels per axis, resized"
    )


def _evaluation(evaluation: Mapping[str, Mapping[str, float]], step: int) -> list[str]:
    if not evaluation:
        return [
            f"The run folder holds no evaluation results up to step {step} (`metrics.jsonl` has no "
            f"{' or '.join(f'`{p}*`' for p in EVAL_PREFIXES)} values: `eval.every` was 0 or came later). "
            "Fine-tune against scratch (`python launch/finetune.py`) before trusting these weights.",
        ]
    lines = ["| metric | value | step |", "|---|---|---|"]
    lines += [f"| `{k}` | {v['value']:.4g} | {v['step']} |" for k, v in evaluation.items()]
    lines += [
        "",
        "These are pcrl's checks during pretraining (`val/*`: restoration of held-out views; `probe/*`: a linear "
        "probe on frozen features of labelled patches), not a downstream benchmark.",
    ]
    return lines


def render_model_card(meta: Mapping[str, Any], evaluation: Mapping[str, Mapping[str, float]]) -> str:
    """The Markdown text of ``MODEL_CARD.md``.

    Args:
        meta: the content of ``encoder.json`` (:func:`pcrl.export.export_encoder`), with ``provenance``.
        evaluation: :func:`evaluation_results` of the run at the exported step.

    Returns:
        The card: architecture, pretraining (config hash, steps), data provenance, expected preprocessing,
        evaluation, and what to check before use.
    """
    arch, pre, training, weights = (
        meta["architecture"],
        meta["preprocessing"],
        meta["training"],
        meta["weights"],
    )
    provenance = meta.get("provenance") or {"status": UNKNOWN}
    step = int(training["step"])
    licences = [k for k in provenance.get("per_license", {}) if k != UNKNOWN]
    lines = [
        f"# Model card: PCRLv2 encoder of run `{training['run_name']}`, step {step}",
        "",
        "A 3D CT/MRI encoder pretrained by pcrl with PCRLv2 (self-supervised: no labels were used). "
        f"`{weights['file']}` holds the weights ({weights['dtype']}, sha256 `{weights['sha256']}`), "
        "`encoder.json` the facts of this card, machine-readable. Load both with `pcrl.load_encoder(FOLDER)`.",
        "",
        "## Architecture",
        "",
        f"- {arch['name']}: the encoder of PCRLv2's 3D U-Net, {arch['depth']} stages of widths "
        f"{', '.join(map(str, arch['stage_channels']))} (base {arch['base_channels']}), {arch['norm']} norm",
        f"- input: (B, {arch['in_channels']}, X, Y, Z) with X, Y, Z divisible by {arch['input_multiple']}; "
        "output: one feature map per stage, finest first",
        "",
        "## Pretraining",
        "",
        f"- steps: {step} (the exported checkpoint) of `train.max_steps` {training['max_steps']}",
        f"- config hash: `{training['config_hash']}` (of the resolved config in the run's `config.yaml`)",
        f"- trained dtype: {training['trained_dtype']}",
        f"- BatchNorm running statistics: {training['batchnorm_running_stats']}",
        "",
        "## Data provenance",
        "",
        *_provenance(provenance),
        "",
        "## Expected preprocessing",
        "",
        *_preprocessing(pre),
        "",
        "## Evaluation",
        "",
        *_evaluation(evaluation, step),
        "",
        "## Before you use these weights",
        "",
        "- **Licences.** Weights trained on data carry questions about that data's terms. Read the terms of "
        + (
            f"every licence above ({', '.join(licences)})"
            if licences
            else "the pretraining data (none is recorded)"
        )
        + ": a non-commercial licence (e.g. CC-BY-NC-*) or a data use agreement on any source may restrict what "
        "you may do with these weights; an `unknown` source or licence must be cleared with its owner first.",
        "- **Preprocessing.** Give the encoder volumes prepared as above (orientation, spacing, window, "
        "normalisation); other inputs give features the encoder never saw in pretraining.",
        "- **Overlap.** Check that your evaluation data is not among the pretraining sources above.",
        "- **Not a medical device.** These weights are a research artefact without clinical validation.",
    ]
    return "\n".join(lines) + "\n"
