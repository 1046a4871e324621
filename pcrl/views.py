"""The PCRLv2 sub-crop views (docs/method.md §1, D1–D3), cut online from one whole volume.

A sample is two global views of one volume (boxes with IoU > ``min_iou``, optionally kept away from
tissue-dominated regions) and ``num_locals`` local sub-crops from inside the union of the two global boxes.
Geometry and rendering are separate so that another renderer (DALI on the GPU) can reuse the sampler:

* **sampling** (:func:`sample_global_pair`, :func:`sample_local_boxes`, :func:`sample_spatial_params`,
  :func:`view_affines`) draws plain integer :class:`Box` es and per-view affine maps from a
  ``numpy.random.Generator``;
* **rendering** (:class:`PCRLv2Views`) applies each view's crop + resize + flip + scale + rotation as ONE
  trilinear resampling (on a GPU one ``grid_sample`` for the globals of a batch and one for its locals, on a
  CPU :mod:`pcrl.cpu_kernels` per sample), then the intensity steps of the
  reference (blur → noise → gamma → [patch swap] → z-normalisation), batched over views.

Coordinates: the volume is indexed (x, y, z) and voxel ``i`` covers the continuous interval ``[i, i + 1)``
(centre ``i + 0.5``), the convention of ``grid_sample(align_corners=False)``. All sizes are in voxels (1 mm).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pcrl.config import ViewsConfig

__all__ = [
    "Box",
    "PCRLv2Views",
    "SpatialParams",
    "TissueIntegral",
    "ViewPlan",
    "blur_window",
    "box_iou",
    "build_renderer",
    "collate_draws",
    "render_views",
    "sample_global_pair",
    "sample_local_boxes",
    "sample_spatial_params",
    "tissue_score",
    "union_box",
    "view_affines",
]

# Gaussian kernels are cut at this many sigmas (torchio/scipy use 4; 3 keeps >99.7 % of the mass).
_BLUR_TRUNCATE = 3.0
# z-normalisation divides by max(std, this): a constant view becomes all zeros instead of NaN.
_MIN_STD = 1e-6
# Redraw rounds for non-overlapping swap patches before giving up (each round redraws all invalid ones).
_SWAP_MAX_ROUNDS = 1000


# --- geometry ------------------------------------------------------------------------------------


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


def tissue_score(volume: Tensor, box: Box, threshold: float, depth: int) -> float:
    """Tissue score of a box (docs/method.md §1.3, D3): 0 = air only, 1 = tissue everywhere.

    For every voxel ``(i, j, d)`` of the box whose slices ``d .. d+depth-1`` lie inside the box, ``k`` is the
    index of the first of those slices with value ``>= threshold`` (``k = depth - 1`` if none) and the voxel
    scores ``1 - k / (depth - 1)``; the box scores the mean. Computed on the raw crop (no resampling), with
    the same meaning for every crop size. A box thinner than ``depth`` uses all its slices.

    Args:
        volume: (X, Y, Z) intensities in the units of ``threshold``.
        box: the crop.
        threshold: tissue threshold (e.g. -150 HU mapped into the [0, 1] window).
        depth: slices looked at (>= 2).
    """
    crop = volume[box.slices]
    if crop.device.type == "cpu" and crop.dtype in (torch.float16, torch.float32, torch.float64):
        crop = crop.numpy()  # numpy compares a strided crop ~5x faster than torch on CPU
    count = np.count_nonzero if isinstance(crop, np.ndarray) else torch.count_nonzero
    tissue = crop >= threshold  # (x, y, z) bool
    depth = min(depth, tissue.shape[2])
    if depth < 2:
        return float(count(tissue)) / math.prod(tissue.shape)
    n = tissue.shape[2] - depth + 1
    seen = tissue[..., :n]  # the first tissue slice is d itself: score 1
    total = float(count(seen))
    for j in range(1, depth - 1):  # j = depth - 1 scores 0, like "no tissue"
        later = tissue[..., j : j + n]
        total += (1.0 - j / (depth - 1)) * float(count(later & ~seen))
        seen = seen | later
    return total / math.prod(seen.shape)


def _tissue_weights(tissue: np.ndarray, depth: int) -> np.ndarray:
    """(X, Y, Z) bool → (X, Y, Z - depth + 2) uint8: ``(depth - 1) ×`` the per-voxel tissue score of
    :func:`tissue_score` for every ``d`` whose first ``depth - 1`` slices exist (integers: box sums are exact).

    With ``k`` the first tissue slice of ``d ..``, ``depth - 1 - k`` is the number of ``j`` in ``0 .. depth - 2``
    for which one of the slices ``d .. d + j`` is tissue: a sum of running ORs, no comparisons of ``k``.
    """
    m = tissue.shape[2] - depth + 2
    seen = tissue[..., :m]
    weights = seen.view(np.uint8).copy()
    for j in range(1, depth - 1):
        seen = seen | tissue[..., j : j + m]
        weights += seen.view(np.uint8)
    return weights


class TissueIntegral:
    """The exact :func:`tissue_score` of any box inside the region ``[lo, hi)`` of one volume, without
    touching its voxels.

    Per z slice, a 2D integral image (cumulative sum over x and y) of the integer per-voxel scores of
    :func:`_tissue_weights`, built once per volume: ~4 passes over the region (tens of ms for a lung CT,
    where scoring each of ~100-400 candidate boxes directly costs ~1 ms). A box's score is then 4 lookups per
    scored slice. The per-voxel score of ``(i, j, d)`` only reads slices ``d .. d + depth - 2`` of its
    column, all inside any box that holds ``d + depth - 1``, so a box's score is the box sum of the field
    over its first ``size_z - depth + 1`` slices divided by ``(depth - 1)`` and that voxel count:
    bit-identical to :func:`tissue_score` for ``depth`` 2 and 3 (the weights 1 and 1/2 are exact), within
    rounding otherwise (tested). The innermost axis (z) is summed at query time rather than integrated,
    because a cumulative sum along it is the slowest of the three passes.
    """

    def __init__(
        self,
        volume: Tensor,
        threshold: float,
        depth: int,
        lo: Sequence[int],
        hi: Sequence[int],
        max_box_area: int | None = None,
    ) -> None:
        """``volume`` (X, Y, Z) on any device; boxes must lie in ``[lo, hi)``; ``depth >= 2``. With
        ``max_box_area`` (the largest x·y size of a box to be scored) small enough, the sums are kept modulo
        2^16 (uint16, half the memory of int32: ~150 MB for a 512×512×600 CT): a box's sum over one slice is
        below 2^16, so it comes out exact from wrapped sums."""
        crop = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if crop.device.type == "cpu" and crop.dtype in (torch.float16, torch.float32, torch.float64):
            tissue = crop.numpy() >= threshold  # numpy compares a strided crop ~5x faster than torch on CPU
        else:
            tissue = (crop >= threshold).cpu().numpy()
        self.depth, self.origin = depth, np.asarray(lo, dtype=np.int64)
        weights = _tissue_weights(tissue, depth) if tissue.shape[2] >= depth else tissue[..., :0]
        sx, sy, sz = weights.shape
        self.max_box_area = max_box_area if max_box_area and (depth - 1) * max_box_area < 2**16 else None
        # unwrapped int32 sums are exact up to 2^31: (depth - 1) · voxels of one slice
        exact_dtype = np.int32 if (depth - 1) * sx * sy < 2**31 else np.int64
        dtype = np.uint16 if self.max_box_area else exact_dtype
        integral = np.zeros((sx + 1, sy + 1, sz), dtype=dtype)
        # running sums of whole slices: ~3x faster than np.cumsum's strided loop along an outer axis
        for i in range(sx):
            np.add(integral[i, 1:], weights[i], out=integral[i + 1, 1:])
        for j in range(1, sy):
            np.add(integral[1:, j], integral[1:, j + 1], out=integral[1:, j + 1])
        self.integral = integral

    def scores(self, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Tissue scores (N,) float64 of N boxes ``starts``, ``sizes`` (N, 3) inside the region, each at
        least ``depth`` slices deep."""
        a = starts - self.origin
        b = a + sizes - [0, 0, self.depth - 1]  # exclusive end of the scored slices
        n = b[:, 2] - a[:, 2]
        z = a[:, 2, None] + np.arange(max(int(n.max(initial=0)), 1))  # (N, Z) scored slices, padded
        inside = z < b[:, 2, None]
        z = np.where(inside, z, a[:, 2, None])
        c = self.integral
        x0, x1, y0, y1 = (v[:, None] for v in (a[:, 0], b[:, 0], a[:, 1], b[:, 1]))
        if self.max_box_area and ((b - a)[:, :2].prod(-1) > self.max_box_area).any():
            raise ValueError(
                f"a box is larger in x·y than the max_box_area {self.max_box_area} of this integral"
            )
        per_slice = c[x1, y1, z] - c[x0, y1, z] - c[x1, y0, z] + c[x0, y0, z]  # (N, Z), exact even if wrapped
        total = np.where(inside, per_slice, 0).sum(1, dtype=np.int64)
        return total / ((self.depth - 1) * (b - a).prod(-1))


