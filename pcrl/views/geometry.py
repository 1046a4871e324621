"""Where the PCRLv2 views are cut (docs/method.md §1, D1–D3): boxes, their sampling, and the view affines.

Every random choice of a sample's geometry is drawn here from a ``numpy.random.Generator`` (the sample's own,
seeded from its seed): the two global boxes (:func:`sample_global_pair`, with the tissue filter of
:mod:`pcrl.views.tissue`), the local boxes inside their union (:func:`sample_local_boxes`), the flip, scale and
rotation of each view (:func:`sample_spatial_params`) and the swap patches (:func:`draw_swaps`). A view's
crop, resize and augmentation compose into one affine map (:func:`view_affines`); :func:`read_region` says
which voxels the views read, so that a renderer only moves those.

Coordinates: the volume is indexed (x, y, z) and voxel ``i`` covers the continuous interval ``[i, i + 1)``
(centre ``i + 0.5``), the convention of ``grid_sample(align_corners=False)``. All sizes are in voxels (1 mm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pcrl.config import ViewsConfig
from pcrl.views.tissue import global_tissue_scores

__all__ = [
    "Box",
    "SpatialParams",
    "ViewPlan",
    "box_iou",
    "draw_box_starts",
    "draw_swaps",
    "read_region",
    "sample_global_pair",
    "sample_local_boxes",
    "sample_spatial_params",
    "union_box",
    "view_affines",
    "view_pads",
]

# Redraw rounds for non-overlapping swap patches before giving up (each round redraws all invalid ones).
_SWAP_MAX_ROUNDS = 1000


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of voxels ``[start, start + size)`` per axis (x, y, z)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def end(self) -> tuple[int, int, int]:
        """Exclusive end corner."""
        return (self.start[0] + self.size[0], self.start[1] + self.size[1], self.start[2] + self.size[2])

    @property
    def volume(self) -> int:
        """Number of voxels."""
        return self.size[0] * self.size[1] * self.size[2]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index of the box in an (X, Y, Z) array."""
        return tuple(slice(s, e) for s, e in zip(self.start, self.end, strict=True))  # type: ignore[return-value]


def _box(start: Sequence[int], size: Sequence[int]) -> Box:
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in size))  # type: ignore[arg-type]


def box_iou(a: Box, b: Box) -> float:
    """3D intersection over union of two boxes (0 for disjoint boxes)."""
    inter = 1
    for sa, ea, sb, eb in zip(a.start, a.end, b.start, b.end, strict=True):
        inter *= max(0, min(ea, eb) - max(sa, sb))
    return inter / (a.volume + b.volume - inter)


def union_box(a: Box, b: Box) -> Box:
    """The smallest box containing both boxes."""
    start = [min(sa, sb) for sa, sb in zip(a.start, b.start, strict=True)]
    end = [max(ea, eb) for ea, eb in zip(a.end, b.end, strict=True)]
    return _box(start, [e - s for s, e in zip(start, end, strict=True)])


