"""The CPU renderer's two hot loops, compiled by numba: trilinear resampling under affine maps, and the
separable Gaussian blur.

They replace, on a CPU core, what :mod:`pcrl.views.ops` does with ``grid_sample`` and batched matrix products on a
GPU (the tests hold each pair to float rounding of each other):

* PyTorch's 3D CPU ``grid_sample`` is a scalar kernel that also needs a grid of three coordinates per output
  voxel. An affine map needs no grid: along an output row the input coordinate moves by a constant step, so
  :func:`resample_affine` computes it incrementally and reads the 8 neighbours in place, about 2x faster on
  the sample volumes (it is bound by the memory reads of the region, most of them cache misses).
* The blur as three batched products with dense (L, L) matrices costs L multiply-adds per voxel and axis;
  :func:`gaussian_blur` runs the 2·ceil(3σ) + 1 taps only, vectorised along the contiguous axis.

``bench/views.py`` measures the whole renderer against the torchio baseline. The kernels are compiled on first
import of this module (a few seconds, then loaded from numba's disk cache: beside this file, under
``NUMBA_CACHE_DIR``, or a per-user cache where the package is read-only; with none writable each process
compiles them), one specialisation each, ``nogil``. :mod:`pcrl.views.ops` imports it on its first CPU batch; the
loader imports it before its workers fork, so that they inherit the compiled code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

__all__ = ["gaussian_blur", "resample_affine"]

# Every array argument is typed up front, so each kernel is compiled once, here, at import (or loaded from the
# disk cache). A region is read in place whatever its strides (a slice of a volume is not contiguous, a
# pickled crop is), so its layout is "any"; every other array is contiguous.
_RESAMPLE = "void(float32[:, :, :], float64[:, :, ::1], float64[:, ::1], float32[::1], float32[:, :, :, ::1])"
_BLUR = "void(float32[:, :, :, ::1], float64[:, :, ::1], float32[:, :, :, ::1])"


def _jit(signature: str | None = None, **options):
    """numba.njit without the GIL, cached on disk where numba finds a writable place, else per process.

    No fastmath: the same arithmetic, hence the same views, whatever LLVM would reassociate.
    """
    options = {"nogil": True, "error_model": "numpy", **options}

    def wrap(fn):
        try:
            return numba.njit(signature, cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location: compile in every process instead
            return numba.njit(signature, **options)(fn)

    return wrap


@_jit(_RESAMPLE)
def _resample_kernel(region, lin, off, pad, out):
    """out[v, i, j, k] = trilinear(region, lin[v] @ (i + .5, j + .5, k + .5) + off[v]); corners outside the
    region read pad[v]."""
    sx, sy, sz = region.shape
    for v in range(out.shape[0]):
        p = pad[v]
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                # index coordinate of (i, j, k = 0), then a constant step per k
                cx = off[v, 0] + lin[v, 0, 0] * (i + 0.5) + lin[v, 0, 1] * (j + 0.5) + lin[v, 0, 2] * 0.5
                cy = off[v, 1] + lin[v, 1, 0] * (i + 0.5) + lin[v, 1, 1] * (j + 0.5) + lin[v, 1, 2] * 0.5
                cz = off[v, 2] + lin[v, 2, 0] * (i + 0.5) + lin[v, 2, 1] * (j + 0.5) + lin[v, 2, 2] * 0.5
                for k in range(out.shape[3]):
                    x = cx + lin[v, 0, 2] * k
                    y = cy + lin[v, 1, 2] * k
                    z = cz + lin[v, 2, 2] * k
                    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
                    ix, iy, iz = int(fx), int(fy), int(fz)
                    ax, ay, az = np.float32(x - fx), np.float32(y - fy), np.float32(z - fz)
                    if 0 <= ix < sx - 1 and 0 <= iy < sy - 1 and 0 <= iz < sz - 1:
                        v000 = region[ix, iy, iz]
                        v001 = region[ix, iy, iz + 1]
                        v010 = region[ix, iy + 1, iz]
                        v011 = region[ix, iy + 1, iz + 1]
                        v100 = region[ix + 1, iy, iz]
                        v101 = region[ix + 1, iy, iz + 1]
                        v110 = region[ix + 1, iy + 1, iz]
                        v111 = region[ix + 1, iy + 1, iz + 1]
                    else:  # at the region's edge: a corner outside it reads the pad value
                        x0, x1 = 0 <= ix < sx, 0 <= ix + 1 < sx
                        y0, y1 = 0 <= iy < sy, 0 <= iy + 1 < sy
                        z0, z1 = 0 <= iz < sz, 0 <= iz + 1 < sz
                        v000 = region[ix, iy, iz] if x0 and y0 and z0 else p
                        v001 = region[ix, iy, iz + 1] if x0 and y0 and z1 else p
                        v010 = region[ix, iy + 1, iz] if x0 and y1 and z0 else p
                        v011 = region[ix, iy + 1, iz + 1] if x0 and y1 and z1 else p
                        v100 = region[ix + 1, iy, iz] if x1 and y0 and z0 else p
                        v101 = region[ix + 1, iy, iz + 1] if x1 and y0 and z1 else p
                        v110 = region[ix + 1, iy + 1, iz] if x1 and y1 and z0 else p
                        v111 = region[ix + 1, iy + 1, iz + 1] if x1 and y1 and z1 else p
                    c00 = v000 + az * (v001 - v000)
                    c01 = v010 + az * (v011 - v010)
                    c10 = v100 + az * (v101 - v100)
                    c11 = v110 + az * (v111 - v110)
                    c0 = c00 + ay * (c01 - c00)
                    c1 = c10 + ay * (c11 - c10)
                    out[v, i, j, k] = c0 + ax * (c1 - c0)


@_jit(inline="always")
def _mirror(n, half):
    """(n + 2·half,) source index of each position of a length-n axis padded by ``half`` on both sides as
    scipy's ``reflect`` mode pads (d c b a | a b c d | d c b a), mirrored as often as ``half`` needs."""
    idx = np.empty(n + 2 * half, dtype=np.int64)
    for k in range(n + 2 * half):
        i = (k - half) % (2 * n)
        idx[k] = 2 * n - 1 - i if i >= n else i
    return idx