def _draw_boxes(
    shape: np.ndarray, sizes: np.ndarray, border: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Starts for boxes of ``sizes`` (..., 3), uniform between margins shrunk to fit the volume."""
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
    starts = _draw_boxes(shape_a, sizes, np.asarray(cfg.border, dtype=np.int64), rng)  # (T, 2, 3)

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
    worst = _tissue_scores(volume, tissue_threshold, cfg, starts[valid], sizes[valid]).max(1)
    ok = np.flatnonzero(worst <= cfg.tissue_max_fraction)
    return pair(int(valid[ok[0]] if len(ok) else valid[np.argmin(worst)]))  # argmin: the first lowest


# The integral of the last volume scored (per process, so per loader worker): the samples of one volume
# (views.pairs_per_volume, or __call__ on the same volume) build it once. A weak reference, so the cache
# never keeps a volume alive, and the tensor's version counter catches in-place changes.
_TISSUE_CACHE: dict[str, Any] = {}


def _tissue_scores(
    volume: Tensor, threshold: float, cfg: ViewsConfig, starts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """:func:`tissue_score` of global boxes ``starts``, ``sizes`` (..., 3) of ``volume`` → (...,) float64."""
    shape = np.asarray(volume.shape, dtype=np.int64)
    # where any global box can lie: within the smallest border margin of any (clamped) crop size
    table = np.minimum(np.asarray(cfg.global_crop_sizes, dtype=np.int64), shape)
    lo = np.minimum(np.asarray(cfg.border, dtype=np.int64), (shape - table) // 2).min(0)
    key = (volume._version, float(threshold), cfg.tissue_depth, tuple(lo.tolist()))
    cached = _TISSUE_CACHE.get("volume")
    if cached is None or cached() is not volume or _TISSUE_CACHE.get("key") != key:
        _TISSUE_CACHE.clear()
        integral = TissueIntegral(
            volume,
            threshold,
            cfg.tissue_depth,
            lo.tolist(),
            (shape - lo).tolist(),
            int(table[:, :2].prod(-1).max()),
        )
        _TISSUE_CACHE.update(volume=weakref.ref(volume), key=key, integral=integral)
    integral = _TISSUE_CACHE["integral"]
    thin = sizes[..., 2] < cfg.tissue_depth  # only in volumes thinner than the depth: scored directly
    scores = np.empty(thin.shape)
    scores[~thin] = integral.scores(starts[~thin], sizes[~thin])
    for i in zip(*np.nonzero(thin), strict=True):
        scores[i] = tissue_score(volume, _box(starts[i], sizes[i]), threshold, cfg.tissue_depth)
    return scores


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


# --- rendering -----------------------------------------------------------------------------------
#
# Rendering is split in two so that the expensive part can run where it is cheapest: :meth:`PCRLv2Views.draw`
# (per sample, on the CPU, in loader workers) draws every random number of a sample from its seed and cuts
# the volume regions its views read; :func:`collate_draws` stacks a batch of draws; :meth:`PCRLv2Views.render`
# renders a whole batch with one resampling call per view size (per sample on the CPU) and batched intensity
# steps, on the CPU or the GPU. ``PCRLv2Views(cfg)(volume, seed)`` does all three for one sample. A draw is
# itself :meth:`PCRLv2Views.plan` (every random choice, the geometry sampler included) then
# :meth:`PCRLv2Views.cut` (affines and regions), so that ``bench/views.py`` can time rendering apart from
# sampling.


def _sample_extent(affines: Tensor, out_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-view (N, 3) min / max volume coordinate of the output voxel centres."""
    a = affines.numpy()
    q = np.array([[0.5, n - 0.5] for n in out_size], dtype=np.float64)  # (3, 2)
    mid, half = q.mean(1), (q[:, 1] - q[:, 0]) / 2
    centre = a[..., :3] @ mid + a[..., 3]
    reach = np.abs(a[..., :3]) @ half  # the corners of an affine image of a box are its extremes
    return centre - reach, centre + reach


def _read_region(
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


def _grid(
    affines: Tensor, out_size: Sequence[int], origin: Tensor, extent: Tensor, device: torch.device
) -> Tensor:
    """``grid_sample`` grid (N, nx, ny, nz, 3) for input regions ``[origin, origin + extent)``.

    ``origin`` and ``extent`` are (3,) or per view (N, 3). The same grid ``affine_grid`` would give for the
    equivalent theta (tested), built as a separable sum: ``affine_grid`` costs ~6 ms per 64×64×32 view on one
    CPU thread, this ~0.5 ms. The last dim is (z, y, x): grid_sample reads it as (W, H, D) of an input laid
    out (N, C, D=x, H=y, W=z).
    """
    # normalised input coordinate (align_corners=False): 2 * (p - origin) / extent - 1
    m = 2.0 * affines[..., :3] / extent.unsqueeze(-1)
    t = 2.0 * (affines[..., 3] - origin) / extent - 1.0
    # rows → (z, y, x); non-blocking: a blocking copy of a CPU tensor would wait for the GPU's queue
    m = m.flip(1).to(device, torch.float32, non_blocking=True)
    t = t.flip(1).to(device, torch.float32, non_blocking=True)
    qx, qy, qz = (torch.arange(n, device=device, dtype=torch.float32) + 0.5 for n in out_size)
    yz = (
        t[:, None, None, :]
        + qy[None, :, None, None] * m[:, None, None, :, 1]
        + qz[None, None, :, None] * m[:, None, None, :, 2]
    )
    return yz[:, None] + qx[None, :, None, None, None] * m[:, None, None, None, :, 0]


def _outside_fill(grid: Tensor, origin: Tensor, extent: Tensor, shape: Tensor, pad: Tensor) -> Tensor:
    """``pad · (1 - coverage)`` per output voxel (N, nx, ny, nz): what turns zeros padding into ``pad`` padding.

    With zeros padding a sample is ``Σ_inside w·v``; sampling ``v - pad`` instead adds ``pad·(1 - Σ_inside w)``,
    and ``Σ_inside w`` factorises per axis into ``clamp(min(i + 1, L - i), 0, 1)`` at voxel index ``i``.
    ``origin`` (N, 3), ``extent`` (3,), ``shape`` (N, 3) volume sizes, ``pad`` (N,), all on the grid's device.
    """
    idx = (grid.flip(-1) + 1.0) * (extent / 2) - 0.5 + origin[:, None, None, None, :]
    size = shape[:, None, None, None, :]
    coverage = torch.minimum(idx + 1.0, size - idx).clamp_(0.0, 1.0).prod(-1)
    return (1.0 - coverage).mul_(pad[:, None, None, None])


def _resample(
    regions: Tensor | Sequence[Tensor],
    origins: Tensor,
    shapes: Tensor,
    affines: Tensor,
    pads: Tensor | None,
    out_size: Sequence[int],
) -> Tensor:
    """All views of a batch by trilinear sampling: ONE ``grid_sample`` call for a stacked batch (the GPU path),
    :func:`_resample_cpu` for a list of regions (the CPU path, where stacking regions of different volumes
    would only add copies).

    Args:
        regions: (B, RX, RY, RZ) float32 crops of the B volumes zero-padded to a common size, or B crops.
        origins: (B, 3) volume coordinate of each region's first voxel.
        shapes: (B, 3) sizes of the volumes (samples beyond them take the view's pad value).
        affines: (B, V, 3, 4) float64 output → volume coordinate maps (:func:`view_affines`).
        pads: (B, V) value outside the volume per view (NaN for a view that stays inside), or None where no
            view reaches outside.
        out_size: (nx, ny, nz).

    Returns:
        (B, V, nx, ny, nz) float32 on the regions' device.
    """
    if not isinstance(regions, Tensor):
        return _resample_cpu(regions, origins, affines, pads, out_size)
    b, v = affines.shape[:2]
    device = regions.device
    extent = torch.tensor(regions.shape[1:], dtype=torch.float64)
    origin = origins.to(torch.float64).repeat_interleave(v, 0)  # (B·V, 3)
    grid = _grid(affines.reshape(b * v, 3, 4), out_size, origin, extent, device)
    # all views of a sample in one grid: stack them along D rather than expanding the input to V copies
    out = F.grid_sample(
        regions[:, None],
        grid.view(b, v * out_size[0], *grid.shape[2:]),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).view(b * v, *out_size)
    if pads is not None:
        rows = torch.nonzero(~torch.isnan(pads.reshape(-1).cpu()))[:, 0]  # only views that reach outside
        on_device = rows.to(device, non_blocking=True)
        fill = _outside_fill(
            grid[on_device],
            origin[rows].to(device, torch.float32, non_blocking=True),
            extent.to(device, torch.float32, non_blocking=True),
            shapes.repeat_interleave(v, 0)[rows].to(device, torch.float32, non_blocking=True),
            pads.reshape(-1)[rows].to(device, torch.float32, non_blocking=True),
        )
        out.index_add_(0, on_device, fill)
    return out.view(b, v, *out_size)


def _resample_cpu(
    regions: Sequence[Tensor],
    origins: Tensor,
    affines: Tensor,
    pads: Tensor | None,
    out_size: Sequence[int],
) -> Tensor:
    """:func:`_resample` of a list of CPU regions, by :func:`pcrl.cpu_kernels.resample_affine` per sample: the
    same trilinear sampling as ``grid_sample`` (tested), about 2x faster on a CPU core, with no grid to build.

    A corner outside a region is outside the volume (:func:`_read_region` cuts every neighbour inside it), so
    reading the view's pad value there is ``grid_sample``'s zeros padding plus :func:`_outside_fill`.
    """
    from pcrl.cpu_kernels import resample_affine

    b, v = affines.shape[:2]
    lin = affines[..., :3].numpy()
    # volume coordinate (voxel centres at i + 0.5) → index coordinate of the region (centres at i)
    off = affines[..., 3].numpy() - origins.numpy().astype(np.float64)[:, None, :] - 0.5
    pad = np.zeros((b, v), np.float32) if pads is None else np.nan_to_num(pads.numpy(), nan=0.0)
    out = torch.empty((b, v, *out_size), dtype=torch.float32)
    for i, r in enumerate(regions):
        resample_affine(r.to(torch.float32).numpy(), lin[i], off[i], pad[i], out_size, out=out[i].numpy())
    return out


def render_views(
    volume: Tensor, boxes: Sequence[Box], out_size: Sequence[int], params: SpatialParams
) -> Tensor:
    """Render N views of one volume, each by ONE trilinear resampling (docs/method.md D2), in one call.

    Each view is its box resized to ``out_size`` and composed with its flip, scale and rotation
    (:func:`view_affines`). Samples outside the box come from the surrounding volume; samples outside the
    volume take the minimum of the view's box (the reference padded its crop with the crop's minimum).

    Args:
        volume: (X, Y, Z) float intensities, any device.
        boxes: N boxes inside the volume.
        out_size: (nx, ny, nz) of every view.
        params: the views' spatial augmentation.

    Returns:
        (N, nx, ny, nz) float32 on the volume's device.
    """
    affines = view_affines(boxes, out_size, params)
    lo, hi, outside = _read_region(affines, out_size, volume.shape)
    region = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].to(torch.float32)
    pads = _view_pads(volume, boxes, outside)
    return _resample(
        region[None],
        torch.tensor([lo]),
        torch.tensor([list(volume.shape)]),
        affines[None],
        None if pads is None else pads[None],
        out_size,
    )[0]


def _view_pads(volume: Tensor, boxes: Sequence[Box], outside: Sequence[bool]) -> Tensor | None:
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


def _blur_taps(sigma: np.ndarray) -> np.ndarray:
    """(N,) sigmas → (N, K) float64 weights of a truncated Gaussian at offsets ``-(K // 2) … K // 2``.

    Each row is normalised and zero beyond its own ``ceil(3σ)``; K fits the largest sigma. Sigma 0 is the
    single tap 1 (the identity).
    """
    radius = math.ceil(_BLUR_TRUNCATE * float(sigma.max(initial=0.0)))
    taps = np.arange(-radius, radius + 1)
    sig = np.asarray(sigma, dtype=np.float64)[:, None]
    safe = np.where(sig > 0, sig, 1.0)
    w = np.where(sig > 0, np.exp(-0.5 * (taps / safe) ** 2), taps == 0)
    w = np.where(np.abs(taps) <= np.ceil(_BLUR_TRUNCATE * sig), w, 0.0)
    return w / w.sum(1, keepdims=True)


def _blur_matrices(sigma: np.ndarray, length: int, device: torch.device | str = "cpu") -> Tensor:
    """(N,) sigmas → (N, L, L) float32 matrices of a truncated Gaussian 1D convolution along an axis of
    ``length``, on ``device``.

    A banded matrix is the 1D convolution with its boundary handling built in (scipy's ``reflect``,
    i.e. half-sample symmetric, the reference's torchio/scipy default); one batched matmul per axis is much
    faster on a GPU than conv1d with per-view kernels. Sigma 0 gives the identity matrix (exact). The (N, K)
    tap weights are computed here on the CPU; the matrix is scattered from them on ``device``, so a GPU batch
    moves N·K weights, not N·L² entries, and never waits for the device.
    """
    w = _blur_taps(sigma)
    n, k = w.shape
    radius = k // 2
    j = (
        torch.arange(length, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)
    ).remainder_(2 * length)
    j = torch.where(j >= length, 2 * length - 1 - j, j)  # (L, K) reflected source index of each tap
    weights = torch.from_numpy(w).to(device, non_blocking=True)
    out = torch.zeros((n, length, length), dtype=torch.float64, device=device)
    out.scatter_add_(2, j.expand(n, length, k), weights[:, None, :].expand(n, length, k))
    return out.to(torch.float32)


def blur_window(sigma: np.ndarray) -> np.ndarray:
    """Kernel width ``2·ceil(3σ) + 1`` of the truncated Gaussian blur for sigmas of any shape (σ = 0 → 1)."""
    return 2 * np.ceil(_BLUR_TRUNCATE * np.asarray(sigma, dtype=np.float64)).astype(np.int64) + 1


def _blur(x: Tensor, sigma: np.ndarray) -> Tensor:
    """Separable Gaussian blur of views x (N, X, Y, Z) with per-view, per-axis sigma (N, 3) in voxels.

    On a CPU :func:`pcrl.cpu_kernels.gaussian_blur` runs each view's own taps; on a GPU three batched products
    with the banded matrices of :func:`_blur_matrices` (L multiply-adds per voxel and axis, which a GPU does
    faster than per-view convolutions). They agree to float rounding (tested).
    """
    if x.device.type == "cpu":
        from pcrl.cpu_kernels import gaussian_blur

        taps = _blur_taps(sigma.reshape(-1)).reshape(len(x), 3, -1)  # (N, 3, K), one K for every axis
        return torch.from_numpy(gaussian_blur(x.numpy(), taps))
    return _blur_by_matrices(x, sigma)


def _blur_by_matrices(x: Tensor, sigma: np.ndarray) -> Tensor:
    """:func:`_blur` as three batched products with :func:`_blur_matrices` (the GPU path; runs anywhere)."""
    n, sx, sy, sz = x.shape
    bx, by, bz = (_blur_matrices(sigma[:, a], s, x.device) for a, s in enumerate((sx, sy, sz)))
    x = torch.bmm(x.reshape(n, sx * sy, sz), bz.transpose(1, 2))  # along z
    x = torch.matmul(by[:, None], x.view(n, sx, sy, sz))  # along y, batched over x
    return torch.bmm(bx, x.view(n, sx, sy * sz)).view(n, sx, sy, sz)  # along x


def _draw_swaps(
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


def _swap_indices(corners: Tensor, size: Sequence[int], patch: Sequence[int]) -> Tensor:
    """(N, count, 2, P) indices of the voxels of every patch of ``corners`` (N, count, 2, 3) into the N views
    of ``size`` flattened together (one index space: each swap is then 2 small index reads and 2 writes)."""
    device = corners.device
    sx, sy, sz = (int(s) for s in size)
    px, py, pz = (int(p) for p in patch)
    # strides as Python ints: a stride tensor would be a blocking host→device copy on a GPU
    offsets = (
        torch.arange(px, device=device)[:, None, None] * (sy * sz)
        + torch.arange(py, device=device)[None, :, None] * sz
        + torch.arange(pz, device=device)[None, None, :]
    ).reshape(-1)  # (P,)
    start = corners[..., 0] * (sy * sz) + corners[..., 1] * sz + corners[..., 2]
    flat = start[..., None] + offsets  # (N, count, 2, P) voxel indices of each patch
    return flat + (torch.arange(len(corners), device=device) * (sx * sy * sz))[:, None, None, None]


def _swap_sources(corners: Tensor, size: Sequence[int], patch: Sequence[int]) -> Tensor:
    """(N, X*Y*Z) source index of every voxel after the sequential swaps of ``corners`` (N, count, 2, 3).

    A swap exchanges the contents of its two patches, later swaps acting on the result of earlier ones.
    Tracking where each voxel comes from turns the swaps into one gather of the data (the GPU path; on the
    CPU :func:`_swap_in_place` moves the data itself); the loop runs over the swaps only, every view at once.
    """
    device = corners.device
    n, voxels = len(corners), math.prod(int(s) for s in size)
    # per swap k: both patches' indices, and the same with the patches exchanged (where each value goes);
    # one gather and one scatter per swap (the two patches of a swap never overlap)
    both = _swap_indices(corners, size, patch).permute(1, 2, 0, 3)  # (count, 2, N, P)
    read, write = both.reshape(len(both), -1), both.flip(1).reshape(len(both), -1)
    src = torch.arange(n * voxels, device=device)
    for k in range(len(both)):
        src[write[k]] = src[read[k]]
    return src.view(n, voxels) - (torch.arange(n, device=device) * voxels)[:, None]


def _swap_in_place(views: Tensor, corners: Tensor, size: Sequence[int], patch: Sequence[int]) -> Tensor:
    """The sequential swaps of ``corners`` (N, count, 2, 3) done on CPU views (N, ...) contiguous, in place.

    Only the 2·count·P swapped voxels per view move: no source map of every voxel and no gather over the
    whole views (5x faster than :func:`_swap_sources` + gather here). numpy, because it indexes such small
    arrays with ~10x less overhead per call than torch.
    """
    views = views.contiguous()  # the data is moved through a numpy view of it
    data = views.numpy().reshape(-1)
    flat = _swap_indices(corners, size, patch).numpy()
    for k in range(corners.shape[1]):
        a, b = flat[:, k, 0].reshape(-1), flat[:, k, 1].reshape(-1)
        va = data[a]
        data[a] = data[b]
        data[b] = va
    return views


def _swap_permutation(
    size: Sequence[int], patch: Sequence[int], count: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, X*Y*Z) source index of every voxel after ``count`` sequential swaps of two non-overlapping patches
    (:func:`_draw_swaps` then :func:`_swap_sources`)."""
    corners = torch.from_numpy(_draw_swaps(size, patch, count, n, rng))
    return _swap_sources(corners, size, patch).numpy()


def _znorm_(x: Tensor) -> Tensor:
    """Per view (x - mean) / std over all voxels of x (N, ...) contiguous, std clamped away from 0, in place.

    The mean by a sum, then the variance of the centred views by a batched dot product: ~20x faster on a CPU
    core than ``var_mean`` (whose Welford loop is scalar), and as exact (the views are centred first).
    """
    n = x[0].numel()
    flat = x.view(len(x), 1, n)
    flat.sub_(flat.sum(2, keepdim=True).div_(n))
    var = torch.bmm(flat, flat.transpose(1, 2)).div_(n)  # (N, 1, 1)
    flat.mul_(var.sqrt_().clamp_(min=_MIN_STD).reciprocal_())
    return x


def _pad_stack(regions: Sequence[Tensor]) -> Tensor:
    """Zero-pad (RX, RY, RZ) regions to their common maximum size and stack them → (B, RX, RY, RZ) float32
    on the regions' device."""
    shape = [max(r.shape[a] for r in regions) for a in range(3)]
    out = regions[0].new_zeros((len(regions), *shape), dtype=torch.float32)
    for o, r in zip(out, regions, strict=True):
        o[: r.shape[0], : r.shape[1], : r.shape[2]] = r
    return out


def pack_regions(regions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """B crops (RX, RY, RZ) → their voxels back to back as float16 (N,) and their shapes (B, 3) int64.

    What a loader worker hands over for a GPU: the exact voxels (no padding to the batch's largest crop) at
    half the bytes of float32, for the pinned copy and the host→device transfer (measured in the README's
    "View backends"). float16 keeps 11 significant bits: a [0, 1] CT window of 2000 HU is rounded by at most
    0.5 HU, below the 1 HU the shards store.
    """
    shapes = torch.tensor([list(r.shape) for r in regions], dtype=torch.int64)
    flat = torch.empty(int(shapes.prod(1).sum()), dtype=torch.float16)
    at = 0
    for r in regions:
        flat[at : at + r.numel()].view(r.shape).copy_(r)
        at += r.numel()
    return flat, shapes


def region_list(flat: Tensor, shapes: Tensor) -> list[Tensor]:
    """The crops of :func:`pack_regions` as views of ``flat``: B tensors (RX, RY, RZ), no copy."""
    sizes = shapes.tolist()
    return [
        part.view(size)
        for part, size in zip(flat.split([x * y * z for x, y, z in sizes]), sizes, strict=True)
    ]


def _unpack_regions(flat: Tensor, shapes: Tensor, device: torch.device) -> Tensor:
    """Packed crops (:func:`pack_regions`) → (B, RX, RY, RZ) float32 on ``device``, zero-padded to the
    largest: one non-blocking copy of the packed voxels, then B copies on the device."""
    flat = flat.to(device, non_blocking=True)
    return _pad_stack(region_list(flat, shapes))


def collate_draws(draws: Sequence[dict[str, Any]], pack: bool = False) -> dict[str, Any]:
    """Stack B draws of :meth:`PCRLv2Views.draw` into one batch for :meth:`PCRLv2Views.render`.

    Every tensor is stacked on a new first axis, ``key`` strings become the list ``keys``. ``region`` stays
    a list of B crops (rendered one call each on the CPU, no copy), or with ``pack`` becomes the
    packed float16 voxels and ``region_shape`` (B, 3) of :func:`pack_regions`: what a loader worker hands over
    to be pinned, copied to the GPU and rendered there in one call.
    """
    if not draws:
        raise ValueError("collate_draws got an empty batch")
    batch: dict[str, Any] = {}
    for name in draws[0]:
        values = [d[name] for d in draws]
        if name == "region":
            if pack:
                batch["region"], batch["region_shape"] = pack_regions(values)
            else:
                batch["region"] = values
        elif name == "boxes":
            batch[name] = {k: torch.stack([v[k] for v in values]) for k in values[0]}
        elif isinstance(values[0], Tensor):
            batch[name] = torch.stack(values)
        else:
            batch[name + "s" if name == "key" else name] = list(values)
    return batch


class PCRLv2Views:
    """Render the PCRLv2 sub-crop views (docs/method.md §1, D1–D3), one sample or a whole batch.

    Deterministic: the same volume and seed give bit-identical views (on the same device), whether rendered
    alone or in a batch. Holds only the config, so it pickles into DataLoader workers. Works on CPU and CUDA
    tensors.

    Example::

        views = PCRLv2Views(cfg.views)
        sample = views(volume, seed=123, tissue_threshold=0.425)  # volume: (X, Y, Z) float32 in [0, 1]
        sample["global_views"].shape  # (2, 1, 64, 64, 32)
        batch = views.render(collate_draws([views.draw(v, s) for v, s in ...]), device)  # (B, 2, 1, ...)
    """

    def __init__(self, cfg: ViewsConfig) -> None:
        g, p = cfg.global_size, cfg.swap_patch
        if cfg.swap_count > 0 and all(gi < 2 * pi for gi, pi in zip(g, p, strict=True)):
            raise ValueError(
                f"views.swap_patch {list(p)} leaves no room for two non-overlapping patches in views.global_size "
                f"{list(g)}: make the patch at most half the view on one axis, or set views.swap_count=0"
            )
        self.cfg = cfg

    def __call__(
        self, volume: Tensor, seed: int, tissue_threshold: float | None = None
    ) -> dict[str, Tensor | dict[str, Tensor]]:
        """Draw and render one sample.

        Args:
            volume: (X, Y, Z) float intensities windowed to [0, 1] (CT: HU window; MRI: robust min-max),
                1 mm voxels, on any device.
            seed: seed of this sample's random stream.
            tissue_threshold: tissue threshold in the volume's [0, 1] units; None disables the tissue filter
                (e.g. MRI). Ignored when ``cfg.tissue_filter`` is false.

        Returns:
            ``global_views`` (2, 1, gx, gy, gz) float32: degraded, z-normalised network inputs;
            ``global_targets`` (2, 1, gx, gy, gz) float32: the same spatial views, not degraded, in [0, 1];
            ``local_views`` (num_locals, 1, lx, ly, lz) float32: degraded, z-normalised local sub-crops;
            ``boxes``: ``{"global": (2, 2, 3), "local": (num_locals, 2, 3)}`` int64 CPU tensors of
            (start, size) per box, in voxels (x, y, z).

        Raises:
            ValueError: ``volume`` is not a 3D floating tensor, or the sampled region holds NaN/Inf.
        """
        batch = self.render(collate_draws([self.draw(volume, seed, tissue_threshold)]), volume.device)
        return {
            k: ({b: t[0] for b, t in v.items()} if isinstance(v, dict) else v[0])
            for k, v in batch.items()
            if k != "keys"
        }

    # -- per sample, on the CPU ------------------------------------------------------------------------

    def draw(self, volume: Tensor, seed: int, tissue_threshold: float | None = None) -> dict[str, Any]:
        """Draw every random choice of one sample from its seed and cut the volume regions its views read.

        The geometry comes from the sampler above (:func:`sample_global_pair`, :func:`sample_local_boxes`,
        :func:`sample_spatial_params`, :func:`view_affines`); every renderer (this torch one, ``pcrl.dali``)
        renders these draws.

        Args:
            volume: (X, Y, Z) float intensities in [0, 1], any device.
            seed: seed of this sample's random stream.
            tissue_threshold: see :meth:`__call__`.

        Returns:
            A dict of tensors (``collate_draws`` stacks it): ``region`` (RX, RY, RZ), the crop of the volume
            that every view of the sample reads (a view of ``volume``), with its ``origin`` (3,),
            ``volume_shape`` (3,), ``global_affines`` / ``local_affines`` (V, 3, 4) float64 output → volume
            maps, ``*_pad`` (V,) values outside the volume, ``outside`` () bool (any view reaches outside the
            volume), ``sigma`` (2+L, 3), ``noise_std`` (2+L,), ``gamma`` (2+L,),
            ``noise_seed`` () int64, ``swaps`` (2, swap_count, 2, 3) int64 patch corners and ``boxes``.
            Views are ordered globals first, then locals.

        Raises:
            ValueError: ``volume`` is not a 3D floating tensor.
        """
        return self.cut(volume, self.plan(volume, seed, tissue_threshold))

    def plan(self, volume: Tensor, seed: int, tissue_threshold: float | None = None) -> ViewPlan:
        """Every random choice of one sample, from its seed: the geometry sampler (with the tissue filter, which
        reads ``volume``) and the augmentation parameters, without touching the views' voxels.

        Raises:
            ValueError: ``volume`` is not a 3D floating tensor.
        """
        if volume.dim() != 3 or not volume.is_floating_point():
            raise ValueError(
                f"expected one (X, Y, Z) floating-point volume, got shape {tuple(volume.shape)} of {volume.dtype}"
            )
        cfg, shape = self.cfg, tuple(volume.shape)
        rng = np.random.default_rng(seed)
        box1, box2 = sample_global_pair(shape, cfg, rng, volume, tissue_threshold)
        local_boxes = sample_local_boxes(shape, box1, box2, cfg, rng)
        global_params = sample_spatial_params(2, cfg, rng)
        local_params = sample_spatial_params(cfg.num_locals, cfg, rng)
        # intensity: blur → noise → gamma → swap (globals only) → z-normalisation; drawn in this order
        noise_seed = int(rng.integers(0, 2**63 - 1))
        g_sigma, g_std, g_gamma = self._draw_degrade(2, rng)
        if cfg.swap_count > 0:
            swaps = _draw_swaps(cfg.global_size, cfg.swap_patch, cfg.swap_count, 2, rng)
        else:
            swaps = np.zeros((2, 0, 2, 3), np.int64)
        l_sigma, l_std, l_gamma = self._draw_degrade(cfg.num_locals, rng)
        return ViewPlan(
            shape=shape,
            global_boxes=(box1, box2),
            local_boxes=tuple(local_boxes),
            global_params=global_params,
            local_params=local_params,
            noise_seed=noise_seed,
            sigma=np.concatenate([g_sigma, l_sigma]),
            noise_std=np.concatenate([g_std, l_std]),
            gamma=np.concatenate([g_gamma, l_gamma]),
            swaps=swaps,
        )

    def cut(self, volume: Tensor, plan: ViewPlan) -> dict[str, Any]:
        """The draw of :meth:`draw` for a :meth:`plan` of this volume: view affines and the regions they read."""
        cfg, shape = self.cfg, tuple(volume.shape)
        if shape != plan.shape:
            raise ValueError(f"the plan was drawn for a volume of shape {plan.shape}, got {shape}")
        out: dict[str, Any] = {}
        outside = False
        # One region per sample, the box every view reads: the local boxes lie inside the global ones, so it
        # is the globals' region, and a GPU batch moves each voxel once.
        lo, hi = list(shape), [0, 0, 0]
        for name, boxes, size, params in (
            ("global", plan.global_boxes, cfg.global_size, plan.global_params),
            ("local", plan.local_boxes, cfg.local_size, plan.local_params),
        ):
            affines = view_affines(boxes, size, params)
            view_lo, view_hi, out_flags = _read_region(affines, size, shape)
            lo = [min(a, b) for a, b in zip(lo, view_lo, strict=True)]
            hi = [max(a, b) for a, b in zip(hi, view_hi, strict=True)]
            pads = _view_pads(volume, boxes, out_flags)
            outside = outside or pads is not None
            out[f"{name}_affines"] = affines
            out[f"{name}_pad"] = torch.full((len(boxes),), math.nan) if pads is None else pads
        out.update(
            region=volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]],
            origin=torch.tensor(lo),
            volume_shape=torch.tensor(shape),
            outside=torch.tensor(outside),
            sigma=torch.from_numpy(plan.sigma),
            noise_std=torch.from_numpy(plan.noise_std),
            gamma=torch.from_numpy(plan.gamma),
            noise_seed=torch.tensor(plan.noise_seed),
            swaps=torch.from_numpy(plan.swaps),
            boxes={
                "global": torch.tensor([[b.start, b.size] for b in plan.global_boxes], dtype=torch.int64),
                "local": torch.tensor([[b.start, b.size] for b in plan.local_boxes], dtype=torch.int64),
            },
        )
        return out

    def _draw_degrade(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blur sigma (n, 3), noise std (n,) and gamma (n,) of n views."""
        cfg = self.cfg
        sigma = rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], size=(n, 3))
        std = rng.uniform(cfg.noise_std[0], cfg.noise_std[1], size=n)
        gamma = np.exp(rng.uniform(-cfg.gamma_log_range, cfg.gamma_log_range, size=n))
        return sigma, std, gamma

    # -- per batch, on the CPU or the GPU --------------------------------------------------------------

    def render(self, batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """Render a batch of draws (:func:`collate_draws`) on ``device`` (default: where the regions are).

        One resampling call for all global views of the batch and one for all local views (on a CPU one each
        per sample, :func:`_resample_cpu`), then the intensity steps batched over every view. No host
        synchronisation on a GPU (the NaN check runs on the CPU only; on a GPU a NaN reaches the loss, whose
        check stops the run).

        Returns:
            ``global_views`` / ``global_targets`` (B, 2, 1, gx, gy, gz), ``local_views`` (B, L, 1, lx, ly, lz)
            float32 on ``device``, ``boxes`` ``{"global": (B, 2, 2, 3), "local": (B, L, 2, 3)}`` and
            ``keys`` where the draws had them.

        Raises:
            ValueError: (CPU) the sampled region holds NaN/Inf.
        """
        regions = batch["region"]
        if device is None:
            device = (regions if isinstance(regions, Tensor) else regions[0]).device
        device = torch.device(device)
        if "region_shape" in batch:  # packed by a loader worker for this device
            regions = _unpack_regions(regions, batch["region_shape"], device)
        elif device.type != "cpu":
            regions = _pad_stack([r.to(device, non_blocking=True) for r in regions])
        targets = self._spatial(batch, "global", regions)  # (B, 2, gx, gy, gz)
        locals_ = self._spatial(batch, "local", regions)  # (B, L, lx, ly, lz)
        if device.type == "cpu" and not torch.isfinite(targets.sum() + locals_.sum()):
            shapes = sorted({tuple(s) for s in batch["volume_shape"].tolist()})
            raise ValueError(f"volume of shape {shapes} holds NaN or Inf values in the sampled region")
        sigma = batch["sigma"].cpu().numpy()
        blurred_g = _blur(targets.flatten(0, 1), sigma[:, :2].reshape(-1, 3)).view_as(targets)
        blurred_l = _blur(locals_.flatten(0, 1), sigma[:, 2:].reshape(-1, 3)).view_as(locals_)
        return self._finish(batch, targets, blurred_g, blurred_l)

    def _spatial(self, batch: dict[str, Any], name: str, regions: Tensor | Sequence[Tensor]) -> Tensor:
        """The ``name`` views of the batch, spatial steps only, from its regions (a list of CPU crops, or
        (B, RX, RY, RZ) float32 on the device): (B, V, ...) float32."""
        size = self.cfg.global_size if name == "global" else self.cfg.local_size
        pads = batch[f"{name}_pad"] if bool(batch["outside"].any()) else None
        return _resample(
            regions,
            batch["origin"],
            batch["volume_shape"],
            batch[f"{name}_affines"],
            pads,
            size,
        )

    def _finish(
        self, batch: dict[str, Any], targets: Tensor, blurred_g: Tensor, blurred_l: Tensor
    ) -> dict[str, Any]:
        """Noise → gamma → swap (globals) → z-normalisation of blurred views, shared by every renderer.

        The noise of sample b comes from a generator seeded with its ``noise_seed`` (globals first, then
        locals), so a sample's views do not depend on the batch it is rendered in.
        """
        cfg, device = self.cfg, targets.device
        b, n_g = targets.shape[:2]
        noise = torch.Generator(device=device)
        g_noise, l_noise = torch.empty_like(blurred_g), torch.empty_like(blurred_l)
        for i, seed in enumerate(batch["noise_seed"].tolist()):
            noise.manual_seed(seed)
            torch.randn(blurred_g.shape[1:], generator=noise, device=device, out=g_noise[i])
            torch.randn(blurred_l.shape[1:], generator=noise, device=device, out=l_noise[i])
        std = batch["noise_std"].to(device, torch.float32, non_blocking=True)
        gamma = batch["gamma"].to(device, torch.float32, non_blocking=True)
        views = []
        for x, eps, sl in ((blurred_g, g_noise, slice(0, n_g)), (blurred_l, l_noise, slice(n_g, None))):
            shape = (*x.shape[:2], 1, 1, 1)
            x = x.add_(eps.mul_(std[:, sl].reshape(shape)))  # x is the blur's own output, never the targets
            # sign(x)|x|^γ; exp(γ log|x|) is ~2× faster than pow on CPU and maps 0 to 0
            views.append(x.abs().log_().mul_(gamma[:, sl].reshape(shape)).exp_().copysign_(x))
        global_views, local_views = views
        if cfg.swap_count > 0:
            corners = batch["swaps"].to(device, non_blocking=True).flatten(0, 1)  # (B·2, count, 2, 3)
            if device.type == "cpu":
                global_views = _swap_in_place(global_views, corners, cfg.global_size, cfg.swap_patch)
            else:
                src = _swap_sources(corners, cfg.global_size, cfg.swap_patch)
                global_views = global_views.reshape(b * n_g, -1).gather(1, src).view_as(global_views)
        out: dict[str, Any] = {
            "global_views": _znorm_(global_views.flatten(0, 1)).view_as(global_views)[:, :, None],
            "global_targets": targets[:, :, None],
            "local_views": _znorm_(local_views.flatten(0, 1)).view_as(local_views)[:, :, None],
            "boxes": batch["boxes"],
        }
        if "keys" in batch:
            out["keys"] = batch["keys"]
        return out

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``collate_fn`` of a loader whose workers render on the CPU: stack the draws, render the batch."""
        return self.render(collate_draws(samples), torch.device("cpu"))


def build_renderer(cfg: ViewsConfig, device: torch.device | str, max_batch_size: int) -> PCRLv2Views:
    """The renderer ``views.backend`` asks for, on ``device`` (where the training process computes).

    ``torch`` renders on CPU in the loader workers or, on a GPU, in the training process; ``dali`` renders
    with a DALI pipeline (CPU mode without a GPU); ``auto`` takes the renderer measured fastest by
    ``bench/views.py``, which is torch on both: on a CPU core 3-4x DALI's CPU mode, and on an H100 2,200
    samples/s at batch 32 against DALI's 118.

    Raises:
        ImportError: ``views.backend=dali`` without DALI installed (names the extra to install).
    """
    device = torch.device(device)
    if cfg.backend == "dali":
        from pcrl.dali import DALIViews

        device_id = None if device.type == "cpu" else (device.index or 0)
        return DALIViews(cfg, device_id=device_id, max_batch_size=max_batch_size)
    return PCRLv2Views(cfg)
