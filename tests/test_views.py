"""Tests of pcrl.views: the PCRLv2 sub-crop sampler and its torch renderer (tiny config, synthetic volumes)."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from view_helpers import SHAPE, render_views, smooth_volume, swap_permutation, tiny_cfg

from pcrl.views import (
    Box,
    PCRLv2Views,
    SpatialParams,
    TissueIntegral,
    box_iou,
    collate_draws,
    pack_regions,
    region_list,
    sample_global_pair,
    sample_local_boxes,
    sample_spatial_params,
    tissue_score,
    union_box,
    view_affines,
)
from pcrl.views.cpu_kernels import resample_affine
from pcrl.views.geometry import draw_box_starts
from pcrl.views.ops import (
    blur,
    blur_by_matrices,
    pad_stack,
    resample,
    sampling_grid,
    swap_in_place,
)

SEEDS = range(200)


NO_INTENSITY = {"blur_sigma": (0.0, 0.0), "noise_std": (0.0, 0.0), "gamma_log_range": 0.0, "swap_count": 0}


def random_volume(shape=(30, 26, 22), seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def inside(box: Box, shape) -> bool:
    return all(
        s >= 0 and e <= n and z > 0 for s, e, z, n in zip(box.start, box.end, box.size, shape, strict=True)
    )


def identity(n: int) -> SpatialParams:
    return SpatialParams.identity(n)


# --- geometry --------------------------------------------------------------------------------------


def test_box_iou_and_union_hand_computed():
    """Pins the IoU formula (intersection over union, not over the smaller box) and the union box."""
    a, b = Box((0, 0, 0), (4, 4, 4)), Box((2, 0, 0), (4, 4, 4))
    assert box_iou(a, b) == pytest.approx(32 / (64 + 64 - 32))
    assert box_iou(a, Box((10, 0, 0), (2, 2, 2))) == 0.0
    assert box_iou(a, a) == 1.0
    u = union_box(a, Box((1, 5, 2), (2, 2, 6)))
    assert u == Box((0, 0, 0), (4, 7, 8))
    assert u.end == (4, 7, 8) and u.volume == 4 * 7 * 8


def test_sample_global_pair_iou_and_inside_over_many_seeds():
    """Pins the IoU acceptance rule and the border margins: every pair has IoU > min_iou, boxes in the volume."""
    cfg = tiny_cfg()
    for seed in SEEDS:
        b1, b2 = sample_global_pair(SHAPE, cfg, np.random.default_rng(seed))
        assert box_iou(b1, b2) > cfg.min_iou, seed
        for b in (b1, b2):
            assert inside(b, SHAPE)
            assert list(b.size) in cfg.global_crop_sizes
            # the border holds where the volume leaves room for it
            for ax in range(3):
                if SHAPE[ax] - b.size[ax] >= 2 * cfg.border[ax]:
                    assert cfg.border[ax] <= b.start[ax] <= SHAPE[ax] - b.size[ax] - cfg.border[ax]


def test_sample_global_pair_small_volume_clamps_crop_and_margin():
    """Pins the small-volume rules: a crop larger than the volume is clamped, the margin shrinks (no crash,
    unlike the reference's z-padding branch)."""
    shape = (30, 100, 14)
    cfg = tiny_cfg()
    for seed in range(50):
        b1, b2 = sample_global_pair(shape, cfg, np.random.default_rng(seed))
        for b in (b1, b2):
            assert inside(b, shape)
            assert b.size[0] == 30 and b.size[2] == 14  # every candidate size is larger on x and z


def test_sample_global_pair_terminates_without_valid_pair():
    """Pins termination: with an unreachable IoU the best-IoU candidate is returned after max_tries."""
    cfg = tiny_cfg(min_iou=0.999, global_crop_sizes=[[32, 32, 16], [48, 48, 32]], max_tries=20)
    rng = np.random.default_rng(0)
    b1, b2 = sample_global_pair(SHAPE, cfg, rng)
    assert inside(b1, SHAPE) and inside(b2, SHAPE)


def test_sample_local_boxes_inside_union_with_margin():
    """Pins the sub-crop rule: every local box lies inside the union box ± margin and inside the volume."""
    cfg = tiny_cfg()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        b1, b2 = sample_global_pair(SHAPE, cfg, rng)
        boxes = sample_local_boxes(SHAPE, b1, b2, cfg, rng)
        assert len(boxes) == cfg.num_locals
        u, m = union_box(b1, b2), cfg.local_margin
        for b in boxes:
            assert inside(b, SHAPE)
            assert list(b.size) in cfg.local_crop_sizes
            assert all(
                us - m <= s and e <= ue + m
                for s, e, us, ue in zip(b.start, b.end, u.start, u.end, strict=True)
            )


def test_sample_local_boxes_never_truncated_at_volume_border():
    """Pins the fix of reference bug, docs/method.md R9: locals at the volume border keep their full size."""
    cfg = tiny_cfg(local_crop_sizes=[[16, 16, 16]], num_locals=50)
    shape = (60, 60, 40)
    b1 = b2 = Box((44, 44, 24), (16, 16, 16))  # touching the far corner
    for b in sample_local_boxes(shape, b1, b2, cfg, np.random.default_rng(0)):
        assert b.size == (16, 16, 16) and inside(b, shape)


def test_tissue_score_hand_computed():
    """Pins the tissue score: first tissue slice k of d..d+depth-1 scores 1 - k/(depth-1)."""
    vol = torch.zeros(4, 2, 3)
    vol[:2, :, 1] = 1.0  # half of the columns: tissue at the second slice only → 0.5 each
    vol[3, :, 0] = 1.0  # a quarter: tissue at the first slice → 1
    assert tissue_score(vol, Box((0, 0, 0), (4, 2, 3)), 0.5, 3) == pytest.approx(0.5 * 0.5 + 0.25)
    # bfloat16 takes the torch path (the one CUDA tensors take): same answer
    assert tissue_score(vol.bfloat16(), Box((0, 0, 0), (4, 2, 3)), 0.5, 3) == pytest.approx(0.5 * 0.5 + 0.25)
    vol2 = torch.zeros(2, 2, 3)
    vol2[..., 2] = 1.0  # tissue only at the last slice counts as none
    assert tissue_score(vol2, Box((0, 0, 0), (2, 2, 3)), 0.5, 3) == 0.0


def test_tissue_filter_rejects_tissue_dominated_crops():
    """Pins the tissue filter: on a half-tissue / half-air volume every accepted view scores <= the max
    fraction (and without the filter many would not, so the test has teeth)."""
    shape = (160, 80, 48)
    vol = torch.zeros(shape)
    vol[:80] = 1.0
    cfg = tiny_cfg(
        max_tries=400
    )  # ~5 % of draws are acceptable here: make the fallback (7 % at 50) negligible

    def worst(boxes):
        return max(tissue_score(vol, b, 0.5, cfg.tissue_depth) for b in boxes)

    filtered = [worst(sample_global_pair(shape, cfg, np.random.default_rng(s), vol, 0.5)) for s in range(60)]
    unfiltered = [worst(sample_global_pair(shape, cfg, np.random.default_rng(s))) for s in range(60)]
    assert max(filtered) <= cfg.tissue_max_fraction
    assert sum(u > cfg.tissue_max_fraction for u in unfiltered) > 10
    # the filter is off with tissue_filter=False or without a threshold
    off = tiny_cfg(tissue_filter=False)
    assert sample_global_pair(shape, off, np.random.default_rng(0), vol, 0.5) == sample_global_pair(
        shape, off, np.random.default_rng(0)
    )


def test_tissue_integral_equals_exact_score_on_random_boxes():
    """Pins the integral-image tissue score to :func:`tissue_score`: bit-identical at depth 2 and 3, within
    1e-12 at depth 4 and 5, over random boxes down to depth-thin ones and at the region's edges."""
    g = torch.Generator().manual_seed(3)
    vol = (torch.rand(40, 36, 30, generator=g) < 0.3).float() * 0.4 + smooth_volume((40, 36, 30), 4) * 0.6
    lo, hi = np.array([2, 3, 1]), np.array([38, 36, 29])
    rng = np.random.default_rng(0)
    for depth, wrapped in ((2, False), (3, False), (3, True), (4, True), (5, False)):
        # wrapped: sums modulo 2^16 (uint16), exact while a box's x·y area stays under max_box_area
        area = int((hi - lo)[:2].prod()) if wrapped else None
        integral = TissueIntegral(vol, 0.45, depth, lo.tolist(), hi.tolist(), max_box_area=area)
        assert integral.integral.dtype == (np.uint16 if wrapped else np.int32)
        sizes = rng.integers([1, 1, depth], hi - lo + 1, size=(300, 3))
        starts = rng.integers(lo, hi - sizes + 1)
        fast = integral.scores(starts, sizes)
        exact = np.array(
            [
                tissue_score(vol, Box(tuple(s), tuple(z)), 0.45, depth)
                for s, z in zip(starts, sizes, strict=True)
            ]
        )
        assert 0.05 < exact.mean() < 0.95  # the volume mixes tissue and air: the test has teeth
        if depth <= 3:
            assert np.array_equal(fast, exact)
        else:
            np.testing.assert_allclose(fast, exact, rtol=1e-12, atol=0)
    # bfloat16 (the path CUDA tensors take) gives the same scores
    bf = vol.bfloat16()
    box = np.array([[2, 3, 1]]), np.array([[30, 20, 10]])
    assert TissueIntegral(bf, 0.45, 3, lo.tolist(), hi.tolist()).scores(*box)[0] == tissue_score(
        bf, Box((2, 3, 1), (30, 20, 10)), 0.45, 3
    )


def test_tissue_integral_uint16_wraps_and_stays_exact():
    """The uint16 integral of a volume wide enough for its sums to wrap modulo 2^16 (the small volume above
    never wraps) scores boxes within ``max_box_area`` exactly as the unwrapped int32 one and
    :func:`tissue_score`, and refuses a box wider than that area."""
    g = torch.Generator().manual_seed(5)
    shape, depth, area = (300, 300, 8), 3, 64 * 64
    vol = (torch.rand(*shape, generator=g) < 0.3).float() * 0.4 + smooth_volume(shape, 6) * 0.6
    lo, hi = [0, 0, 0], list(shape)
    exact_sums = TissueIntegral(vol, 0.45, depth, lo, hi)
    wrapped = TissueIntegral(vol, 0.45, depth, lo, hi, max_box_area=area)
    assert wrapped.integral.dtype == np.uint16 and exact_sums.integral.dtype == np.int32
    assert exact_sums.integral.max() >= 2**16  # the uint16 sums really wrap
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(1, 65, size=(200, 2)), rng.integers(depth, 9, size=(200, 1))], 1)
    sizes = sizes[sizes[:, 0] * sizes[:, 1] <= area]
    starts = rng.integers(0, np.array(shape) - sizes + 1)
    fast = wrapped.scores(starts, sizes)
    assert np.array_equal(fast, exact_sums.scores(starts, sizes))
    exact = [
        tissue_score(vol, Box(tuple(s), tuple(z)), 0.45, depth)
        for s, z in zip(starts[:40], sizes[:40], strict=True)
    ]
    assert np.array_equal(fast[:40], np.array(exact)) and 0.05 < fast.mean() < 0.95
    with pytest.raises(ValueError, match="max_box_area"):
        wrapped.scores(np.array([[0, 0, 0]]), np.array([[65, 64, depth]]))


