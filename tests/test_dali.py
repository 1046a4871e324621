"""The DALI spatial backend (pcrl.views.dali) in DALI's CPU mode (device_id=None) against the torch one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from view_helpers import smooth_volume, tiny_cfg

from pcrl.config import DataConfig, PretrainConfig, RunConfig, TrainConfig
from pcrl.data import ViewLoader, build_loader
from pcrl.views import DALISpatial, PCRLv2Views, TorchSpatial, build_renderer, collate_draws
from pcrl.views.ops import blur

pytest.importorskip("nvidia.dali")

# Trilinear resampling in DALI and in grid_sample agree to float rounding (measured ~1e-5 on [0, 1] data).
SPATIAL_TOL = 1e-4
# The blur agrees exactly away from the faces; at the faces DALI mirrors without the edge voxel.
BLUR_TOL = 1e-5


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return smooth_volume()


def test_dali_spatial_and_blur_match_torch_for_the_same_draws(volume):
    """Pins parity given the same sampled parameters: the DALI targets equal the torch targets within the
    interpolation tolerance (catches a wrong axis order, half-voxel offset or matrix convention), and DALI's
    blur equals the torch blur away from the faces (catches a sigma axis order swap)."""
    cfg = tiny_cfg()
    torch_views, dali_spatial = PCRLv2Views(cfg), DALISpatial(device_id=None, max_batch_size=4)
    batch = collate_draws([torch_views.draw(volume, s, None) for s in range(4)])
    ref = torch_views.render(batch)
    targets, blurred_g, locals_, blurred_l = dali_spatial.render_spatial(batch, cfg)
    torch.testing.assert_close(targets[:, :, None], ref["global_targets"], atol=SPATIAL_TOL, rtol=0)
    ref_blur = blur(targets.flatten(0, 1), batch["sigma"][:, :2].reshape(-1, 3).numpy()).view_as(targets)
    r = int(np.ceil(3 * cfg.blur_sigma[1]))
    inner = (..., slice(r, -r), slice(r, -r), slice(r, -r))
    assert (ref_blur - blurred_g).abs().max() > 1e-3  # the faces differ, so the interior check has teeth
    torch.testing.assert_close(blurred_g[inner], ref_blur[inner], atol=BLUR_TOL, rtol=0)
    assert locals_.shape == (4, cfg.num_locals, *cfg.local_size) and blurred_l.shape == locals_.shape


def test_dali_views_without_blur_equal_torch_views(volume):
    """Pins the whole sample: with the blur off (its faces are the only known difference) the DALI batch
    dict equals the torch one: same keys and shapes, views after noise/gamma/swap/z-norm within tolerance."""
    cfg = tiny_cfg(blur_sigma=(0.0, 0.0))
    t, d = PCRLv2Views(cfg), PCRLv2Views(cfg, DALISpatial(device_id=None, max_batch_size=3))
    batch = collate_draws([t.draw(volume, s, None) for s in range(3)])
    a, b = t.render(batch), d.render(batch)
    assert a.keys() == b.keys()
    for k in ("global_views", "global_targets", "local_views"):
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], atol=1e-3, rtol=0)


def test_dali_padding_outside_the_volume_matches_torch():
    """Pins the outside-the-volume padding: views zoomed out at the volume corner take the box minimum in
    both renderers (DALI fills 0, corrected afterwards)."""
    cfg = tiny_cfg(scale_range=(0.5, 0.5), border=(0, 0, 0), blur_sigma=(0.0, 0.0))
    vol = 0.5 + 0.5 * smooth_volume((40, 40, 24))
    t, d = PCRLv2Views(cfg), PCRLv2Views(cfg, DALISpatial(device_id=None, max_batch_size=4))
    batch = collate_draws([t.draw(vol, s, None) for s in range(4)])
    assert bool(batch["outside"].any())
    a, b = t.render(batch), d.render(batch)
    torch.testing.assert_close(b["global_targets"], a["global_targets"], atol=SPATIAL_TOL, rtol=0)


def test_dali_statistics_over_many_draws_agree_with_torch(volume):
    """Pins distribution-level agreement over many draws (full recipe, blur included): mean intensity of
    the targets and the spread of the degraded views agree, and the boxes are the sampler's."""
    cfg = tiny_cfg()
    t, d = PCRLv2Views(cfg), PCRLv2Views(cfg, DALISpatial(device_id=None, max_batch_size=8))
    stats = {"torch": [], "dali": []}
    for start in range(0, 32, 8):
        batch = collate_draws([t.draw(volume, s, None) for s in range(start, start + 8)])
        for name, r in (("torch", t), ("dali", d)):
            out = r.render(batch)
            stats[name].append(
                [
                    out["global_targets"].mean(),
                    out["global_views"].abs().mean(),
                    out["local_views"].abs().mean(),
                ]
            )
            assert torch.equal(out["boxes"]["local"], batch["boxes"]["local"])
    a, b = torch.tensor(stats["torch"]).mean(0), torch.tensor(stats["dali"]).mean(0)
    torch.testing.assert_close(b, a, atol=0.02, rtol=0.02)


def test_build_renderer_backends():
    """Pins views.backend: torch → torch renderer, dali → DALI (CPU mode here), auto → torch on a CPU and on a
    GPU even with DALI installed (as here): torch measured faster on both (bench/views.py, docs/benchmarks.md)."""
    cfg = tiny_cfg()
    torch_renderer = build_renderer(cfg, "cpu", 2)
    assert type(torch_renderer) is PCRLv2Views and type(torch_renderer.spatial) is TorchSpatial
    for device in ("cpu", "cuda"):  # building a torch renderer touches no device
        auto = build_renderer(dataclasses.replace(cfg, backend="auto"), device, 2)
        assert type(auto) is PCRLv2Views and type(auto.spatial) is TorchSpatial
    dali = build_renderer(dataclasses.replace(cfg, backend="dali"), "cpu", 2)
    assert (
        type(dali) is PCRLv2Views and isinstance(dali.spatial, DALISpatial) and dali.spatial.device_id is None
    )


def test_dali_loader_resumes_exactly(sample_shards: Path):
    """Pins exact resume on the DALI path: a loader built with start_batches=N yields the same samples and
    bit-identical views as the uninterrupted DALI loader after N batches (the noise comes from each sample's
    seed, not from DALI's per-run generator)."""
    cfg = PretrainConfig(
        run=RunConfig(seed=4),
        data=DataConfig(shards=str(sample_shards), split="all", num_workers=0),
        views=tiny_cfg(backend="dali", pairs_per_volume=2, tissue_filter=False),
        train=TrainConfig(micro_batch_size=2),
    )
    views = build_renderer(cfg.views, "cpu", 2)
    full_loader = build_loader(cfg, views, rank=0, world_size=1)
    assert isinstance(full_loader, ViewLoader)
    full = []
    for batch in full_loader:
        full.append(batch)
        if len(full) == 4:
            break
    resumed = []
    for batch in build_loader(cfg, views, rank=0, world_size=1, start_batches=2):
        resumed.append(batch)
        if len(resumed) == 2:
            break
    for a, b in zip(full[2:], resumed, strict=True):
        assert a["keys"] == b["keys"]
        for k in ("global_views", "global_targets", "local_views"):
            assert torch.equal(a[k], b[k])
