"""The PCRLv2 view renderer (docs/method.md §1, D1–D3): a sample's random choices, then whole batches rendered.

Rendering is split so that the expensive part runs where it is cheapest: :meth:`PCRLv2Views.draw` (per sample,
on the CPU, in loader workers) draws every random choice of a sample from its seed (:meth:`PCRLv2Views.plan`,
the sampler of :mod:`pcrl.views.geometry`) and cuts the volume region its views read
(:meth:`PCRLv2Views.cut`); :func:`collate_draws` stacks a batch of draws; :meth:`PCRLv2Views.render` renders
the batch on the CPU or the GPU. ``PCRLv2Views(cfg)(volume, seed)`` does all three for one sample.

A render is two steps. The **spatial backend** applies each view's crop + resize + flip + scale + rotation as
ONE trilinear resampling and blurs the result: :class:`TorchSpatial` (the default; ``grid_sample`` on a GPU,
:mod:`pcrl.views.cpu_kernels` on a CPU) or :class:`pcrl.views.dali.DALISpatial` (an NVIDIA DALI pipeline).
Then :func:`finish_views`, the same for every backend, adds noise, gamma, the patch swap (globals) and
z-normalises, batched over views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pcrl.config import ViewsConfig
from pcrl.views.dali import DALISpatial
from pcrl.views.geometry import (
    ViewPlan,
    draw_swaps,
    read_region,
    sample_global_pair,
    sample_local_boxes,
    sample_spatial_params,
    view_affines,
    view_pads,
)
from pcrl.views.ops import (
    SpatialViews,
    blur,
    check_finite,
    pack_regions,
    pad_stack,
    resample,
    swap_in_place,
    swap_sources,
    unpack_regions,
    znorm_,
)

__all__ = [
    "PCRLv2Views",
    "SpatialBackend",
    "TorchSpatial",
    "build_renderer",
    "collate_draws",
    "finish_views",
]


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


class SpatialBackend(Protocol):
    """The spatial half of a render: what :class:`PCRLv2Views` composes with (:class:`TorchSpatial`,
    :class:`pcrl.views.dali.DALISpatial`)."""

    def render_spatial(
        self, batch: dict[str, Any], cfg: ViewsConfig, device: torch.device | str | None = None
    ) -> SpatialViews:
        """The views of a batch of draws (:func:`collate_draws`) after the spatial steps, and their blur, on
        ``device`` (None: the backend's default)."""
        ...


class TorchSpatial:
    """The spatial steps and the blur in torch: one resampling call for all global views of a batch and one for
    all local views (on a CPU one each per sample, :mod:`pcrl.views.cpu_kernels`), then the blur batched over
    every view. Stateless, so it pickles into DataLoader workers."""

    def render_spatial(
        self, batch: dict[str, Any], cfg: ViewsConfig, device: torch.device | str | None = None
    ) -> SpatialViews:
        """The spatial views of a batch of draws and their blur, on ``device`` (default: where the regions are).

        No host synchronisation on a GPU: the regions come non-blocking from pinned memory.
        """
        regions = batch["region"]
        if device is None:
            device = (regions if isinstance(regions, Tensor) else regions[0]).device
        device = torch.device(device)
        if "region_shape" in batch:  # packed by a loader worker for this device
            regions = unpack_regions(regions, batch["region_shape"], device)
        elif device.type != "cpu":
            regions = pad_stack([r.to(device, non_blocking=True) for r in regions])
        targets = self._resample(batch, "global", cfg.global_size, regions)  # (B, 2, gx, gy, gz)
        locals_ = self._resample(batch, "local", cfg.local_size, regions)  # (B, L, lx, ly, lz)
        sigma = batch["sigma"].cpu().numpy()
        blurred_g = blur(targets.flatten(0, 1), sigma[:, :2].reshape(-1, 3)).view_as(targets)
        blurred_l = blur(locals_.flatten(0, 1), sigma[:, 2:].reshape(-1, 3)).view_as(locals_)
        return SpatialViews(targets, blurred_g, locals_, blurred_l)

    @staticmethod
    def _resample(
        batch: dict[str, Any], name: str, size: Sequence[int], regions: Tensor | Sequence[Tensor]
    ) -> Tensor:
        """The ``name`` views of the batch, spatial steps only, from its regions (a list of CPU crops, or
        (B, RX, RY, RZ) float32 on the device): (B, V, ...) float32."""
        pads = batch[f"{name}_pad"] if bool(batch["outside"].any()) else None
        return resample(
            regions,
            batch["origin"],
            batch["volume_shape"],
            batch[f"{name}_affines"],
            pads,
            size,
        )


class PCRLv2Views:
    """Render the PCRLv2 sub-crop views (docs/method.md §1, D1–D3), one sample or a whole batch.

    Deterministic: the same volume and seed give bit-identical views (on the same device and spatial backend),
    whether rendered alone or in a batch. Holds the config and its spatial backend (:class:`TorchSpatial` by
    default, or ``DALISpatial``), so it pickles into DataLoader workers. Works on CPU and CUDA tensors.

    Example::

        views = PCRLv2Views(cfg.views)
        sample = views(volume, seed=123, tissue_threshold=0.425)  # volume: (X, Y, Z) float32 in [0, 1]
        sample["global_views"].shape  # (2, 1, 64, 64, 32)
        batch = views.render(collate_draws([views.draw(v, s) for v, s in ...]), device)  # (B, 2, 1, ...)
        dali = PCRLv2Views(cfg.views, DALISpatial(device_id=0, max_batch_size=32))  # the same views by DALI

    Args:
        cfg: the views config.
        spatial: the spatial backend (default :class:`TorchSpatial`).

    Raises:
        ValueError: ``cfg.swap_patch`` leaves no room for two non-overlapping patches in a global view.
    """

    def __init__(self, cfg: ViewsConfig, spatial: SpatialBackend | None = None) -> None:
        g, p = cfg.global_size, cfg.swap_patch
        if cfg.swap_count > 0 and all(gi < 2 * pi for gi, pi in zip(g, p, strict=True)):
            raise ValueError(
                f"views.swap_patch {list(p)} leaves no room for two non-overlapping patches in views.global_size "
                f"{list(g)}: make the patch at most half the view on one axis, or set views.swap_count=0"
            )
        self.cfg = cfg
        self.spatial: SpatialBackend = TorchSpatial() if spatial is None else spatial

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

        The geometry comes from the sampler of :mod:`pcrl.views.geometry` (:func:`sample_global_pair`,
        :func:`sample_local_boxes`, :func:`sample_spatial_params`, :func:`view_affines`); every spatial backend
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
            swaps = draw_swaps(cfg.global_size, cfg.swap_patch, cfg.swap_count, 2, rng)
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
            view_lo, view_hi, out_flags = read_region(affines, size, shape)
            lo = [min(a, b) for a, b in zip(lo, view_lo, strict=True)]
            hi = [max(a, b) for a, b in zip(hi, view_hi, strict=True)]
            pads = view_pads(volume, boxes, out_flags)
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
        """Render a batch of draws (:func:`collate_draws`) on ``device`` (default: the spatial backend's, for
        :class:`TorchSpatial` where the regions are): the spatial backend, then :func:`finish_views`.

        Returns:
            ``global_views`` / ``global_targets`` (B, 2, 1, gx, gy, gz), ``local_views`` (B, L, 1, lx, ly, lz)
            float32 on ``device``, ``boxes`` ``{"global": (B, 2, 2, 3), "local": (B, L, 2, 3)}`` and
            ``keys`` where the draws had them.

        Raises:
            ValueError: (CPU) the sampled region holds NaN/Inf.
        """
        spatial = self.spatial.render_spatial(batch, self.cfg, device)
        check_finite([spatial.global_targets, spatial.local_spatial], batch["volume_shape"])
        return finish_views(self.cfg, batch, spatial)

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``collate_fn`` of a loader whose workers render on the CPU: stack the draws, render the batch."""
        return self.render(collate_draws(samples), torch.device("cpu"))


def finish_views(cfg: ViewsConfig, batch: dict[str, Any], spatial: SpatialViews) -> dict[str, Any]:
    """Noise → gamma → swap (globals) → z-normalisation of a batch's blurred views, whatever the spatial backend.

    The noise of sample b comes from a generator seeded with its ``noise_seed`` (globals first, then
    locals), so a sample's views do not depend on the batch it is rendered in (nor, on resume, on the batches
    before it). The blurred views of ``spatial`` are overwritten.

    Args:
        cfg: the views config.
        batch: the batch of draws (:func:`collate_draws`) the views were rendered from.
        spatial: its views after the spatial backend.

    Returns:
        The batch dict of :meth:`PCRLv2Views.render`.
    """
    targets, blurred_g, _, blurred_l = spatial
    device = targets.device
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
            global_views = swap_in_place(global_views, corners, cfg.global_size, cfg.swap_patch)
        else:
            src = swap_sources(corners, cfg.global_size, cfg.swap_patch)
            global_views = global_views.reshape(b * n_g, -1).gather(1, src).view_as(global_views)
    out: dict[str, Any] = {
        "global_views": znorm_(global_views.flatten(0, 1)).view_as(global_views)[:, :, None],
        "global_targets": targets[:, :, None],
        "local_views": znorm_(local_views.flatten(0, 1)).view_as(local_views)[:, :, None],
        "boxes": batch["boxes"],
    }
    if "keys" in batch:
        out["keys"] = batch["keys"]
    return out


def build_renderer(cfg: ViewsConfig, device: torch.device | str, max_batch_size: int) -> PCRLv2Views:
    """The renderer ``views.backend`` asks for, on ``device`` (where the training process computes).

    ``torch`` renders on CPU in the loader workers or, on a GPU, in the training process; ``dali`` renders
    with a DALI pipeline (CPU mode without a GPU) of at most ``max_batch_size`` samples; ``auto`` takes the
    renderer ``bench/views.py`` measured fastest, which is torch on both a CPU and a GPU.

    Raises:
        ImportError: ``views.backend=dali`` without DALI installed (names the extra to install).
    """
    device = torch.device(device)
    if cfg.backend == "dali":
        device_id = None if device.type == "cpu" else (device.index or 0)
        return PCRLv2Views(cfg, DALISpatial(device_id=device_id, max_batch_size=max_batch_size))
    return PCRLv2Views(cfg)