@_jit(inline="always")
def _mix_rows(dst, src, w, mirror):
    """dst[r] = Σ_t w[t]·src[mirror[r + t]] over the rows r of 2D arrays, zero taps skipped: the blur along a
    non-contiguous axis, one contiguous multiply-add per tap."""
    n = np.uint64(dst.shape[1])
    for r in range(dst.shape[0]):
        for m in range(n):
            dst[r, m] = 0.0
        for t in range(len(w)):
            wt = np.float32(w[t])
            if wt != 0.0:
                s = mirror[r + t]
                for m in range(n):
                    dst[r, m] += wt * src[s, m]


@_jit(_BLUR)
def _blur_kernel(x, taps, out):
    """out[v] = x[v] convolved along z, then y, then x with the centred taps[v, axis] (zero taps skipped).

    The innermost loops count in unsigned integers: numba then has no negative index to wrap around, and LLVM
    vectorises them (measured 9x faster than the same loops over signed indices).
    """
    nx, ny, nz = x.shape[1:]
    k_taps = taps.shape[2]
    half = k_taps // 2
    mx, my, mz = _mirror(nx, half), _mirror(ny, half), _mirror(nz, half)
    row = np.empty(nz + 2 * half, dtype=np.float32)
    a, b = np.empty((nx, ny, nz), dtype=np.float32), np.empty((nx, ny, nz), dtype=np.float32)  # one view each
    n_row, u_half = np.uint64(nz), np.uint64(half)
    for v in range(x.shape[0]):
        # along z: each row padded by mirroring, then one contiguous multiply-add per tap
        for i in range(nx):
            for j in range(ny):
                for k in range(n_row):
                    row[k + u_half] = x[v, i, j, k]
                for k in range(half):  # the mirrored margins
                    row[k] = x[v, i, j, mz[k]]
                    row[nz + half + k] = x[v, i, j, mz[nz + half + k]]
                for k in range(n_row):
                    a[i, j, k] = 0.0
                for t in range(k_taps):
                    w = np.float32(taps[v, 2, t])
                    if w != 0.0:
                        ut = np.uint64(t)
                        for k in range(n_row):
                            a[i, j, k] += w * row[k + ut]
        # along y (the rows of each x plane), then x (the planes as flat rows)
        for i in range(nx):
            _mix_rows(b[i], a[i], taps[v, 1], my)
        _mix_rows(out[v].reshape(nx, ny * nz), b.reshape(nx, ny * nz), taps[v, 0], mx)


