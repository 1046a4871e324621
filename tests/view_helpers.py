"""What the view tests share: a small views config and a smooth test volume, and the reference renderings
they compare pcrl.views against (one volume's views in one stacked ``grid_sample`` call, and the swap
permutation of freshly drawn patches). Only the tests use them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pcrl.config import ViewsConfig
from pcrl.views.geometry import Box, SpatialParams, draw_swaps, read_region, view_affines, view_pads
from pcrl.views.ops import resample, swap_sources

SHAPE = (80, 80, 48)


def tiny_cfg(**overrides) -> ViewsConfig:
    """Views small enough for many draws in a test (32×32×16 global, 8³ local), with ``overrides``."""
    base = {
        "global_size": (32, 32, 16),
        "local_size": (8, 8, 8),
        "global_crop_sizes": [[48, 48, 32], [48, 48, 48], [56, 56, 32], [32, 32, 16]],
        "local_crop_sizes": [[16, 16, 8], [8, 8, 8], [16, 16, 16], [4, 4, 4]],
        "border": (8, 8, 4),
        "swap_patch": (4, 2, 2),
    }
    base.update(overrides)
    return ViewsConfig(**base)


def smooth_volume(shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """A random smooth volume in [0, 1] (trilinear upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(s // 8 + 2 for s in shape), generator=g)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].contiguous()


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
    lo, hi, outside = read_region(affines, out_size, volume.shape)
    region = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].to(torch.float32)
    pads = view_pads(volume, boxes, outside)
    return resample(
        region[None],
        torch.tensor([lo]),
        torch.tensor([list(volume.shape)]),
        affines[None],
        None if pads is None else pads[None],
        out_size,
    )[0]


def swap_permutation(
    size: Sequence[int], patch: Sequence[int], count: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, X*Y*Z) source index of every voxel after ``count`` sequential swaps of two non-overlapping patches
    (:func:`draw_swaps` then :func:`swap_sources`)."""
    corners = torch.from_numpy(draw_swaps(size, patch, count, n, rng))
    return swap_sources(corners, size, patch).numpy()