def draw_box_starts(
    shape: np.ndarray, sizes: np.ndarray, border: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(..., 3) starts of boxes of ``sizes`` (..., 3), already clamped to the volume ``shape`` (3,): uniform
    with a margin of ``border`` (3,) voxels from each edge, shrunk to ``(shape - size) // 2`` where the volume
    is too small for it."""
    slack = shape - sizes  # >= 0: sizes are already clamped to the volume
    margin = np.minimum(border, slack // 2)
    return rng.integers(margin, slack - margin + 1)


def sample_global_pair(
    shape: Sequence[int],
    cfg: ViewsConfig,
    rng: np.random.Generator,
    volume: Tensor | None = None,
    tissue_threshold: float | None = None,
) -> tuple[Box, Box]:
    """Draw the two global boxes of one sample (docs/method.md §1.2, D1 and D3).

    Each view draws its size uniformly from ``cfg.global_crop_sizes`` and its start uniformly with a margin
    of ``cfg.border`` voxels from the volume edge. Where the volume is too small the margin shrinks to
    ``(volume - crop) // 2`` on that axis, and a crop larger than the volume is clamped to the volume size on
    that axis. A pair is accepted when ``box_iou > cfg.min_iou`` and, if the tissue filter is on (``volume``
    and ``tissue_threshold`` given and ``cfg.tissue_filter``), both views score at most
    ``cfg.tissue_max_fraction`` (:func:`tissue_score`, computed for all candidates at once from the volume's
    :class:`TissueIntegral`, built once per volume). All ``cfg.max_tries`` candidates are drawn up front
    (so the stream of random numbers used does not depend on the volume); the first acceptable one is
    returned. If none is acceptable, the IoU-valid candidate with the lowest max tissue score is returned,
    or, if no candidate is IoU-valid, the one with the highest IoU: sampling always terminates.

    Args:
        shape: volume size (X, Y, Z).
        cfg: the views config.
        rng: the sample's generator.
        volume: (X, Y, Z) intensities for the tissue filter (any device), or None.
        tissue_threshold: tissue threshold in the units of ``volume``; None disables the filter.

    Returns:
        The two global boxes.
    """
    shape_a = np.asarray(shape, dtype=np.int64)
    table = np.asarray(cfg.global_crop_sizes, dtype=np.int64)  # (S, 3)
    sizes = np.minimum(table[rng.integers(0, len(table), size=(cfg.max_tries, 2))], shape_a)  # (T, 2, 3)
    starts = draw_box_starts(shape_a, sizes, np.asarray(cfg.border, dtype=np.int64), rng)  # (T, 2, 3)

    ends = starts + sizes
    inter = np.clip(
        np.minimum(ends[:, 0], ends[:, 1]) - np.maximum(starts[:, 0], starts[:, 1]), 0, None
    ).prod(-1)
    vols = sizes.prod(-1)
    iou = inter / (vols[:, 0] + vols[:, 1] - inter)  # (T,)
    valid = np.flatnonzero(iou > cfg.min_iou)

    def pair(t: int) -> tuple[Box, Box]:
        return _box(starts[t, 0], sizes[t, 0]), _box(starts[t, 1], sizes[t, 1])

    if len(valid) == 0:
        return pair(int(np.argmax(iou)))
    if volume is None or tissue_threshold is None or not cfg.tissue_filter:
        return pair(int(valid[0]))

    # every IoU-valid candidate scored at once: 16 integral-image lookups each
    worst = global_tissue_scores(volume, tissue_threshold, cfg, starts[valid], sizes[valid]).max(1)
    ok = np.flatnonzero(worst <= cfg.tissue_max_fraction)
    return pair(int(valid[ok[0]] if len(ok) else valid[np.argmin(worst)]))  # argmin: the first lowest


def sample_local_boxes(
    shape: Sequence[int], box1: Box, box2: Box, cfg: ViewsConfig, rng: np.random.Generator
) -> list[Box]:
    """Draw the ``cfg.num_locals`` local sub-crop boxes (docs/method.md §1.4).

    Each local draws its size uniformly from ``cfg.local_crop_sizes`` and its start uniformly such that the
    WHOLE box lies inside the union of the two global boxes widened by ``cfg.local_margin`` on each side and
    clipped to the volume. Unlike the reference (docs/method.md R9) a local box is never truncated at the
    volume border; where the allowed region is smaller than the drawn size on an axis, the size is clamped to
    it.

    Args:
        shape: volume size (X, Y, Z).
        box1, box2: the global boxes.
        cfg: the views config.
        rng: the sample's generator.

    Returns:
        ``cfg.num_locals`` boxes.
    """
    union = union_box(box1, box2)
    lo = np.maximum(np.asarray(union.start) - cfg.local_margin, 0)
    hi = np.minimum(np.asarray(union.end) + cfg.local_margin, np.asarray(shape))
    table = np.asarray(cfg.local_crop_sizes, dtype=np.int64)
    sizes = np.minimum(table[rng.integers(0, len(table), size=cfg.num_locals)], hi - lo)  # (L, 3)
    starts = rng.integers(lo, hi - sizes + 1)
    return [_box(s, z) for s, z in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class SpatialParams:
    """Random spatial augmentation of N views (docs/method.md §1.5): flip, then scale and rotation."""

    flip: np.ndarray
    """(N, 3) bool: flip this axis (x, y, z)."""
    scale: np.ndarray
    """(N, 3) float: zoom per axis; > 1 magnifies (the view covers ``box / scale`` of the volume)."""
    rotation: np.ndarray
    """(N, 3) float: rotation angles about x, y, z in radians (applied x first, then y, then z)."""

    @staticmethod
    def identity(n: int) -> SpatialParams:
        """No flip, scale 1, no rotation: the view is the plain resized crop."""
        return SpatialParams(np.zeros((n, 3), bool), np.ones((n, 3)), np.zeros((n, 3)))


@dataclass(frozen=True)
class ViewPlan:
    """Every random choice of one sample (:meth:`PCRLv2Views.plan`): what a renderer needs besides the voxels."""

    shape: tuple[int, ...]
    """(X, Y, Z) of the volume it was drawn for."""
    global_boxes: tuple[Box, Box]
    local_boxes: tuple[Box, ...]
    global_params: SpatialParams
    local_params: SpatialParams
    noise_seed: int
    sigma: np.ndarray
    """(2 + L, 3) blur sigma per view (globals first), in voxels."""
    noise_std: np.ndarray
    """(2 + L,) additive noise std per view."""
    gamma: np.ndarray
    """(2 + L,) gamma per view."""
    swaps: np.ndarray
    """(2, swap_count, 2, 3) int64 patch corners of the global views' swaps."""


def sample_spatial_params(n: int, cfg: ViewsConfig, rng: np.random.Generator) -> SpatialParams:
    """Draw the spatial augmentation of ``n`` views: flip each axis of ``cfg.flip_axes`` with
    ``cfg.flip_prob``, per-axis scale ~ U(``cfg.scale_range``), per-axis rotation ~ U(±``cfg.rotation_deg``)."""
    allowed = np.isin(np.arange(3), cfg.flip_axes)
    flip = (rng.random((n, 3)) < cfg.flip_prob) & allowed
    scale = rng.uniform(cfg.scale_range[0], cfg.scale_range[1], size=(n, 3))
    rotation = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, size=(n, 3)))
    return SpatialParams(flip, scale, rotation)