def resample_affine(
    region: np.ndarray,
    lin: np.ndarray,
    off: np.ndarray,
    pad: np.ndarray,
    out_size: Sequence[int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """V views of one region by trilinear interpolation, each under its own affine map.

    Output voxel ``(i, j, k)`` of view ``v`` samples the region at index coordinate
    ``lin[v] @ (i + 0.5, j + 0.5, k + 0.5) + off[v]``, where region voxel ``(a, b, c)`` sits at coordinate
    ``(a, b, c)``: ``grid_sample(align_corners=False)``'s convention once the grid is unnormalised. A corner
    outside the region reads ``pad[v]`` (``grid_sample``'s zeros padding where ``pad`` is 0).

    Args:
        region: (RX, RY, RZ) float32, any strides (a slice of a volume is read in place, not copied).
        lin: (V, 3, 3) float64 linear part of each map.
        off: (V, 3) float64 offset of each map.
        pad: (V,) float32 value of corners outside the region.
        out_size: (nx, ny, nz).
        out: (V, nx, ny, nz) float32 C-contiguous array to write into, or None for a new one.

    Returns:
        (V, nx, ny, nz) float32: ``out`` where given.
    """
    shape = (len(lin), *(int(n) for n in out_size))
    # the kernel does not check bounds: wrong shapes would read and write past the arrays
    if region.ndim != 3 or np.shape(lin)[1:] != (3, 3) or np.shape(off) != (len(lin), 3):
        shapes = f"{region.shape}, {np.shape(lin)}, {np.shape(off)}"
        raise ValueError(f"need a 3D region, lin (V, 3, 3) and off (V, 3); got {shapes}")
    if np.shape(pad) != (len(lin),):
        raise ValueError(f"pad must be (V={len(lin)},), got {np.shape(pad)}")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    _resample_kernel(
        region if region.dtype == np.float32 else region.astype(np.float32),
        np.ascontiguousarray(lin, dtype=np.float64),
        np.ascontiguousarray(off, dtype=np.float64),
        np.ascontiguousarray(pad, dtype=np.float32),
        out,
    )
    return out


def gaussian_blur(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable blur of N views, each along each axis with its own centred taps, scipy's ``reflect`` border.

    Args:
        x: (N, X, Y, Z) float (copied to contiguous float32 where it is not that); not modified.
        taps: (N, 3, K) float64, K odd: the weights of offsets ``-(K // 2) … K // 2`` per view and axis
            (a single 1 in the middle leaves that axis as it is).

    Returns:
        (N, X, Y, Z) float32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    taps = np.ascontiguousarray(taps, dtype=np.float64)
    if taps.shape[:2] != (len(x), 3) or taps.shape[2] % 2 != 1:
        raise ValueError(f"taps must be (N={len(x)}, 3, K) with K odd, got {taps.shape}")
    out = np.empty_like(x)
    _blur_kernel(x, taps, out)
    return out