@pytest.mark.parametrize("shape", [(160, 80, 48), (90, 70, 2)])
def test_tissue_filter_selects_like_the_sequential_rule(shape):
    """Pins the vectorised tissue filter to the rule it implements, scored box by box with tissue_score: the
    first IoU-valid candidate whose two views pass, else the first valid one with the lowest worst score.
    The (90, 70, 2) volume is thinner than tissue_depth (boxes scored directly)."""
    # tissue on the lower half in x, patchy air above: a few % of the pairs pass (both branches are taken)
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    vol = torch.where(torch.arange(shape[0])[:, None, None] < shape[0] // 2, 1.0, noise * 0.55)
    cfg = tiny_cfg(max_tries=60)
    table = np.asarray(cfg.global_crop_sizes)
    fallbacks = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        sizes = np.minimum(table[rng.integers(0, len(table), size=(cfg.max_tries, 2))], shape)
        starts = draw_box_starts(np.asarray(shape), sizes, np.asarray(cfg.border), rng)
        pairs = [
            tuple(Box(tuple(s), tuple(z)) for s, z in zip(st, sz, strict=True))
            for st, sz in zip(starts, sizes, strict=True)
        ]
        valid = [p for p in pairs if box_iou(*p) > cfg.min_iou]
        worst = [max(tissue_score(vol, b, 0.5, cfg.tissue_depth) for b in p) for p in valid]
        passing = [p for p, w in zip(valid, worst, strict=True) if w <= cfg.tissue_max_fraction]
        expected = passing[0] if passing else valid[int(np.argmin(worst))]
        fallbacks += not passing
        got = sample_global_pair(shape, cfg, np.random.default_rng(seed), vol, 0.5)
        assert got == expected, seed
    assert 0 < fallbacks < 40  # both branches of the rule are exercised


def test_tissue_filter_sees_in_place_changes_of_a_cached_volume():
    """Pins the per-volume cache of the tissue integral: an in-place change of the volume (or another volume
    of the same shape) is scored afresh, never from the integral of what the tensor held before."""
    cfg = tiny_cfg()
    vol = smooth_volume(SHAPE, 6)
    first = [sample_global_pair(SHAPE, cfg, np.random.default_rng(s), vol, 0.5) for s in range(10)]
    vol.mul_(0.2)  # now all air
    after = [sample_global_pair(SHAPE, cfg, np.random.default_rng(s), vol, 0.5) for s in range(10)]
    fresh = [sample_global_pair(SHAPE, cfg, np.random.default_rng(s), vol.clone(), 0.5) for s in range(10)]
    assert after == fresh and after != first
    other = smooth_volume(SHAPE, 6)
    assert [sample_global_pair(SHAPE, cfg, np.random.default_rng(s), other, 0.5) for s in range(10)] == first


def test_tissue_filter_terminates_on_all_tissue_volume():
    """Pins termination of the tissue filter: an all-tissue volume still yields an IoU-valid pair and views."""
    cfg = tiny_cfg()
    vol = torch.ones(SHAPE)
    b1, b2 = sample_global_pair(SHAPE, cfg, np.random.default_rng(0), vol, 0.5)
    assert box_iou(b1, b2) > cfg.min_iou
    out = PCRLv2Views(cfg)(vol * 0.7, seed=0, tissue_threshold=0.5)
    assert out["global_views"].shape == (2, 1, 32, 32, 16)


# --- rendering -------------------------------------------------------------------------------------


def test_render_identity_equals_exact_slice():
    """Pins axis order and the half-voxel convention: a same-size crop with identity augment is the slice."""
    vol = random_volume()
    box = Box((5, 7, 3), (12, 10, 6))  # distinct sizes on every axis
    out = render_views(vol, [box], box.size, identity(1))[0]
    torch.testing.assert_close(out, vol[box.slices], atol=1e-4, rtol=0)


def test_render_resize_equals_slice_plus_trilinear_interpolate():
    """Pins crop → resize: no augment equals the plain slice resized by F.interpolate(trilinear)."""
    vol = random_volume()
    box, out_size = (
        Box((2, 4, 1), (24, 20, 15)),
        (12, 10, 6),
    )  # down-sampling only: interpolate clamps at edges
    out = render_views(vol, [box], out_size, identity(1))[0]
    ref = F.interpolate(vol[box.slices][None, None], size=out_size, mode="trilinear", align_corners=False)[
        0, 0
    ]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_render_flip_x_reverses_x_axis():
    """Pins the flip: flipping axis 0 reverses x (and only x)."""
    vol = random_volume()
    box = Box((5, 7, 3), (12, 10, 6))
    params = SpatialParams(np.array([[True, False, False]]), np.ones((1, 3)), np.zeros((1, 3)))
    out = render_views(vol, [box], box.size, params)[0]
    torch.testing.assert_close(out, vol[box.slices].flip(0), atol=1e-4, rtol=0)


def test_render_rotation_is_about_the_box_centre():
    """Pins the rotation centre and direction: 90° about z of a square box is rot90 of the slice."""
    vol = random_volume()
    box = Box((6, 5, 4), (10, 10, 7))
    params = SpatialParams(np.zeros((1, 3), bool), np.ones((1, 3)), np.array([[0.0, 0.0, math.pi / 2]]))
    out = render_views(vol, [box], box.size, params)[0]
    torch.testing.assert_close(out, torch.rot90(vol[box.slices], -1, (0, 1)), atol=1e-4, rtol=0)


def test_render_batches_views_independently():
    """Pins the stacked-grid batching: a view rendered in a batch equals the view rendered alone."""
    vol = random_volume()
    boxes = [Box((1, 2, 3), (16, 12, 8)), Box((9, 8, 7), (20, 16, 12))]
    params = sample_spatial_params(2, tiny_cfg(flip_axes=[0, 1, 2]), np.random.default_rng(3))
    both = render_views(vol, boxes, (8, 8, 4), params)
    for i in range(2):
        one = SpatialParams(params.flip[i : i + 1], params.scale[i : i + 1], params.rotation[i : i + 1])
        alone = render_views(vol, boxes[i : i + 1], (8, 8, 4), one)[0]
        torch.testing.assert_close(
            both[i], alone, atol=1e-5, rtol=0
        )  # the read region differs: float rounding


def test_render_grid_matches_affine_grid():
    """Pins the separable grid construction against F.affine_grid with the equivalent theta."""
    boxes = [Box((3, 4, 5), (20, 16, 12)), Box((0, 1, 2), (8, 8, 8))]
    params = sample_spatial_params(
        2, tiny_cfg(flip_axes=[0, 1, 2], rotation_deg=30.0), np.random.default_rng(0)
    )
    out_size = (8, 6, 4)
    affines = view_affines(boxes, out_size, params)
    origin, extent = (
        torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64),
        torch.tensor([30.0, 25.0, 20.0], dtype=torch.float64),
    )
    grid = sampling_grid(affines, out_size, origin, extent, torch.device("cpu"))
    # theta in (x, y, z) order maps normalised output v to normalised input: w = K diag(n)/2 v + (K n/2 + k0)
    n = torch.tensor(out_size, dtype=torch.float64)
    k = 2.0 * affines[..., :3] / extent[:, None]
    k0 = 2.0 * (affines[..., 3] - origin) / extent - 1.0
    theta = torch.cat([k * n / 2, (k @ (n / 2) + k0)[..., None]], -1)
    theta = torch.cat([theta[:, :, :3].flip(1).flip(2), theta[:, :, 3:].flip(1)], -1)  # (x, y, z) → (z, y, x)
    ref = F.affine_grid(theta.float(), (2, 1, *out_size), align_corners=False)
    torch.testing.assert_close(grid, ref, atol=1e-5, rtol=0)


