"""The spatial backend of the PCRLv2 views in an NVIDIA DALI pipeline (``views.backend: dali``), on the GPU or,
for CI, the CPU: ``PCRLv2Views(cfg, DALISpatial(device_id=0))``.

What DALI does and what it does not:

* **Geometry and random draws** come from :meth:`pcrl.views.PCRLv2Views.draw`, the same sampler as the torch
  path (crop boxes, tissue filter, flip/scale/rotation affines, blur sigmas, noise seeds, swap corners): the
  geometry rules live in one place, and a sample is a pure function of its seed whatever the backend.
* **Spatial rendering and blur** run in DALI (:class:`DALISpatial`): each view is one ``fn.warp_affine``
  (trilinear, the view's affine map, DHWC layout) of the sample's volume region, then ``fn.gaussian_blur`` with
  the view's per-axis sigma and the torch path's window ``2·ceil(3σ)+1``.
* **Noise, gamma, patch swap and z-normalisation** run in torch on the DALI outputs, on the same device
  (:func:`pcrl.views.render.finish_views`): DALI's noise generator advances per pipeline run, not per sample,
  so a resumed run could not reproduce it; torch draws each sample's noise from its own seed, which keeps
  the resumed stream identical to the uninterrupted one. The swap is a gather DALI does not have.

**Reader: external source, not ``readers.webdataset``.** Shards hold zstd-compressed ``.npy`` volumes and DALI
2.4 has no zstd decoder (``decoders.inflate`` is GPU-only and knows LZ4 and deflate, not zstd), so the
webdataset reader could only hand raw bytes to a Python ``fn.python_function`` that decodes them one at a time
under the GIL, and the sampler (which needs the decoded volume for the tissue filter) would run there too.
Instead the torch DataLoader workers of :func:`pcrl.data.build_loader` decode in parallel processes, draw each
sample's geometry and cut the regions its views read (a few MB, not the whole volume); the batch arrives here
through ``fn.external_source`` (pinned on a GPU machine). Decoding is the slow part of reading a volume, so one
decoding process would be the bottleneck where N workers decode N volumes at a time; the exact resume of the
loader (worker positions, per-sample seeds) also carries over unchanged.

DALI is imported lazily: ``import pcrl`` works without it, and asking for ``views.backend: dali`` without it
installed is an error that names the extra to install.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pcrl.config import ConfigError, ViewsConfig
from pcrl.views.ops import SpatialViews, add_outside_fill, blur, blur_window, region_list

__all__ = ["DALISpatial", "dali_available", "require_dali"]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """Raise ConfigError (naming ``views.backend`` and the fix) when DALI is missing."""
    if not dali_available():
        raise ConfigError(
            "views.backend: dali needs NVIDIA DALI: pip install 'pcrl[dali]' (nvidia-dali-cuda120), "
            "or use views.backend=torch"
        )


def _dali_affine(affines: Tensor, origin: Tensor) -> np.ndarray:
    """(V, 3, 4) output → volume maps in pcrl's (x, y, z) order → DALI ``warp_affine`` matrices (V, 3, 4).

    DALI orders coordinates (W, H, D) of a DHWC layout, i.e. (z, y, x) for an (X, Y, Z) volume laid out as
    D=x, H=y, W=z, and its matrices map output to input coordinates in the region (pixel centres at +0.5,
    like pcrl's). Reversing both axes of the linear part and the translation converts.
    """
    m = affines[..., :3].flip(-1).flip(-2)
    t = (affines[..., 3] - origin.to(affines)).flip(-1)
    return torch.cat([m, t[..., None]], -1).to(torch.float32).numpy()


class DALISpatial:
    """The spatial steps and the blur of the PCRLv2 views by a DALI pipeline: the spatial backend of
    :class:`pcrl.views.PCRLv2Views` for ``views.backend: dali``, rendering the same draws into the same views.

    Args:
        device_id: CUDA device to render on, or None for DALI's CPU mode (CI, machines without a GPU).
        max_batch_size: the largest batch :meth:`render_spatial` will be given.
        num_threads: DALI's CPU worker threads.

    Raises:
        ImportError: DALI is not installed (names the extra).
    """

    def __init__(self, device_id: int | None = None, max_batch_size: int = 32, num_threads: int = 2) -> None:
        require_dali()
        self.device_id = device_id
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self._pipe: Any = None
        self._pipe_shape: tuple[Any, ...] | None = None  # the view sizes and count the pipeline was built for

    def __getstate__(self) -> dict[str, Any]:
        # a built pipeline holds native handles: a copy (e.g. in a loader worker) builds its own
        return {**self.__dict__, "_pipe": None, "_pipe_shape": None}

    @property
    def device(self) -> torch.device:
        """Where the rendered views are."""
        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    def _build(self, cfg: ViewsConfig) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None

        def views(region: Any, name: str, count: int, size: Sequence[int]) -> list[Any]:
            outs = []
            for v in range(count):
                matrix = fn.external_source(name=f"{name}_matrix{v}", dtype=types.FLOAT)
                sigma = fn.external_source(name=f"{name}_sigma{v}", dtype=types.FLOAT)
                window = fn.external_source(name=f"{name}_window{v}", dtype=types.INT32)
                warped = fn.warp_affine(
                    region,
                    matrix=matrix,
                    size=list(size),
                    interp_type=types.INTERP_LINEAR,
                    fill_value=0.0,
                    inverse_map=True,
                )
                outs += [warped, fn.gaussian_blur(warped, sigma=sigma, window_size=window)]
            return outs

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipeline() -> tuple[Any, ...]:
            # one region per sample that every view reads: float32 crops (CPU) or the packed float16 ones
            # a loader hands a GPU (half the bytes to copy), widened on the device
            region = fn.external_source(name="region", layout="DHWC")
            if gpu:
                region = region.gpu()
            region = fn.cast(region, dtype=types.FLOAT)
            return (
                *views(region, "global", 2, cfg.global_size),
                *views(region, "local", cfg.num_locals, cfg.local_size),
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def render_spatial(
        self, batch: dict[str, Any], cfg: ViewsConfig, device: torch.device | str | None = None
    ) -> SpatialViews:
        """The spatial views of a batch of draws (:func:`pcrl.views.collate_draws`) and their blur, by DALI on
        :attr:`device`; ``device`` must be None or :attr:`device`.

        The blur's border handling is DALI's (mirrored without repeating the edge voxel, ``reflect 101``)
        where the torch path mirrors with it (scipy ``reflect``): the two agree exactly inside, more than
        ``ceil(3σ)`` voxels from a face, and differ slightly at the faces.

        Raises:
            ValueError: ``device`` is another device, or the batch is larger than ``max_batch_size``.
        """
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"this DALI pipeline renders on {self.device}, not {device}")
        b = len(batch["noise_seed"])
        if b > self.max_batch_size:
            raise ValueError(
                f"a batch of {b} samples is larger than the DALI pipeline's max_batch_size {self.max_batch_size}"
            )
        shape = (tuple(cfg.global_size), tuple(cfg.local_size), cfg.num_locals)
        if self._pipe is None or self._pipe_shape != shape:
            self._pipe, self._pipe_shape = self._build(cfg), shape
        pipe = self._pipe
        sigma = batch["sigma"].cpu().numpy()  # (B, 2+L, 3) in (x, y, z)
        window = blur_window(sigma).astype(np.int32)
        n_views = {"global": 2, "local": cfg.num_locals}
        first = {"global": 0, "local": 2}
        regions = batch["region"]
        if "region_shape" in batch:
            # packed float16 (a loader for a GPU): views of the pinned buffer, no copy
            regions = region_list(regions, batch["region_shape"])
        else:
            regions = [r.to(torch.float32) for r in regions]
        pipe.feed_input("region", [np.ascontiguousarray(r.cpu().numpy())[..., None] for r in regions])
        origin = batch["origin"]
        for name, count in n_views.items():
            matrices = [_dali_affine(batch[f"{name}_affines"][i], origin[i]) for i in range(b)]
            for v in range(count):
                k = first[name] + v
                pipe.feed_input(f"{name}_matrix{v}", [m[v] for m in matrices])
                # DALI's per-axis blur arguments run innermost axis first: (z, y, x) here
                pipe.feed_input(f"{name}_sigma{v}", [s[k].astype(np.float32).copy() for s in sigma])
                pipe.feed_input(f"{name}_window{v}", [w[k].copy() for w in window])
        outs = pipe.run()
        tensors = [self._to_torch(o) for o in outs]  # each (B, X, Y, Z, 1)
        n_g = 2 * n_views["global"]
        targets = torch.stack(tensors[0:n_g:2], 1)[..., 0]
        blurred_g = torch.stack(tensors[1:n_g:2], 1)[..., 0]
        locals_ = torch.stack(tensors[n_g::2], 1)[..., 0]
        blurred_l = torch.stack(tensors[n_g + 1 :: 2], 1)[..., 0]
        if bool(batch["outside"].any()):
            # DALI fills with 0 outside the region; the torch path's padding with each view's box minimum is
            # the same correction, added to both the targets and (blurred by the pipeline) the views
            for name, spatial, blurred in (("global", targets, blurred_g), ("local", locals_, blurred_l)):
                self._pad_outside(batch, name, spatial, blurred)
        return SpatialViews(targets, blurred_g, locals_, blurred_l)

    @staticmethod
    def _pad_outside(batch: dict[str, Any], name: str, spatial: Tensor, blurred: Tensor) -> None:
        """Add ``pad · (1 - coverage)`` to the ``name`` views (B, V, ...) that reach outside their volume, and its
        blur to their blurred views (the blur is linear: blur(x + fill) = blur(x) + blur(fill)), in place."""
        b, v, *size = spatial.shape
        rows, fill = add_outside_fill(
            spatial.view(b * v, *size),
            batch[f"{name}_affines"].reshape(b * v, 3, 4),
            batch["origin"].to(torch.float64).repeat_interleave(v, 0),
            batch["volume_shape"].repeat_interleave(v, 0),
            batch[f"{name}_pad"].reshape(-1),
            torch.ones(3, dtype=torch.float64),  # no region: the grid is built in volume coordinates
        )
        if len(rows) == 0:
            return
        first = 0 if name == "global" else 2
        sigma = batch["sigma"].cpu().numpy()[:, first : first + v].reshape(-1, 3)[rows.numpy()]
        on_device = rows.to(spatial.device, non_blocking=True)
        blurred.view(b * v, *size).index_add_(0, on_device, blur(fill, sigma))

    def _to_torch(self, out: Any) -> Tensor:
        tensor = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result
