"""Body crop (``--crop-body``): the box around the patient, so that shards do not store (and training does
not crop from) the air around the body.

The body is the largest connected set of voxels above a threshold: -500 HU for CT (skin and fat are above
it, air far below; lungs are inside the box anyway), and 10 % of the robust range (0.5/99.5 percentiles)
for MRI, whose background is near zero. Taking the largest connected part leaves out the CT table, cables
and MRI ghosting or noise outside the body. The box gets a margin and is grown to at least the minimum
shape (inside the volume), so a cropped volume is never rejected as too small where the uncropped one
was not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CT_BODY_HU", "MARGIN_MM", "MR_BODY_FRACTION", "body_box"]

CT_BODY_HU = -500.0
MR_BODY_FRACTION = 0.1
MARGIN_MM = 10.0
# The mask is found on every 2nd voxel per axis: 8× less work, and a body is far larger than 2 voxels.
_STRIDE = 2


def body_box(
    volume: np.ndarray,
    modality: str,
    spacing: Sequence[float],
    min_size: Sequence[int],
    margin_mm: float = MARGIN_MM,
) -> tuple[list[int], list[int], dict[str, Any]]:
    """The box around the body in an (X, Y, Z) volume (CT in HU; MRI in scanner units).

    Args:
        volume: (X, Y, Z) voxels after resampling, before the intensity policy.
        modality: ``ct`` or ``mr``.
        spacing: voxel size (x, y, z) in mm (for the margin).
        min_size: the box is grown to at least this (x, y, z) shape, where the volume allows.
        margin_mm: added on every side of the body's bounding box.

    Returns:
        ``start`` and ``size`` (x, y, z) of the box, and the record kept in the metadata (``crop``):
        threshold, margin, start and the uncropped shape. Where no voxel is above the threshold the box is
        the whole volume and the record says so.
    """
    from scipy import ndimage

    shape = [int(n) for n in volume.shape]
    coarse = volume[::_STRIDE, ::_STRIDE, ::_STRIDE]
    if modality == "ct":
        threshold = CT_BODY_HU
    else:
        lo, hi = (float(v) for v in np.percentile(coarse, (0.5, 99.5)))
        threshold = lo + MR_BODY_FRACTION * (hi - lo)
    labels, count = ndimage.label(coarse > threshold)
    record: dict[str, Any] = {
        "kind": "body",
        "threshold": round(float(threshold), 4),
        "margin_mm": float(margin_mm),
        "uncropped_shape": shape,
    }
    if count == 0:
        record.update(start=[0, 0, 0], note="no voxel above the threshold: not cropped")
        return [0, 0, 0], shape, record
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    (box,) = ndimage.find_objects((labels == largest).astype(np.int8))
    start, size = [], []
    for axis, (sl, n, s, m) in enumerate(zip(box, shape, spacing, min_size, strict=True)):
        pad = math.ceil(margin_mm / float(s))
        lo = max(0, sl.start * _STRIDE - pad)
        hi = min(n, (sl.stop - 1) * _STRIDE + 1 + pad)
        grow = max(0, min(m, n) - (hi - lo))
        lo = max(0, lo - grow // 2)
        hi = min(n, lo + max(hi - lo, min(m, n)))
        lo = hi - max(hi - lo, min(m, n))
        assert 0 <= lo < hi <= n, (axis, lo, hi, n)
        start.append(int(lo))
        size.append(int(hi - lo))
    record["start"] = start
    return start, size, record