def test_render_out_of_volume_takes_box_minimum():
    """Pins the padding: samples outside the volume take the view box's minimum, not 0."""
    vol = 0.5 + 0.5 * random_volume()
    box = Box((0, 0, 0), (8, 8, 8))
    params = SpatialParams(np.zeros((1, 3), bool), np.full((1, 3), 0.5), np.zeros((1, 3)))  # zoom out 2×
    out = render_views(vol, [box], (8, 8, 8), params)[0]
    pad = vol[box.slices].min()
    assert out[0, 0, 0].item() == pytest.approx(pad.item(), abs=1e-6)  # far outside: pure padding
    assert out.min() >= pad - 1e-6
    # a box well inside is not affected by padding
    inner = render_views(vol, [Box((10, 9, 8), (8, 8, 8))], (8, 8, 8), params)[0]
    assert inner.min() >= vol.min()


def test_cpu_resampler_equals_grid_sample():
    """Pins the CPU renderer's resampler (:mod:`pcrl.views.cpu_kernels`, a list of regions) against ``grid_sample``
    (the GPU path, a stacked batch) on the same draws: strong rotations, flips on every axis, zoom in and
    out, views reaching outside the volume (the pad fill), regions that are strided slices of their volume,
    and float16 crops. Both are trilinear with the same convention, so they agree to float rounding."""
    cfg = tiny_cfg(flip_axes=[0, 1, 2], rotation_deg=30.0, scale_range=(0.6, 1.4))
    views = PCRLv2Views(cfg)
    vols = [smooth_volume(seed=s) for s in range(3)] + [smooth_volume((52, 50, 36), seed=4)]
    draws = [views.draw(vols[i % len(vols)], i, 0.6) for i in range(8)]
    batch = collate_draws(draws)
    assert bool(batch["outside"].any()) and not all(r.is_contiguous() for r in batch["region"])
    for regions in (batch["region"], [r.to(torch.float16) for r in batch["region"]]):
        for name, size in (("global", cfg.global_size), ("local", cfg.local_size)):
            args = (
                batch["origin"],
                batch["volume_shape"],
                batch[f"{name}_affines"],
                batch[f"{name}_pad"],
                size,
            )
            cpu = resample(regions, *args)
            ref = resample(pad_stack([r.to(torch.float32) for r in regions]), *args)
            assert cpu.shape == ref.shape == (8, *batch[f"{name}_affines"].shape[1:2], *size)
            torch.testing.assert_close(cpu, ref, atol=2e-5, rtol=0)


