"""Preparing one volume for the shards (runs in the workers of a :class:`data_prep.pool.Pool`).

Each input goes through: read (:mod:`data_prep.readers`, :mod:`data_prep.dicom`) → canonical RAS+ →
modality (:func:`detect_modality`) → linear resampling to the target spacing (:func:`resample`) → optional
body crop (:mod:`data_prep.crop`) → intensity policy (:func:`intensity_policy`: CT int16 HU clipped to
[-1024, 3071]; MR float16, percentiles 0.5/99.5 → [0, 1]) → the encoded sample (:class:`Prepared`), or the
reason it is rejected (:class:`~data_prep.discover.Rejected`). The patient id is hashed here, and the split
assigned from the hash, so that raw ids never leave the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.crop import body_box
from data_prep.dicom import is_dicom, load_dicom
from data_prep.discover import InputSeries, Item, Rejected
from data_prep.options import ShardOptions
from data_prep.provenance import Provenance
from data_prep.readers import RawVolume, RejectedInput, check_voxels, load_volume, volume_suffix
from data_prep.timing import Stopwatch
from data_prep.zarr_writer import encode_array, write_array_files
from pcrl.shards import CT_HU_RANGE, PROVENANCE_KEYS, compress_volume, npy_sha256

__all__ = [
    "CT_MIN_HU",
    "FORMAT_VERSION",
    "MR_PERCENTILES",
    "Prepared",
    "assign_split",
    "detect_modality",
    "intensity_policy",
    "output_shape",
    "patient_hash",
    "patient_id",
    "prepare_volume",
    "resample",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the sample metadata, the journal and ``summary.json``."""
MR_PERCENTILES = (0.5, 99.5)
# Heuristic for formats without a modality tag: integer voxels reaching this low are CT (air is -1000 HU).
CT_MIN_HU = -500


def patient_id(item: Item) -> str:
    """DICOM ``PatientID`` when present, else the top folder under the input root, else the file name
    without its volume suffix (or the series name)."""
    if isinstance(item, InputSeries) and item.dicom_patient:
        return f"dicom:{item.dicom_patient}"
    parts = Path(item.source).parts
    if len(parts) > 1:
        return parts[0]
    suffix = volume_suffix(item.path)
    return item.path.name[: -len(suffix)] if suffix else item.path.stem


def patient_hash(patient: str, salt: str) -> str:
    """Salted sha256 of a patient id (16 hex digits); the raw id never reaches the shards."""
    return hashlib.sha256(f"{salt}\0{patient}".encode()).hexdigest()[:16]


def assign_split(hashed_patient: str, splits: Mapping[str, float]) -> str:
    """Map a patient hash to [0, 1) and pick the split whose cumulative fraction range holds it."""
    u = int(hashed_patient, 16) / 16 ** len(hashed_patient)
    total = 0.0
    for name, fraction in splits.items():
        total += fraction
        if u < total:
            return name
    return next(name for name, f in reversed(list(splits.items())) if f > 0)  # u beyond a sum of 1 - eps


def output_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Voxels per axis after resampling: ``floor(n · spacing / target)``, tolerant to float noise in headers
    (0.7812499 mm × 256 is 200 voxels of 1 mm, not 199)."""
    return [
        max(1, math.floor(float(n) * float(s) / float(t) + 1e-4))
        for n, s, t in zip(shape, spacing, target, strict=True)
    ]


def _interpolate_scale(n: int, spacing: float, target: float, size: int) -> float:
    """The scale factor for ``F.interpolate`` that gives ``size`` voxels (it floors ``n · scale``)."""
    scale = spacing / target
    if math.floor(n * scale) == size:
        return scale
    scale = size / n  # within 1e-4 voxel of spacing / target over the whole axis
    while math.floor(n * scale) < size:
        scale = math.nextafter(scale, math.inf)
    return scale


def resample(
    array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], target: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling on the same axes to voxel size ``target``, keeping the field of view centred.

    Output voxel ``i`` samples input index ``(i + 0.5)·r - 0.5`` with ``r = target / spacing`` (edge voxels
    are replicated, as ``F.interpolate(..., align_corners=False)`` does), and there are :func:`output_shape`
    voxels per axis. Trilinear interpolation is linear interpolation along each axis in turn
    (:func:`_linear_axis`): the axes that shrink go first and the one that grows most goes last, so each pass
    works on the smallest array it can, about half the time of one trilinear kernel over the output. Memory:
    one float32 copy of the input, the output and one temporary of the largest intermediate.

    Args:
        array: (X, Y, Z) voxels.
        affine: (4, 4) voxel → world of ``array``.
        spacing: current voxel size per axis (mm).
        target: wanted voxel size per axis (mm).

    Returns:
        A new (X', Y', Z') float32 array (never a view of ``array``) and its (4, 4) affine.
    """
    import torch

    sizes = output_shape(array.shape, spacing, target)
    scales = [
        _interpolate_scale(n, s, t, m) for n, s, t, m in zip(array.shape, spacing, target, sizes, strict=True)
    ]
    # A new array even where nothing is resampled: callers may overwrite the result (intensity_policy).
    x = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    for axis in sorted(range(3), key=lambda a: (scales[a], a)):
        if abs(scales[axis] - 1.0) > 1e-9:
            x = _linear_axis(x, axis, scales[axis], sizes[axis])
    assert list(x.shape) == sizes, (list(x.shape), sizes, scales)
    ratios = [1.0 / s for s in scales]
    step = np.eye(4)
    step[:3, :3] = np.diag(ratios)
    step[:3, 3] = [0.5 * r - 0.5 for r in ratios]
    return x.numpy(), affine @ step


