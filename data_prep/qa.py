"""The QA sheet of a shard set: ``qa.png`` beside the manifest, to check orientation and intensities by eye.

One row per sampled volume (up to :data:`QA_VOLUMES`, spread evenly over the manifest, so the same shard set
always shows the same volumes): its axial, coronal and sagittal middle planes in radiological orientation
(:func:`pcrl.shards.middle_planes`: the patient's right on the viewer's left; anterior up in axial, superior
up in coronal and sagittal), at the physical aspect of the stored voxels. CT is shown on a fixed
[-1000, 1000] HU window (air black, bone white), MRI on its stored [0, 1]. Each row is labelled with the
key, source, modality, shape, spacing and intensity policy from the volume's own metadata.

What to look for: heads and chests upright in coronal and sagittal, the heart or liver on the right of the
picture (the patient's left), no mirrored or rotated planes, CT air near black and bone white, MRI not
saturated. A crop (``--crop-body``) shows as a tight field of view.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pcrl.io import atomic_path
from pcrl.shards import SampleRecord, middle_planes, read_volume

__all__ = ["CT_DISPLAY_HU", "QA_NAME", "QA_VOLUMES", "pick", "preload", "write_qa_sheet"]

logger = logging.getLogger(__name__)

QA_NAME = "qa.png"
QA_VOLUMES = 8
CT_DISPLAY_HU = (-1000.0, 1000.0)
_CELL_IN = 1.6
_LABEL_IN = 2.6
_DPI = 80


def pick(lines: Sequence[Mapping[str, Any]], count: int = QA_VOLUMES) -> list[Mapping[str, Any]]:
    """``count`` manifest lines spread evenly over the manifest (first and last included), in order."""
    n = len(lines)
    if n <= count:
        return list(lines)
    return [lines[round(i * (n - 1) / (count - 1))] for i in range(count)] if count > 1 else [lines[0]]


def _policy(meta: Mapping[str, Any]) -> str:
    p = meta.get("intensity", {})
    if p.get("kind") == "ct_hu":
        text = f"CT int16 HU clip {p.get('clip_hu')}; shown {CT_DISPLAY_HU[0]:g}..{CT_DISPLAY_HU[1]:g} HU"
    else:
        lo, hi = (float(v) for v in p.get("values", [0, 0]))
        text = f"MR p{p.get('percentiles')} = [{lo:.4g}, {hi:.4g}] -> [0, 1]"
    crop = meta.get("crop")
    if crop:
        text += f"\nbody crop from {crop.get('uncropped_shape')} at {crop.get('start')}"
    return text


def preload() -> None:
    """Import the drawing library now (half a second), e.g. while this process waits for its workers."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401


def _fit(image: np.ndarray, aspect: float, cell: int) -> np.ndarray:
    """``image`` (rows × columns, ``aspect`` = mm per row / mm per column) resized by nearest neighbour to its
    physical shape within ``cell`` × ``cell`` pixels, centred on a white cell (values in [0, 1])."""
    rows, cols = image.shape
    height, width = rows * aspect, float(cols)
    scale = cell / max(height, width)
    h, w = max(1, min(cell, round(height * scale))), max(1, min(cell, round(width * scale)))
    r = np.minimum(((np.arange(h) + 0.5) * rows / h).astype(int), rows - 1)
    c = np.minimum(((np.arange(w) + 0.5) * cols / w).astype(int), cols - 1)
    out = np.ones((cell, cell), dtype=np.float32)
    top, left = (cell - h) // 2, (cell - w) // 2
    out[top : top + h, left : left + w] = image[np.ix_(r, c)]
    return out


def write_qa_sheet(output: Path, lines: Sequence[Mapping[str, Any]], count: int = QA_VOLUMES) -> list[str]:
    """Draw the QA sheet of the accepted volumes ``lines`` (manifest lines of ``output``) into
    ``output/qa.png``, written under a temporary name and renamed when complete (:func:`pcrl.io.atomic_path`).

    The planes are put together into one picture, drawn in one set of axes: a figure of a few dozen axes
    would cost a second of drawing for a picture the job makes once.

    Args:
        output: the shard folder (manifest paths are relative to it).
        lines: the manifest lines, in manifest order.
        count: volumes to show at most.

    Returns:
        The keys shown, top to bottom (empty, and no file, when nothing was accepted).
    """
    from matplotlib.figure import Figure

    chosen = pick(lines, count)
    if not chosen:
        return []
    cell, gap = round(_CELL_IN * _DPI), 4
    mosaic = np.ones((len(chosen) * (cell + gap) - gap, 3 * cell + 2 * gap), dtype=np.float32)
    labels = []
    for row, line in enumerate(chosen):
        array, meta = read_volume(SampleRecord.from_line(line, output))
        lo, hi = CT_DISPLAY_HU if meta.get("modality") == "ct" else (0.0, 1.0)
        sx, sy, sz = (float(v) for v in meta["spacing"])
        aspects = (sy / sx, sz / sx, sz / sy)  # mm per row / mm per column of each plane
        for plane, (image, aspect) in enumerate(zip(middle_planes(array), aspects, strict=True)):
            shown = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
            top, left = row * (cell + gap), plane * (cell + gap)
            mosaic[top : top + cell, left : left + cell] = _fit(shown, aspect, cell)
        labels.append(
            f"{meta['key']}\n{str(meta.get('source', ''))[-34:]}\n{meta['modality'].upper()} "
            f"{list(meta['shape'])} @ {[round(s, 3) for s in meta['spacing']]} mm\n{_policy(meta)}"
        )
        del array
    width = _LABEL_IN + mosaic.shape[1] / _DPI + 0.2
    height = 0.6 + mosaic.shape[0] / _DPI + 0.5
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="white")
    left, bottom = _LABEL_IN / width, 0.5 / height
    ax = fig.add_axes((left, bottom, mosaic.shape[1] / _DPI / width, mosaic.shape[0] / _DPI / height))
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    fig.suptitle(
        f"{output.name}: {len(chosen)} of {len(lines)} accepted volumes", fontsize=10, y=1 - 0.1 / height
    )
    for plane, title in enumerate(("axial (A up)", "coronal (S up)", "sagittal (S up, A left)")):
        ax.text(plane * (cell + gap) + cell / 2, -6, title, ha="center", va="bottom", fontsize=8)
    for row, label in enumerate(labels):
        middle = row * (cell + gap) + cell / 2
        ax.text(-8, middle, label, ha="right", va="center", fontsize=6.5)
        ax.text(3, middle, "R", color="yellow", fontsize=7, va="center")
    fig.text(
        0.5, 0.25 / height,
        "Radiological: the patient's right on the viewer's left (R). CT window -1000..1000 HU, MRI stored [0, 1].",
        ha="center", va="center", fontsize=6.5, color="#444444",
    )  # fmt: skip
    with atomic_path(output / QA_NAME) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    return [str(line["key"]) for line in chosen]