def test_resample_affine_hand_computed():
    """Pins :func:`resample_affine` on its own: the identity map returns the region, a half-voxel shift
    averages neighbours, corners outside the region read the view's pad value, and arrays of the wrong
    shape are refused rather than read or written past (the kernel checks no bounds)."""
    region = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6).numpy()
    lin = np.eye(3)[None].repeat(3, 0)
    off = np.array([[-0.5, -0.5, -0.5], [-0.5, -0.5, 0.0], [-1.5, -0.5, -0.5]])  # identity, +½ z, -1 x
    out = resample_affine(region, lin, off, np.array([0.0, 0.0, -7.0], np.float32), (4, 5, 6))
    np.testing.assert_allclose(out[0], region, atol=1e-5)
    np.testing.assert_allclose(out[1, :, :, :5], (region[..., :5] + region[..., 1:]) / 2, atol=1e-5)
    # the last z row: half its corners lie outside, where the pad is 0
    np.testing.assert_allclose(out[1, :, :, 5], region[..., 5] / 2, atol=1e-5)
    np.testing.assert_allclose(out[2, 1:], region[:3], atol=1e-5)
    np.testing.assert_allclose(out[2, 0], np.full((5, 6), -7.0), atol=1e-5)  # x = -1: outside, the pad
    pad = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="shape"):
        resample_affine(region, lin, off, pad, (4, 5, 6), out=np.empty((3, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="pad"):
        resample_affine(region, lin, off, pad[:2], (4, 5, 6))


# --- intensity -------------------------------------------------------------------------------------


# the CPU kernel (what blur runs on a CPU) and the banded matrices (what it runs on a GPU)
BLURS = pytest.mark.parametrize("blur", [blur, blur_by_matrices], ids=["cpu_kernel", "matrices"])


@BLURS
def test_blur_sigma_zero_is_identity_and_sigma_lowers_noise_variance(blur):
    """Pins the blur: sigma 0 returns the input exactly; a larger sigma removes more noise variance."""
    x = torch.randn(3, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(blur(x, np.zeros((3, 3))), x)
    sigmas = np.array([[0.5] * 3, [1.0] * 3, [2.0] * 3])
    var = blur(x, sigmas).var(dim=(1, 2, 3))
    assert x.var() > var[0] > var[1] > var[2]


@BLURS
def test_blur_matches_naive_reflect_convolution(blur):
    """Pins kernel truncation (3σ), normalisation and boundary handling against a plain numpy convolution;
    σ = 2 on a 6-voxel axis reaches past the far border, so the mirror is applied twice."""
    x = torch.rand(2, 9, 7, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    sigma = np.array([[1.3, 0.0, 2.0], [0.4, 1.0, 0.7]])
    out = blur(x, sigma)
    ref = x.double().numpy().copy()
    for n in range(2):
        for ax in range(3):
            s = sigma[n, ax]
            if s == 0:
                continue
            r = math.ceil(3 * s)
            w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
            w /= w.sum()
            pad = [(0, 0)] * 3
            pad[ax] = (r, r)
            p = np.pad(ref[n], pad, mode="symmetric")  # scipy "reflect" (d c b a | a b c d)
            length = ref.shape[ax + 1]
            ref[n] = sum(w[t] * np.take(p, np.arange(t, t + length), axis=ax) for t in range(2 * r + 1))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_swap_permutation_equals_sequential_swaps_and_preserves_values():
    """Pins the vectorised patch swap: one gather equals 100 sequential swaps, and it only permutes voxels."""
    size, patch, count = (16, 12, 8), (4, 2, 2), 100
    rng = np.random.default_rng(0)
    src = swap_permutation(size, patch, count, 2, rng)
    x = torch.rand(2, *size, generator=torch.Generator().manual_seed(0))
    out = x.reshape(2, -1).gather(1, torch.from_numpy(src)).view_as(x)
    # redo the same swaps one by one on the data (same draws from a fresh generator)
    rng = np.random.default_rng(0)
    high = np.asarray(size) - np.asarray(patch) + 1
    first, second = rng.integers(0, high, size=(2, count, 3)), rng.integers(0, high, size=(2, count, 3))
    while (over := (np.abs(first - second) < patch).all(-1)).any():
        second[over] = rng.integers(0, high, size=(int(over.sum()), 3))
    ref = x.clone()
    for v in range(2):
        for k in range(count):
            a = tuple(slice(int(s), int(s) + p) for s, p in zip(first[v, k], patch, strict=True))
            b = tuple(slice(int(s), int(s) + p) for s, p in zip(second[v, k], patch, strict=True))
            ref[v][a], ref[v][b] = ref[v][b].clone(), ref[v][a].clone()
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)
    assert torch.equal(out.reshape(2, -1).sort(1).values, x.reshape(2, -1).sort(1).values)
    # the CPU renderer swaps the data itself, in place: the same result
    corners = torch.from_numpy(np.stack([first, second], 2))
    assert torch.equal(swap_in_place(x.clone(), corners, size, patch), ref)


# --- the whole sample ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return smooth_volume()


def test_views_shapes_dtypes_and_boxes(volume):
    """Pins the output contract the loader and model rely on."""
    cfg = tiny_cfg()
    out = PCRLv2Views(cfg)(volume, seed=0, tissue_threshold=0.6)
    assert out["global_views"].shape == (2, 1, 32, 32, 16)
    assert out["global_targets"].shape == (2, 1, 32, 32, 16)
    assert out["local_views"].shape == (6, 1, 8, 8, 8)
    for k in ("global_views", "global_targets", "local_views"):
        assert out[k].dtype == torch.float32 and out[k].is_contiguous() and torch.isfinite(out[k]).all()
    boxes = out["boxes"]
    assert boxes["global"].shape == (2, 2, 3) and boxes["local"].shape == (6, 2, 3)
    for start, size in [*boxes["global"].tolist(), *boxes["local"].tolist()]:
        assert inside(Box(tuple(start), tuple(size)), SHAPE)


def test_views_same_seed_bitwise_identical_different_seed_differs(volume):
    """Pins determinism: the same volume and seed give bit-identical views; another seed gives others."""
    views = PCRLv2Views(tiny_cfg())
    a, b, c = views(volume, seed=7), views(volume, seed=7), views(volume, seed=8)
    for k in ("global_views", "global_targets", "local_views"):
        assert torch.equal(a[k], b[k])
        assert not torch.equal(a[k], c[k])
    assert torch.equal(a["boxes"]["local"], b["boxes"]["local"])


def test_views_targets_are_the_undegraded_spatial_views(volume):
    """Pins the restoration target: spatially augmented only (in [0, 1]), identical whatever the intensity
    settings, and with every intensity range at zero the inputs are exactly the z-normalised targets."""
    degraded = PCRLv2Views(tiny_cfg())(volume, seed=3)
    clean = PCRLv2Views(tiny_cfg(**NO_INTENSITY))(volume, seed=3)
    targets = degraded["global_targets"]
    assert targets.min() >= -1e-6 and targets.max() <= 1 + 1e-6
    assert torch.equal(targets, clean["global_targets"])
    znorm = (targets - targets.mean((1, 2, 3, 4), keepdim=True)) / targets.std(
        (1, 2, 3, 4), correction=0, keepdim=True
    )
    torch.testing.assert_close(clean["global_views"], znorm, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(degraded["global_views"], znorm, atol=1e-2)


def test_views_are_z_normalised(volume):
    """Pins the last intensity step: every global and local view has mean 0 and std 1."""
    out = PCRLv2Views(tiny_cfg())(volume, seed=5)
    for k in ("global_views", "local_views"):
        x = out[k].flatten(1)
        torch.testing.assert_close(x.mean(1), torch.zeros(len(x)), atol=1e-4, rtol=0)
        torch.testing.assert_close(x.std(1, correction=0), torch.ones(len(x)), atol=1e-4, rtol=0)


def test_views_swap_preserves_global_voxel_multiset(volume):
    """Pins that the patch swap only moves voxels: swap on/off give the same sorted values per view."""
    base = {"noise_std": (0.0, 0.0)}
    on = PCRLv2Views(tiny_cfg(**base))(volume, seed=11)["global_views"].flatten(1)
    off = PCRLv2Views(tiny_cfg(**base, swap_count=0))(volume, seed=11)["global_views"].flatten(1)
    assert not torch.allclose(on, off, atol=1e-3)
    # z-normalisation sums in another order after the swap, hence a float tolerance
    torch.testing.assert_close(on.sort(1).values, off.sort(1).values, atol=1e-5, rtol=0)


def test_views_accept_float16_volume(volume):
    """Pins the MRI path: float16 volumes (how MRI shards are stored) render to float32 views."""
    out = PCRLv2Views(tiny_cfg())(volume.half(), seed=2)
    assert out["global_views"].dtype == torch.float32 and torch.isfinite(out["global_views"]).all()
    ref = PCRLv2Views(tiny_cfg())(volume.half().float(), seed=2)
    torch.testing.assert_close(out["global_targets"], ref["global_targets"], atol=0, rtol=0)


def test_views_pickle_roundtrip(volume):
    """Pins picklability: the callable goes to DataLoader workers and renders the same there."""
    views = PCRLv2Views(tiny_cfg())
    clone = pickle.loads(pickle.dumps(views))
    assert torch.equal(clone(volume, seed=1)["global_views"], views(volume, seed=1)["global_views"])


def test_views_reject_bad_volumes():
    """Pins input checks: wrong rank, integer dtype and NaN raise ValueError naming the problem."""
    views = PCRLv2Views(tiny_cfg())
    with pytest.raises(ValueError, match=r"\(80, 80\)"):
        views(torch.zeros(80, 80), seed=0)
    with pytest.raises(ValueError, match="floating"):
        views(torch.zeros(SHAPE, dtype=torch.int16), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        views(torch.full(SHAPE, float("nan")), seed=0)


def test_views_reject_swap_patch_without_room():
    """Pins the constructor check: two non-overlapping swap patches must fit, else redraws never end."""
    cfg = dataclasses.replace(tiny_cfg(), swap_patch=(20, 20, 10))
    with pytest.raises(ValueError, match="swap_patch"):
        PCRLv2Views(cfg)


# --- batches ---------------------------------------------------------------------------------------


def test_render_batch_equals_per_sample_views(volume):
    """Pins must-have 4: a whole batch rendered at once (list regions on the CPU, or the packed float16
    regions a loader hands a GPU, padded and stacked on the device) gives each sample the views it gets alone,
    so resume and per-sample seeding are unaffected. The packed batch is drawn from volumes float16 holds
    exactly, so packing loses nothing and any difference is the stacked path's."""
    cfg = tiny_cfg()
    views = PCRLv2Views(cfg)
    other = smooth_volume((64, 72, 40), seed=3)
    for pack in (False, True):
        vols = [volume, other, volume]
        if pack:
            vols = [v.to(torch.float16).to(torch.float32) for v in vols]
        draws = [views.draw(v, s, 0.6) for s, v in enumerate(vols)]
        collated = collate_draws(draws, pack=pack)
        assert isinstance(collated["region"], list) != pack
        batch = views.render(collated)
        assert batch["global_views"].shape == (3, 2, 1, 32, 32, 16)
        assert batch["local_views"].shape == (3, 6, 1, 8, 8, 8)
        for i, (s, v) in enumerate(enumerate(vols)):
            alone = views(v, seed=s, tissue_threshold=0.6)
            for k in ("global_views", "global_targets", "local_views"):
                torch.testing.assert_close(batch[k][i], alone[k], atol=1e-5, rtol=0)
            assert torch.equal(batch["boxes"]["global"][i], alone["boxes"]["global"])


def test_packed_regions_hold_each_crop_exactly_once(volume):
    """Pins what a loader hands a GPU: every sample's one region (all its views read it), back to back in
    float16 with no padding, and the crops come back as they were, rounded to float16."""
    views = PCRLv2Views(tiny_cfg())
    other = smooth_volume((64, 72, 40), seed=3)
    draws = [views.draw(v, s, 0.6) for s, v in enumerate([volume, other])]
    flat, shapes = pack_regions([d["region"] for d in draws])
    assert flat.dtype == torch.float16 and shapes.tolist() == [list(d["region"].shape) for d in draws]
    assert flat.numel() == sum(d["region"].numel() for d in draws)
    for crop, d in zip(region_list(flat, shapes), draws, strict=True):
        assert torch.equal(crop, d["region"].to(torch.float16))


def test_draw_is_the_cut_of_its_plan(volume):
    """Pins the split of a draw into plan (every random choice, what bench/views.py pre-draws) and cut (the
    regions): cutting a plan gives exactly the draw, and a plan only cuts the volume shape it was drawn for."""
    views = PCRLv2Views(tiny_cfg())
    plan = views.plan(volume, 4, 0.6)
    draw, cut = views.draw(volume, 4, 0.6), views.cut(volume, plan)
    assert draw.keys() == cut.keys()
    for k, v in draw.items():
        if isinstance(v, dict):
            assert all(torch.equal(v[b], cut[k][b]) for b in v)
        else:
            torch.testing.assert_close(v, cut[k], atol=0, rtol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"\(64, 72, 40\)"):
        views.cut(smooth_volume((64, 72, 40)), plan)


def test_views_distribution_over_many_draws(volume):
    """Pins distribution-level properties over many draws: targets stay in [0, 1], global boxes vary, the
    swap and noise make views differ from the z-normalised targets by a stable amount."""
    views = PCRLv2Views(tiny_cfg())
    batch = views.render(collate_draws([views.draw(volume, s, None) for s in range(24)]))
    t = batch["global_targets"]
    assert t.min() >= -1e-6 and t.max() <= 1 + 1e-6
    assert len({tuple(b.flatten().tolist()) for b in batch["boxes"]["global"]}) == 24
    z = (t - t.mean((2, 3, 4, 5), keepdim=True)) / t.std((2, 3, 4, 5), correction=0, keepdim=True)
    gap = (batch["global_views"] - z).square().mean((2, 3, 4, 5))
    assert 0.05 < gap.mean() < 2.0