def _rotations(angles: np.ndarray) -> np.ndarray:
    """(N, 3) angles about x, y, z → (N, 3, 3) matrices ``Rz @ Ry @ Rx``."""
    c, s = np.cos(angles), np.sin(angles)
    one, zero = np.ones_like(c[:, 0]), np.zeros_like(c[:, 0])
    rx = np.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1).reshape(-1, 3, 3)
    ry = np.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1).reshape(-1, 3, 3)
    rz = np.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def view_affines(boxes: Sequence[Box], out_size: Sequence[int], params: SpatialParams) -> Tensor:
    """The affine map of each view: output coordinates → volume coordinates (docs/method.md D2).

    Crop box → resize to ``out_size``, composed with the flip, scale and rotation about the box centre,
    done in physical (1 mm voxel) space, so a rotation is a true rotation even where the resize is
    anisotropic. With ``u = q / out_size - 1/2`` the view-relative position of output point ``q``::

        p = centre + F · R · S⁻¹ · diag(box_size) · u

    (flip F outermost, as the reference flips before its affine). Both ``q`` and ``p`` are continuous
    coordinates in which voxel ``i`` covers ``[i, i + 1)``. Samples outside the box come from the
    surrounding volume (the reference pre-cut the crop and padded instead).

    Args:
        boxes: N boxes.
        out_size: (nx, ny, nz) of the views.
        params: the views' spatial augmentation.

    Returns:
        (N, 3, 4) float64 ``[M | t]`` with ``p = M @ q + t``.
    """
    # numpy: on these (N, 3, 3) arrays each torch op costs ~10x more in dispatch than in arithmetic
    start = np.array([b.start for b in boxes], dtype=np.float64)
    size = np.array([b.size for b in boxes], dtype=np.float64)
    flip = 1.0 - 2.0 * np.asarray(params.flip, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    lin = (
        flip[:, :, None]
        * _rotations(np.asarray(params.rotation, np.float64))
        / scale[:, None, :]
        * size[:, None, :]
    )
    m = lin / np.asarray(out_size, dtype=np.float64)  # per unit of output coordinate
    t = start + size / 2 - lin.sum(-1) * 0.5
    return torch.from_numpy(np.concatenate([m, t[..., None]], -1))


def _sample_extent(affines: Tensor, out_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-view (N, 3) min / max volume coordinate of the output voxel centres."""
    a = affines.numpy()
    q = np.array([[0.5, n - 0.5] for n in out_size], dtype=np.float64)  # (3, 2)
    mid, half = q.mean(1), (q[:, 1] - q[:, 0]) / 2
    centre = a[..., :3] @ mid + a[..., 3]
    reach = np.abs(a[..., :3]) @ half  # the corners of an affine image of a box are its extremes
    return centre - reach, centre + reach


def read_region(
    affines: Tensor, out_size: Sequence[int], shape: Sequence[int]
) -> tuple[list[int], list[int], list[bool]]:
    """The integer box ``[lo, hi)`` of the volume that N views read, and per view whether it reaches outside.

    The box holds every sample's 2 neighbours per axis (voxel centres sit at i + 0.5), plus one voxel against
    rounding, so it touches the volume border only where samples really reach it.
    """
    p_min, p_max = _sample_extent(affines, out_size)
    size = np.asarray(shape, dtype=np.int64)
    lo = np.floor(p_min.min(0) - 0.5).astype(np.int64) - 1
    hi = np.floor(p_max.max(0) - 0.5).astype(np.int64) + 3
    outside = ((p_min < 0.5) | (p_max > size - 0.5)).any(1).tolist()
    return np.maximum(lo, 0).tolist(), np.minimum(hi, size).tolist(), outside


def view_pads(volume: Tensor, boxes: Sequence[Box], outside: Sequence[bool]) -> Tensor | None:
    """(N,) minimum of each view's box where the view reaches outside the volume (NaN elsewhere), or None."""
    if not any(outside):
        return None
    return torch.stack(
        [
            volume[b.slices].amin().to(torch.float32)
            if o
            else volume.new_full((), math.nan, dtype=torch.float32)
            for b, o in zip(boxes, outside, strict=True)
        ]
    ).cpu()


def draw_swaps(
    size: Sequence[int], patch: Sequence[int], count: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, count, 2, 3) corners of ``count`` pairs of non-overlapping patches per view, uniform over the view
    (torchio ``RandomSwap``); overlapping second patches are redrawn."""
    size_a, patch_a = np.asarray(size), np.asarray(patch)
    high = size_a - patch_a + 1
    first = rng.integers(0, high, size=(n, count, 3))
    second = rng.integers(0, high, size=(n, count, 3))
    for _ in range(_SWAP_MAX_ROUNDS):
        overlap = (np.abs(first - second) < patch_a).all(-1)
        if not overlap.any():
            break
        second[overlap] = rng.integers(0, high, size=(int(overlap.sum()), 3))
    else:
        raise RuntimeError(
            f"could not place non-overlapping swap patches {list(patch)} in views of {list(size)}"
        )
    return np.stack([first, second], 2)