def _linear_axis(x: Any, axis: int, scale: float, size: int) -> Any:
    """Linear interpolation of the (X, Y, Z) float32 tensor ``x`` along ``axis`` to ``size`` voxels: output
    voxel ``i`` is input index ``max(0, (i + 0.5) / scale - 0.5)``, the next voxel clamped to the last."""
    import torch
    import torch.nn.functional as F

    n = x.shape[axis]
    if axis == 2:  # the contiguous axis: one 1-D kernel over every row
        rows = x.reshape(1, -1, n)
        out = F.interpolate(
            rows, scale_factor=scale, mode="linear", align_corners=False, recompute_scale_factor=False
        )
        return out.reshape(x.shape[0], x.shape[1], size)
    source = np.maximum((np.arange(size, dtype=np.float64) + 0.5) / scale - 0.5, 0.0)
    lo = np.minimum(np.floor(source).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    weight = torch.from_numpy((source - lo).astype(np.float32)).reshape(
        [-1 if a == axis else 1 for a in range(3)]
    )
    # Whole planes are gathered (contiguous copies), then blended in place: lo + weight * (hi - lo).
    below = x.index_select(axis, torch.from_numpy(lo))
    return below.lerp_(x.index_select(axis, torch.from_numpy(hi)), weight)


def detect_modality(raw: RawVolume, override: str) -> tuple[str, str]:
    """The modality of a volume and where it came from.

    Args:
        raw: the volume as read.
        override: ``auto``, ``ct`` or ``mr`` (``--modality``).

    Returns:
        ``ct`` or ``mr``, and its source: ``option`` (``override`` is not ``auto``), ``header`` (the
        reader's ``modality_hint``, e.g. DICOM's Modality tag) or ``heuristic`` (integer voxels reaching
        :data:`CT_MIN_HU` or lower are CT, the rest MR).
    """
    if override != "auto":
        return override, "option"
    if raw.modality_hint is not None:
        return raw.modality_hint, "header"
    is_ct = raw.stored_dtype.kind in "iu" and float(raw.array.min()) <= CT_MIN_HU
    return ("ct" if is_ct else "mr"), "heuristic"


def intensity_policy(volume: np.ndarray, modality: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The voxels as stored in the shards, and the policy that made them (kept in the sample metadata).

    CT: HU rounded and clipped to :data:`pcrl.shards.CT_HU_RANGE`, int16. MR: the :data:`MR_PERCENTILES`
    of the volume mapped to [0, 1] and clipped, float16.

    Args:
        volume: (X, Y, Z) float32 voxels (CT in HU; MR in scanner units); overwritten (it is scratch space:
            one pass over it in place instead of a temporary copy per operation).
        modality: ``ct`` or ``mr``.

    Returns:
        The (X, Y, Z) stored array and the policy record (``kind``, ``dtype`` and its parameters).

    Raises:
        RejectedInput: an MR volume whose two percentiles are equal (constant intensity).
    """
    if volume.dtype != np.float32:
        raise TypeError(f"intensity_policy takes the float32 volume of resample(), not {volume.dtype}")
    if modality == "ct":
        lo, hi = CT_HU_RANGE
        np.rint(volume, out=volume)
        np.clip(volume, lo, hi, out=volume)
        return volume.astype(np.int16), {"kind": "ct_hu", "clip_hu": [lo, hi], "dtype": "int16"}
    p_lo, p_hi = (float(v) for v in np.percentile(volume, MR_PERCENTILES))
    if not p_hi > p_lo:
        raise RejectedInput(f"constant intensity: percentiles {list(MR_PERCENTILES)} are both {p_lo:g}")
    # The same float32 operations as (volume - p_lo) / (p_hi - p_lo), done in place.
    np.subtract(volume, np.float32(p_lo), out=volume)
    np.divide(volume, np.float32(p_hi - p_lo), out=volume)
    np.clip(volume, 0.0, 1.0, out=volume)
    stored = volume.astype(np.float16)
    policy = {
        "kind": "mr_percentile",
        "percentiles": list(MR_PERCENTILES),
        "values": [p_lo, p_hi],
        "dtype": "float16",
    }
    return stored, policy


@dataclass
class Prepared:
    """A volume ready to write, encoded and compressed by the worker: the two tar members (WebDataset) or
    the files of its Zarr array, and the manifest facts (``info``, with the ``checksum``)."""

    index: int
    key: str
    image: bytes
    """``.npy.zst`` bytes (WebDataset; empty for Zarr)."""
    meta: bytes
    info: dict[str, Any]
    zarr_files: dict[str, bytes] | None = None
    """Zarr: path inside the array folder → bytes (``zarr.json`` and compressed chunks); ``None`` when staged."""
    staged: str = ""
    """Where the worker wrote the image (WebDataset: a file of the ``.npy.zst`` bytes; Zarr: the array's
    folder) when it was given a staging folder; ``""`` when the bytes travel in this object instead."""
    staged_bytes: int = 0
    """Bytes of what was staged (the image file, or every file of the Zarr array)."""
    staged_files: tuple[str, ...] = ()
    """Zarr, staged: the paths inside the array folder, as the keys of :attr:`zarr_files` were."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of preparing it (:data:`data_prep.timing.VOLUME_STAGES`), for ``summary.json``."""


def prepare_volume(
    index: int,
    item: Item,
    options: ShardOptions,
    provenance: Provenance | None = None,
    staging: str | None = None,
) -> Prepared | Rejected:
    """Read, reorient, resample and encode one input; never raises for a bad input (returns Rejected).

    ``provenance`` (:func:`data_prep.provenance.item_provenance`; ``None``: unknown) goes into the sample's
    metadata and its manifest facts as ``data_source`` and ``license``. The seconds of each stage
    (:data:`data_prep.timing.VOLUME_STAGES`) come back in :attr:`Prepared.seconds`.

    With ``staging`` (a folder on the output's file system, for workers on the writer's machine), the
    compressed image (or the Zarr array's files) is written there as ``<index>`` and only its path comes
    back (:attr:`Prepared.staged`): the parent moves it into place instead of receiving, unpickling and
    writing the bytes, which keeps its serial work per volume small.
    """
    try:
        with Stopwatch().active() as watch:
            prepared = _prepare(index, item, options, provenance or Provenance(), watch)
            if staging is not None:
                with watch.time("stage"):
                    _stage(prepared, Path(staging) / str(index))
        prepared.seconds = watch.rounded(6)
        return prepared
    except RejectedInput as e:
        return Rejected(index, item.source, str(item.path), str(e))
    except MemoryError:
        return Rejected(
            index, item.source, str(item.path),
            f"out of memory while preparing the volume (lower --max-voxels, now {options.max_voxels}, to "
            "reject such volumes from their headers, or use fewer --workers)",
        )  # fmt: skip
    except OSError as e:  # vanished, unreadable (permissions, I/O error) while reading
        return Rejected(index, item.source, str(item.path), f"unreadable: {type(e).__name__}: {e}")
    except Exception as e:  # a reader bug must not stop a 10^5-volume job; it is reported, not hidden
        logger.exception("unexpected error on %s", item.path)
        return Rejected(index, item.source, str(item.path), f"unexpected error: {type(e).__name__}: {e}")


def _stage(prepared: Prepared, target: Path) -> None:
    """Write the image (or the Zarr array's files) of ``prepared`` to ``target`` and drop the bytes."""
    if prepared.zarr_files is not None:
        prepared.staged_bytes = write_array_files(target, prepared.zarr_files)
        prepared.staged_files = tuple(prepared.zarr_files)
        prepared.zarr_files = None
    else:
        target.write_bytes(prepared.image)
        prepared.staged_bytes = len(prepared.image)
        prepared.image = b""
    prepared.staged = str(target)


def _load(item: Item, options: ShardOptions) -> RawVolume:
    if isinstance(item, InputSeries):
        return load_dicom(item.paths, max_voxels=options.max_voxels)
    if volume_suffix(item.path) is None and is_dicom(item.path):
        return load_dicom([item.path], max_voxels=options.max_voxels)
    return load_volume(item.path, take_volume=options.take_volume, max_voxels=options.max_voxels)


def _prepare(
    index: int, item: Item, options: ShardOptions, provenance: Provenance, watch: Stopwatch
) -> Prepared:
    with watch.time("read"):  # less its "reorient" part, which the reader marks (data_prep.readers.finalize)
        raw = _load(item, options)
    source_shape = [int(n) for n in raw.array.shape]
    source_spacing = [round(s, 6) for s in raw.spacing]
    with watch.time("intensity"):
        modality, modality_source = detect_modality(raw, options.modality)
    out_shape = output_shape(source_shape, raw.spacing, options.spacing)
    check_voxels(out_shape, options.max_voxels, f"after resampling to {list(options.spacing)} mm,")
    if any(n < m for n, m in zip(out_shape, options.min_size, strict=True)):
        raise RejectedInput(
            f"too small after resampling to {list(options.spacing)} mm: shape {out_shape} < minimum "
            f"{list(options.min_size)} (lower --min-size to keep it)"
        )
    with watch.time("resample"):
        volume, affine = resample(raw.array, raw.affine, raw.spacing, options.spacing)
    del raw.array
    crop: dict[str, Any] | None = None
    with watch.time("intensity"):
        if options.crop_body:
            start, size, crop = body_box(volume, modality, options.spacing, options.min_size)
            volume = np.ascontiguousarray(
                volume[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))]
            )
            shift = np.eye(4)
            shift[:3, 3] = start
            affine = affine @ shift
        stored, policy = intensity_policy(volume, modality)
    del volume
    with watch.time("encode"):
        # The key and checksum of both formats come from the same .npy bytes: same volume, same key.
        digest = npy_sha256(stored)
        key = digest[:16]
    if options.format == "zarr":
        image, checksum = b"", digest  # Zarr's checksum is of the .npy bytes, as pcrl.shards verifies it
    else:
        with watch.time("compress"):
            image = compress_volume(stored, options.compression_level)
        with watch.time("encode"):
            checksum = hashlib.sha256(image).hexdigest()
    spacing = [float(round(v, 6)) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    patient = patient_hash(patient_id(item), options.salt)
    split = assign_split(patient, options.splits)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": item.source,
        "data_source": provenance.data_source,
        "license": provenance.license,
        "modality": modality,
        "modality_source": modality_source,
        "dtype": str(stored.dtype),
        "shape": [int(n) for n in stored.shape],
        "spacing": spacing,
        "affine": [[float(v) for v in row] for row in affine],
        "intensity": policy,
        "patient": patient,
        "split": split,
        "source_shape": source_shape,
        "source_spacing": source_spacing,
        "source_dtype": str(raw.stored_dtype),
        "source_orientation": raw.header.get("source_orientation", ""),
    }
    if isinstance(item, InputSeries):
        meta["source_files"] = [p.relative_to(item.root).as_posix() for p in item.paths]
        meta["series"] = patient_hash(item.series_uid, options.salt)
    if "volume_index" in raw.header:
        meta["volume_index"] = raw.header["volume_index"]
    if crop is not None:
        meta["crop"] = crop
    facts = ("key", "shape", "spacing", "modality", "dtype", "split", "source", "patient", *PROVENANCE_KEYS)
    info = {k: meta[k] for k in facts}
    info["files"] = len(item.paths) if isinstance(item, InputSeries) else 1
    info["checksum"] = "sha256:" + checksum
    files = None
    if options.format == "zarr":
        with watch.time("compress"):
            files = encode_array(stored, meta, options.compression_level)
    with watch.time("encode"):
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
    return Prepared(index, key, image, meta_bytes, info, files)
