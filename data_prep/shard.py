"""Volumes on disk (NIfTI, NRRD, MetaImage, DICOM) → WebDataset tar shards or a Zarr v3 store +
``manifest.jsonl`` / ``rejects.jsonl`` / ``summary.json``.

Usage::

    python -m data_prep.shard --input RAW [RAW ...] --output SHARDS [--spacing 1 1 1] [--modality auto]
        [--shard-size-mb 256] [--split train=0.9,val=0.1] [--workers N | --ray ADDRESS] [--crop-body]
        [--format webdataset|zarr] [--exclude GLOB ...]

Each input file goes through: read (:mod:`data_prep.readers`) → canonical RAS+ → linear resampling to the
target spacing → intensity policy (CT: int16 HU clipped to [-1024, 3071]; MR: float16, percentiles
0.5/99.5 → [0, 1]) → optional body crop (:mod:`data_prep.crop`) → one sample ``<key>.image.npy.zst`` +
``<key>.meta.json`` (or one Zarr array). Every input ends as exactly one ``manifest.jsonl`` line or one
``rejects.jsonl`` line with the reason. ``qa.png`` (:mod:`data_prep.qa`) shows a sample of the accepted
volumes for a check by eye.

Volumes and DICOM headers are prepared by :class:`data_prep.pool.Pool`: this process, local worker
processes, or Ray tasks. The output is byte-for-byte deterministic for any ``--workers`` and back end: inputs are sorted, workers only prepare
samples, and the parent writes them in input order into tars with fixed metadata (mtime 0, uid/gid 0).
Keys are the first 16 hex digits of the sha256 of the uncompressed ``.npy`` bytes (see
:func:`pcrl.data.encode_volume`); two inputs with identical content are one volume (the second is rejected
as a duplicate). Files appear under temporary names and are renamed when complete; the manifest is
written last, so a folder with a manifest is a complete shard set. ``summary.json`` records a fingerprint of
the inputs and options: a re-run of the same job writes nothing, and a killed job resumes from
``journal.jsonl``, whose entries are flushed only when the shard (or Zarr array) holding them is complete.

Exit codes: 0 done, 2 usage error, 3 more rejects than ``--max-reject-fraction`` (outputs still written),
1 a local worker process died (out of memory?); completed shards are kept for the re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.crop import body_box
from data_prep.dicom import DicomHeader, group_series, is_dicom, load_dicom, read_header, series_tag
from data_prep.pool import Pool, PoolError
from data_prep.qa import QA_NAME, write_qa_sheet
from data_prep.readers import RawVolume, RejectedInput, load_volume, volume_suffix
from data_prep.zarr_writer import STORE_NAME, ZarrWriter, encode_array
from pcrl.data import (
    CT_HU_RANGE,
    IMAGE_SUFFIX,
    MANIFEST_KEYS,
    MANIFEST_NAME,
    META_SUFFIX,
    SPLITS,
    encode_volume,
)
from pcrl.io import write_atomic

__all__ = [
    "ShardOptions",
    "Summary",
    "assign_split",
    "find_inputs",
    "main",
    "output_shape",
    "parse_splits",
    "patient_hash",
    "resample",
    "shard_volumes",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MR_PERCENTILES = (0.5, 99.5)
REJECTS_NAME = "rejects.jsonl"
SUMMARY_NAME = "summary.json"
SHARD_PATTERN = "shard-{:06d}.tar"
# Heuristic for formats without a modality tag: integer voxels reaching this low are CT (air is -1000 HU).
CT_MIN_HU = -500


# --- options ------------------------------------------------------------------------------------------


def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.9,val=0.1"`` → ``{"train": 0.9, "val": 0.1}`` (fractions must sum to 1)."""
    splits: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLITS:
            raise ValueError(
                f"--split: expected name=fraction with name in {', '.join(SPLITS)}, got {part!r}"
            )
        if name in splits:
            raise ValueError(f"--split: {name} given twice in {text!r}")
        try:
            splits[name] = float(value)
        except ValueError:
            raise ValueError(f"--split: {value!r} is not a number (in {text!r})") from None
        if not 0.0 <= splits[name] <= 1.0:
            raise ValueError(f"--split: fraction of {name} must be in [0, 1], got {splits[name]}")
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"--split: fractions must sum to 1, got {sum(splits.values())} from {text!r}")
    return splits


@dataclass(frozen=True)
class ShardOptions:
    """Options of :func:`shard_volumes` (the CLI flags of the same names)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Target voxel size (x, y, z) in mm."""
    modality: str = "auto"
    """``auto`` (integer voxels with min <= -500 → CT, else MR), ``ct`` or ``mr``."""
    shard_size_mb: float = 256.0
    """Target shard size; a shard closes before the sample that would push it past this."""
    splits: Mapping[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.1})
    """Split fractions, assigned by a salted hash of the patient id."""
    workers: int = 1
    """Processes preparing volumes (<= 1: in this process). The output does not depend on it."""
    ray: str | None = None
    """Prepare volumes (and read DICOM headers) as Ray tasks: ``local`` starts a private Ray instance with
    ``workers`` CPUs, anything else is the address of a running cluster (``auto``, ``host:6379``,
    ``ray://host:10001``). The output does not depend on it."""
    crop_body: bool = False
    """Crop each volume to the box around the body (CT: above -500 HU; MR: above 10 % of its robust range;
    largest connected part, plus a margin), dropping the air around the patient. Recorded as ``crop`` in
    the metadata."""
    max_reject_fraction: float = 0.5
    """The CLI exits 3 when more than this fraction of the inputs is rejected."""
    min_size: tuple[int, int, int] = (64, 64, 32)
    """Smallest accepted (x, y, z) shape after resampling."""
    max_voxels: int = 1024**3
    """Largest accepted volume after resampling (keeps one volume's memory bounded)."""
    exclude: tuple[str, ...] = ()
    """Glob patterns (matched against the file name and the path relative to its input root) to skip."""
    salt: str = "pcrl"
    """Salt of the patient-id hash (stored ids and split assignment)."""
    format: str = "webdataset"
    """``webdataset`` (tar shards) or ``zarr`` (a Zarr v3 store, one array per volume)."""
    series_gaps: str = "reject"
    """A DICOM series with a missing slice or uneven spacing: ``reject`` it, or ``split`` it into its evenly
    spaced runs (each its own volume)."""
    take_volume: int | None = None
    """For 4D NIfTI/NRRD/MetaImage inputs, keep this volume (0-based) of the 4th axis; ``None`` rejects them."""
    overwrite: bool = False
    """Replace an existing shard set in the output folder."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {list(self.spacing)}")
        if self.modality not in ("auto", "ct", "mr"):
            raise ValueError(f"modality must be auto, ct or mr, got {self.modality!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if (
            not self.splits
            or any(k not in SPLITS for k in self.splits)
            or abs(sum(self.splits.values()) - 1) > 1e-6
        ):
            raise ValueError(
                f"splits must map {', '.join(SPLITS)} to fractions summing to 1, got {dict(self.splits)}"
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        if len(self.min_size) != 3 or min(self.min_size) < 1:
            raise ValueError(f"min_size must be three positive voxel counts, got {list(self.min_size)}")
        if self.series_gaps not in ("reject", "split"):
            raise ValueError(f"series_gaps must be reject or split, got {self.series_gaps!r}")
        if self.take_volume is not None and self.take_volume < 0:
            raise ValueError(f"take_volume must be >= 0, got {self.take_volume}")
        if self.format not in ("webdataset", "zarr"):
            raise ValueError(f"format must be webdataset or zarr, got {self.format!r}")
        if self.ray is not None and not self.ray.strip():
            raise ValueError("--ray needs an address: local, auto, host:port or ray://host:port")


@dataclass(frozen=True)
class InputFile:
    """One input volume and the root it was found under (``source`` is relative to that root)."""

    path: Path
    root: Path

    @property
    def source(self) -> str:
        return self.path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class InputSeries:
    """One DICOM volume: the files of a series (or of one part of a split series), or one multi-frame or
    mosaic file."""

    paths: tuple[Path, ...]
    root: Path
    series_uid: str
    part: int
    """0 when the SeriesInstanceUID is one volume, else 1, 2, ... (see :func:`data_prep.dicom.group_series`)."""
    dicom_patient: str | None = None
    """``PatientID`` from the headers (hashed before it is stored)."""

    @property
    def path(self) -> Path:
        """The single file, or the folder holding the series' files (for messages)."""
        if len(self.paths) == 1:
            return self.paths[0]
        return Path(os.path.commonpath([str(p.parent) for p in self.paths]))

    @property
    def source(self) -> str:
        """The file relative to the root, or ``<folder>/series-<uid hash>[-partN]`` (no raw UID)."""
        if len(self.paths) == 1 and self.part == 0:
            return self.paths[0].relative_to(self.root).as_posix()
        folder = self.path.relative_to(self.root).as_posix()
        name = f"series-{series_tag(self.series_uid)}" + (f"-part{self.part}" if self.part else "")
        return name if folder == "." else f"{folder}/{name}"


Item = InputFile | InputSeries


@dataclass
class Discovery:
    """What :func:`find_inputs` found: volumes to prepare, DICOM files rejected from their headers alone,
    and files that are no image at all (every file under the inputs is in one of the three)."""

    items: list[Item]
    rejects: list[Rejected]
    ignored: list[Rejected]

    @property
    def files(self) -> int:
        return (
            sum(len(i.paths) if isinstance(i, InputSeries) else 1 for i in self.items)
            + len(self.rejects)
            + len(self.ignored)
        )


def list_files(inputs: Sequence[Path], exclude: Sequence[str] = ()) -> list[InputFile]:
    """Every file given directly or found recursively under a folder, minus ``exclude``, sorted by path.

    Raises:
        FileNotFoundError: an input does not exist.
    """
    found: dict[Path, InputFile] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            root = path.absolute()
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    found.setdefault(p, InputFile(p, root))
        elif path.is_file():
            p = path.absolute()
            found.setdefault(p, InputFile(p, p.parent))  # explicit files are taken whatever their suffix
        else:
            raise FileNotFoundError(f"input {raw} does not exist")

    def excluded(item: InputFile) -> bool:
        return any(fnmatch.fnmatch(item.path.name, g) or fnmatch.fnmatch(item.source, g) for g in exclude)

    return sorted((i for i in found.values() if not excluded(i)), key=lambda i: str(i.path))


def find_inputs(
    inputs: Sequence[Path],
    exclude: Sequence[str] = (),
    split_gaps: bool = False,
    pool: Pool | None = None,
    files: Sequence[InputFile] | None = None,
) -> Discovery:
    """Files given directly and files found recursively under folders, minus ``exclude``, as volumes.

    NIfTI/NRRD/MetaImage files are one volume each. DICOM files (``.dcm``/``.ima`` or the ``DICM`` magic)
    have their headers read and are grouped into series (:func:`data_prep.dicom.group_series`, per input
    root); a file whose header says it is no image (RTSTRUCT, SR, no pixel data) or that cannot be parsed is
    rejected here. Other files under a folder are listed as ignored. With a parallel ``pool`` the headers
    are read by its workers, in batches. ``files``: the :func:`list_files` of the same arguments, when the
    caller has it already.

    Raises:
        FileNotFoundError: an input does not exist, or no volume or DICOM file is found at all.
    """
    files = list_files(inputs, exclude) if files is None else files
    ignored: list[Rejected] = []
    explicit = {Path(r).expanduser().absolute() for r in inputs if Path(r).expanduser().is_file()}
    items: list[Item] = []
    headers: dict[Path, list[DicomHeader]] = {}
    rejects: list[Rejected] = []
    dicom: list[InputFile] = []
    for f in files:
        if volume_suffix(f.path) is not None:
            items.append(f)
        elif is_dicom(f.path):
            dicom.append(f)
        elif f.path in explicit:
            items.append(f)  # rejected by the reader with "unsupported file type"
        else:
            ignored.append(
                Rejected(-1, f.source, str(f.path), "ignored: not a NIfTI, NRRD, MetaImage or DICOM file")
            )
    for f, header in zip(dicom, _read_headers([f.path for f in dicom], pool), strict=True):
        if isinstance(header, str):
            rejects.append(Rejected(-1, f.source, str(f.path), header))
        else:
            headers.setdefault(f.root, []).append(header)
    for root, hs in headers.items():
        for s in group_series(hs, split_gaps=split_gaps):
            items.append(InputSeries(s.paths, root, s.series_uid, s.part, s.patient_id))
    items.sort(
        key=lambda i: (str(i.paths[0] if isinstance(i, InputSeries) else i.path), getattr(i, "part", 0))
    )
    if not items and not rejects:
        raise FileNotFoundError(
            f"no volume files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, DICOM) found in {[str(p) for p in inputs]}"
            + (f" after --exclude {list(exclude)}" if exclude else "")
        )
    return Discovery(items, rejects, ignored)


# Files per header-reading task: enough to amortise a task's overhead, few enough to spread 10^3 files.
_HEADER_BATCH = 64


def _header_batch(paths: Sequence[Path]) -> list[DicomHeader | str]:
    """Headers of ``paths`` (runs in workers); a file that is rejected gives its reason instead."""
    out: list[DicomHeader | str] = []
    for path in paths:
        try:
            out.append(read_header(path))
        except RejectedInput as e:
            out.append(str(e))
    return out


def _read_headers(paths: Sequence[Path], pool: Pool | None) -> list[DicomHeader | str]:
    """:func:`_header_batch` of every path, in order; in the pool's workers when it has any and there is
    more than one batch."""
    if pool is None or not pool.parallel or len(paths) <= _HEADER_BATCH:
        return _header_batch(paths)
    batches = [(paths[i : i + _HEADER_BATCH],) for i in range(0, len(paths), _HEADER_BATCH)]
    return [h for batch in pool.map(_header_batch, batches) for h in batch]


# --- per-volume processing (runs in worker processes) -------------------------------------------------


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
    are replicated: ``align_corners=False``), and there are :func:`output_shape` voxels per axis. Memory:
    one float32 copy of the input plus the output.

    Args:
        array: (X, Y, Z) voxels.
        affine: (4, 4) voxel → world of ``array``.
        spacing: current voxel size per axis (mm).
        target: wanted voxel size per axis (mm).

    Returns:
        (X', Y', Z') float32 array and its (4, 4) affine.
    """
    import torch
    import torch.nn.functional as F

    sizes = output_shape(array.shape, spacing, target)
    scales = [
        _interpolate_scale(n, s, t, m) for n, s, t, m in zip(array.shape, spacing, target, sizes, strict=True)
    ]
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if any(abs(s - 1.0) > 1e-9 for s in scales):
        # recompute_scale_factor=False: the kernel steps exactly 1/scale input voxels per output voxel.
        x = F.interpolate(x[None, None], scale_factor=scales, mode="trilinear", align_corners=False,
                          recompute_scale_factor=False)[0, 0]  # fmt: skip
    assert list(x.shape) == sizes, (list(x.shape), sizes, scales)
    ratios = [1.0 / s for s in scales]
    step = np.eye(4)
    step[:3, :3] = np.diag(ratios)
    step[:3, 3] = [0.5 * r - 0.5 for r in ratios]
    return x.numpy(), affine @ step


def _modality(raw: RawVolume, override: str) -> tuple[str, str]:
    if override != "auto":
        return override, "option"
    if raw.modality_hint is not None:
        return raw.modality_hint, "header"
    is_ct = raw.stored_dtype.kind in "iu" and float(raw.array.min()) <= CT_MIN_HU
    return ("ct" if is_ct else "mr"), "heuristic"


def _intensity(volume: np.ndarray, modality: str) -> tuple[np.ndarray, dict[str, Any]]:
    if modality == "ct":
        lo, hi = CT_HU_RANGE
        stored = np.clip(np.rint(volume), lo, hi).astype(np.int16)
        return stored, {"kind": "ct_hu", "clip_hu": [lo, hi], "dtype": "int16"}
    p_lo, p_hi = (float(v) for v in np.percentile(volume, MR_PERCENTILES))
    if not p_hi > p_lo:
        raise RejectedInput(f"constant intensity: percentiles {list(MR_PERCENTILES)} are both {p_lo:g}")
    stored = np.clip((volume - p_lo) / (p_hi - p_lo), 0.0, 1.0).astype(np.float16)
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
    """Zarr: path inside the array folder → bytes (``zarr.json`` and compressed chunks)."""


@dataclass
class Rejected:
    index: int
    source: str
    path: str
    reason: str


def prepare_volume(index: int, item: Item, options: ShardOptions) -> Prepared | Rejected:
    """Read, reorient, resample and encode one input; never raises for a bad input (returns Rejected)."""
    try:
        return _prepare(index, item, options)
    except RejectedInput as e:
        return Rejected(index, item.source, str(item.path), str(e))
    except MemoryError:
        return Rejected(index, item.source, str(item.path), "out of memory while preparing the volume")
    except Exception as e:  # a reader bug must not stop a 10^5-volume job; it is reported, not hidden
        logger.exception("unexpected error on %s", item.path)
        return Rejected(index, item.source, str(item.path), f"unexpected error: {type(e).__name__}: {e}")


def _load(item: Item, options: ShardOptions) -> RawVolume:
    if isinstance(item, InputSeries):
        return load_dicom(item.paths)
    if volume_suffix(item.path) is None and is_dicom(item.path):
        return load_dicom([item.path])
    return load_volume(item.path, take_volume=options.take_volume)


def _prepare(index: int, item: Item, options: ShardOptions) -> Prepared:
    raw = _load(item, options)
    source_shape = [int(n) for n in raw.array.shape]
    source_spacing = [round(s, 6) for s in raw.spacing]
    modality, modality_source = _modality(raw, options.modality)
    out_shape = output_shape(source_shape, raw.spacing, options.spacing)
    if int(np.prod(out_shape, dtype=np.int64)) > options.max_voxels:
        raise RejectedInput(
            f"too large after resampling: shape {out_shape} has more than {options.max_voxels} voxels"
        )
    if any(n < m for n, m in zip(out_shape, options.min_size, strict=True)):
        raise RejectedInput(
            f"too small after resampling to {list(options.spacing)} mm: shape {out_shape} < minimum "
            f"{list(options.min_size)} (lower --min-size to keep it)"
        )
    volume, affine = resample(raw.array, raw.affine, raw.spacing, options.spacing)
    del raw.array
    crop: dict[str, Any] | None = None
    if options.crop_body:
        start, size, crop = body_box(volume, modality, options.spacing, options.min_size)
        volume = np.ascontiguousarray(
            volume[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))]
        )
        shift = np.eye(4)
        shift[:3, 3] = start
        affine = affine @ shift
    stored, policy = _intensity(volume, modality)
    del volume
    if options.format == "zarr":
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(stored), version=(1, 0), allow_pickle=False)
        checksum = hashlib.sha256(buf.getvalue()).hexdigest()  # of the .npy bytes, as pcrl.data verifies it
        del buf
        image, key = b"", checksum[:16]  # the key of encode_volume: same volume, same key in both formats
    else:
        image, key = encode_volume(stored)
        checksum = hashlib.sha256(image).hexdigest()
    spacing = [float(round(v, 6)) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    patient = patient_hash(patient_id(item), options.salt)
    split = assign_split(patient, options.splits)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": item.source,
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
    info = {
        k: meta[k] for k in ("key", "shape", "spacing", "modality", "dtype", "split", "source", "patient")
    }
    info["files"] = len(item.paths) if isinstance(item, InputSeries) else 1
    info["checksum"] = "sha256:" + checksum
    files = encode_array(stored, meta) if options.format == "zarr" else None
    return Prepared(index, key, image, json.dumps(meta, sort_keys=True).encode(), info, files)


# --- writing -------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of about ``max_bytes`` each, deterministically."""

    def __init__(self, output: Path, max_bytes: int, done: Sequence[str] = ()) -> None:
        self.output = output
        self.max_bytes = max_bytes
        self.shards: list[str] = list(done)
        """Shard names, complete ones first; a resumed job starts after the ``done`` ones."""
        self.closed = len(self.shards)
        """Complete (renamed) shards: everything added before the latest close is on disk for good."""
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    @staticmethod
    def _member_bytes(size: int) -> int:
        return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
        """Append one sample (never split across shards). Returns member suffix → (data offset, size)."""
        need = sum(self._member_bytes(len(data)) for _, data in members)
        if self._tar is not None and self._tar.offset + need > self.max_bytes:
            self._close_shard()
        if self._tar is None:
            name = SHARD_PATTERN.format(len(self.shards))
            self._tmp = self.output / f"{name}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans many add() calls)
            self.shards.append(name)
        tar = self._tar
        offsets: dict[str, tuple[int, int]] = {}
        for suffix, data in sorted(members):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
            data_offset = tar.offset + header
            tar.addfile(info, _BytesReader(data))
            assert tar.offset == data_offset + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            offsets[suffix] = (data_offset, len(data))
        return offsets

    @property
    def current(self) -> str:
        return self.shards[-1]

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        self._tmp.replace(self._tmp.with_suffix(""))  # shard-000000.tar.tmp → shard-000000.tar
        self._tar = self._tmp = None
        self.closed += 1

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()


class _BytesReader:
    """Minimal file object for ``TarFile.addfile`` without copying ``data`` into a BytesIO."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        chunk = self._view[self._pos : end]
        self._pos += len(chunk)
        return bytes(chunk)


JOURNAL_NAME = "journal.jsonl"


@dataclass
class Resume:
    """What an interrupted job left that is complete: journal entries of a prefix of the volumes."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    done: Summary | None = None
    """Set when the output already holds the complete result of the same job."""

    @property
    def next_index(self) -> int:
        return self.entries[-1]["index"] + 1 if self.entries else 0

    @property
    def shards(self) -> list[str]:
        return sorted({e["shard"] for e in self.entries if e.get("shard")})


def _read_journal(path: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The entries of a journal written for ``fingerprint``, or ``None`` (absent, other job, unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("fingerprint") != fingerprint:
            return None
        entries = []
        for text in lines[1:]:
            try:
                entries.append(json.loads(text))
            except ValueError:
                break  # a line cut by the kill: everything after it is recomputed
        return entries
    except (OSError, ValueError, IndexError):
        return None


def _completed(output: Path, fingerprint: str) -> Summary | None:
    """The summary of ``output`` when it holds the complete result of the job ``fingerprint``, else None."""
    if not (output / MANIFEST_NAME).exists():
        return None
    try:
        previous = json.loads((output / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if previous.get("fingerprint") != fingerprint:
        return None
    # Killed between the manifest (the set is complete) and removing the journal: only tidy up.
    (output / JOURNAL_NAME).unlink(missing_ok=True)
    return Summary.from_dict(previous)


def _prepare_output(output: Path, overwrite: bool, fingerprint: str = "") -> Resume:
    """Check the output folder and find what can be reused.

    A complete set of the same job (same inputs, sizes, mtimes and options) is reused as is; a journal of the
    same job is resumed after its last complete shard; anything else in the way needs ``overwrite``.
    """
    output.mkdir(parents=True, exist_ok=True)
    ours = [
        *output.glob("shard-*.tar"),
        *(output / n for n in (MANIFEST_NAME, REJECTS_NAME, SUMMARY_NAME, QA_NAME)),
    ]
    ours += [p for p in (output / STORE_NAME).glob("*") if p.is_dir()]  # Zarr arrays, one per volume
    existing = [p for p in ours if p.exists()]
    journal = output / JOURNAL_NAME
    resume = Resume()
    same_job = False  # a journal of this job: whatever it left in the folder is ours to reuse or remove
    if not overwrite and fingerprint and (done := _completed(output, fingerprint)) is not None:
        return Resume(done=done)
    if not overwrite and fingerprint and journal.exists() and not (output / MANIFEST_NAME).exists():
        entries = _read_journal(journal, fingerprint)
        if entries is not None:
            # Even with no entries: killed after renaming its first shard or array, before journaling it.
            same_job = True
            resume = Resume(entries)
            # Drop a line cut by the kill before appending to the journal again.
            header = json.dumps({"fingerprint": fingerprint, "format_version": FORMAT_VERSION})
            write_atomic(journal, "".join(json.dumps(e) + "\n" for e in [json.loads(header), *entries]))
            missing = [s for s in resume.shards if not (output / s).exists()]
            if missing:
                logger.warning("cannot resume: %s is gone; starting again", missing[0])
                resume = Resume()
            # Shards and arrays the journal vouches for stay.
            existing = [p for p in existing if p.relative_to(output).as_posix() not in resume.shards]
        elif existing:
            raise FileExistsError(
                f"{output} holds an interrupted job with other inputs or options ({JOURNAL_NAME}); pass --overwrite "
                "or choose an empty folder"
            )
    if existing and not overwrite and not same_job:
        raise FileExistsError(
            f"{output} already holds a shard set of other inputs or options ({existing[0].name}, ...); pass "
            "--overwrite or choose an empty folder"
        )
    # Leftovers of an interrupted run (*.tmp, shards renamed after the journal's last line) and, with overwrite,
    # the previous set.
    for p in [*existing, *output.glob("*.tmp")]:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    if not resume.entries:
        journal.unlink(missing_ok=True)
    return resume


# --- the job -------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a sharding job did (also written to ``summary.json``)."""

    output: str
    inputs: int = 0
    """Volumes tried: volume files, DICOM series and DICOM files rejected from their header."""
    files: int = 0
    """Files found under the inputs (each is in the manifest, in rejects.jsonl, or ignored)."""
    ignored: int = 0
    """Files that are no image format at all (listed in rejects.jsonl with ``"ignored": true``)."""
    accepted: int = 0
    rejected: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    per_modality: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    total_bytes: int = 0
    max_reject_fraction: float = 0.5
    seconds: float = 0.0
    arguments: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    fingerprint: str = ""
    """sha256 of the input files (path, size, mtime) and of the options that change the output."""
    resumed: int = 0
    """Volumes taken over from an interrupted run instead of being prepared again."""
    up_to_date: bool = False
    """True when this call found the complete result of the same job and wrote nothing."""
    qa_sheet: str = ""
    """The QA picture beside the manifest (``qa.png``), or ``""`` when nothing was accepted."""
    qa_keys: list[str] = field(default_factory=list)
    """The volumes it shows, top to bottom."""

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.inputs if self.inputs else 0.0

    @property
    def too_many_rejects(self) -> bool:
        return self.reject_fraction > self.max_reject_fraction

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reject_fraction": self.reject_fraction}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Options that do not change what is written.
_RUN_ONLY_OPTIONS = ("workers", "ray", "progress", "overwrite", "max_reject_fraction")


def fingerprint(paths: Sequence[Path], opts: ShardOptions) -> str:
    """Identify a job by its input files (path, size, mtime: every file :func:`list_files` finds, the same
    set a :class:`Discovery` accounts for) and output-relevant options."""
    h = hashlib.sha256()
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _RUN_ONLY_OPTIONS}
    # 4 and 4.0 MB are the same job (the CLI gives floats, Python callers often ints).
    options["shard_size_mb"] = float(opts.shard_size_mb)
    options["spacing"] = [float(s) for s in opts.spacing]
    options["splits"] = {k: float(v) for k, v in opts.splits.items()}
    if not opts.crop_body:
        del options["crop_body"]  # added later: jobs without it keep the fingerprint they had
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for path in sorted(paths, key=str):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("pcrl", "numpy", "torch", "nibabel", "SimpleITK", "zstandard"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _results(
    items: Sequence[Item], options: ShardOptions, pool: Pool, start: int = 0
) -> Iterator[Prepared | Rejected]:
    """Prepared volumes ``start, start + 1, ...`` in input order, from the pool's workers (at most twice as
    many volumes in flight as workers: memory stays bounded by a few volumes, not by the dataset)."""

    def died(args: tuple[Any, ...], reason: str) -> Rejected:
        index, item, _ = args
        return Rejected(index, item.source, str(item.path), reason)

    tasks = ((i, items[i], options) for i in range(start, len(items)))
    yield from pool.map(prepare_volume, tasks, failed=died)


def shard_volumes(inputs: Sequence[Path], output: Path, **options: Any) -> Summary:
    """Shard volume files into ``output``. See the module docstring for the layout.

    Args:
        inputs: files and/or folders (searched recursively for NIfTI/NRRD/MetaImage files).
        output: the shard folder to create.
        **options: fields of :class:`ShardOptions`.

    Returns:
        The :class:`Summary`; check ``summary.too_many_rejects`` (the CLI exits 3 on it).

    Raises:
        FileNotFoundError: an input does not exist or no volume file is found.
        FileExistsError: ``output`` already holds a shard set and ``overwrite`` is not set.
        ValueError: an invalid option.
    """
    opts = ShardOptions(**options)
    with Pool(opts.workers, opts.ray) as pool:
        return _run(_start(inputs, Path(output), opts, pool), pool)


@dataclass
class _Job:
    """A sharding job that :func:`_start` has checked, ready for :func:`_run`."""

    inputs: Sequence[Path]
    output: Path
    opts: ShardOptions
    found: Discovery
    resume: Resume
    fingerprint: str
    """Of the input files and options (:func:`fingerprint`): the resume check's and ``summary.json``'s."""


def _start(inputs: Sequence[Path], output: Path, opts: ShardOptions, pool: Pool) -> _Job:
    """Everything that can fail because of the user's request, before any volume is read.

    A folder that already holds this job's complete output is recognised from the file listing alone,
    before any DICOM header is read (a no-op re-run of millions of DICOM files reads none of them).
    """
    files = list_files(inputs, opts.exclude)
    job = fingerprint([f.path for f in files], opts)
    if not opts.overwrite and (done := _completed(output, job)) is not None:
        return _Job(inputs, output, opts, Discovery([], [], []), Resume(done=done), job)
    found = find_inputs(inputs, opts.exclude, opts.series_gaps == "split", pool, files)
    resume = _prepare_output(output, opts.overwrite, job)
    return _Job(inputs, output, opts, found, resume, job)


def _reject_line(r: Rejected, files: int = 1, **extra: Any) -> str:
    return json.dumps({"source": r.source, "path": r.path, "reason": r.reason, "files": files, **extra})


def _add_to_zarr(store: ZarrWriter, result: Prepared) -> dict[str, Any]:
    """Write a prepared volume's Zarr array (compressed by the worker); its manifest line (``checksum``:
    sha256 of the ``.npy`` bytes, whose first 16 hex digits are the key)."""
    assert result.zarr_files is not None
    info = result.info
    name, size = store.add(result.key, result.zarr_files)
    line = {
        "key": result.key, "shard": name, "offset": 0, "size": size, "meta_offset": 0, "meta_size": 0,
        "shape": info["shape"], "spacing": info["spacing"], "modality": info["modality"], "dtype": info["dtype"],
        "split": info["split"], "checksum": info["checksum"], "source": info["source"],
        "patient": info["patient"], "files": info["files"], "format": "zarr",
    }  # fmt: skip
    assert set(MANIFEST_KEYS) <= set(line)
    return line


class _Journal:
    """Append-only record of finished volumes, flushed only when what it lists is complete on disk.

    Entries of volumes in the open shard wait in memory; when the shard is renamed they are written and
    fsynced. A killed job therefore leaves a journal whose entries are a prefix of the input order, all backed
    by complete shards: a re-run skips that prefix and continues with a new shard, exactly where an
    uninterrupted run would have started it.
    """

    def __init__(self, path: Path, fingerprint: str, resumed: bool) -> None:
        self._f = path.open("a" if resumed else "w", encoding="utf-8")
        if not resumed:
            self._f.write(json.dumps({"fingerprint": fingerprint, "format_version": FORMAT_VERSION}) + "\n")
            self._sync()
        self.pending: list[dict[str, Any]] = []

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def commit(self) -> None:
        self._f.write("".join(json.dumps(e) + "\n" for e in self.pending))
        self._sync()
        self.pending = []

    def close(self) -> None:
        self._f.close()


def _run(job: _Job, pool: Pool) -> Summary:
    output, opts, found, resume = job.output, job.opts, job.found, job.resume
    if resume.done is not None:
        logger.info("%s already holds this job's complete output; nothing to do", output)
        resume.done.up_to_date = True
        return resume.done
    from tqdm import tqdm

    start = time.perf_counter()
    summary = Summary(
        output=str(output.absolute()),
        inputs=len(found.items) + len(found.rejects),
        files=found.files,
        ignored=len(found.ignored),
        max_reject_fraction=opts.max_reject_fraction,
        arguments={
            "inputs": [str(p) for p in job.inputs],
            "output": str(output),
            **{
                k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(opts).items()
            },
        },
        versions=_versions(),
        fingerprint=job.fingerprint,
        resumed=resume.next_index,
    )
    items = found.items
    # Entries of the interrupted run: the same lines an uninterrupted run would have produced for them.
    manifest: list[str] = [json.dumps(e["manifest"]) for e in resume.entries if e.get("manifest")]
    rejects: list[str] = [json.dumps(e["reject"]) for e in resume.entries if e.get("reject")]
    seen: dict[str, str] = {
        e["manifest"]["key"]: e["manifest"]["source"] for e in resume.entries if e.get("manifest")
    }
    writer = ShardWriter(output, int(opts.shard_size_mb * 2**20), done=resume.shards)
    store = ZarrWriter(output) if opts.format == "zarr" else None
    journal = _Journal(output / JOURNAL_NAME, summary.fingerprint, resumed=bool(resume.entries))
    # tqdm shows volumes/s and the ETA; the back end says where the volumes are prepared.
    bar = tqdm(total=len(items), initial=resume.next_index, unit="vol", desc=f"sharding ({pool.backend})",
               disable=not opts.progress, file=sys.stderr, smoothing=0.1)  # fmt: skip
    try:
        for result in _results(items, opts, pool, start=resume.next_index):
            bar.update(1)
            if isinstance(result, Prepared) and result.key in seen:
                result = Rejected(
                    result.index, result.info["source"], str(items[result.index].path),
                    f"duplicate: same voxels as {seen[result.key]} (key {result.key})",
                )  # fmt: skip
            if isinstance(result, Rejected):
                item = items[result.index]
                rejects.append(_reject_line(result, len(item.paths) if isinstance(item, InputSeries) else 1))
                journal.pending.append({"index": result.index, "reject": json.loads(rejects[-1])})
                logger.info("rejected %s: %s", result.path, result.reason)
                continue
            seen[result.key] = result.info["source"]
            info = result.info
            if store is not None:
                line = _add_to_zarr(store, result)
                manifest.append(json.dumps(line))
                journal.pending.append({"index": result.index, "manifest": line, "shard": line["shard"]})
                journal.commit()  # each array is complete once renamed
                continue
            closed = writer.closed
            offsets = writer.add(result.key, [(IMAGE_SUFFIX, result.image), (META_SUFFIX, result.meta)])
            if writer.closed != closed:
                journal.commit()  # a shard was completed: every earlier volume is final
            line = {
                "key": result.key,
                "shard": writer.current,
                "offset": offsets[IMAGE_SUFFIX][0],
                "size": offsets[IMAGE_SUFFIX][1],
                "meta_offset": offsets[META_SUFFIX][0],
                "meta_size": offsets[META_SUFFIX][1],
                "shape": info["shape"],
                "spacing": info["spacing"],
                "modality": info["modality"],
                "dtype": info["dtype"],
                "split": info["split"],
                "checksum": info["checksum"],
                "source": info["source"],
                "patient": info["patient"],
                "files": info["files"],
            }
            assert set(MANIFEST_KEYS) <= set(line)
            manifest.append(json.dumps(line))
            journal.pending.append({"index": result.index, "manifest": line, "shard": writer.current})
        writer.close()
        if store is not None:
            store.close()
        journal.commit()
    finally:
        bar.close()
        journal.close()
    for text in manifest:
        m = json.loads(text)
        summary.accepted += 1
        summary.per_split[m["split"]] = summary.per_split.get(m["split"], 0) + 1
        summary.per_modality[m["modality"]] = summary.per_modality.get(m["modality"], 0) + 1
    summary.shards = len(writer.shards)
    summary.total_bytes = sum((output / s).stat().st_size for s in writer.shards)
    if store is not None:
        summary.total_bytes = sum(json.loads(m)["size"] for m in manifest)
    summary.seconds = round(time.perf_counter() - start, 3)
    # Header-level DICOM rejects and ignored files come after the volumes, sorted, so that every file is listed.
    summary.rejected = len(rejects) + len(found.rejects)
    rejects += [_reject_line(r) for r in found.rejects]
    rejects += [_reject_line(r, ignored=True) for r in found.ignored]
    try:
        summary.qa_keys = write_qa_sheet(output, [json.loads(m) for m in manifest])
        summary.qa_sheet = QA_NAME if summary.qa_keys else ""
    except Exception as e:  # a picture that cannot be drawn must not cost the finished shards
        logger.warning("could not draw the QA sheet %s: %s: %s", output / QA_NAME, type(e).__name__, e)
    write_atomic(output / REJECTS_NAME, "".join(r + "\n" for r in rejects))
    write_atomic(output / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n")
    write_atomic(output / MANIFEST_NAME, "".join(m + "\n" for m in manifest))  # last: marks the set complete
    (output / JOURNAL_NAME).unlink()
    return summary


# --- CLI -----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shard",
        description="Shard NIfTI/NRRD/MetaImage volumes into WebDataset tars with a seekable manifest.",
    )
    p.add_argument("--input", nargs="+", action="extend", required=True, type=Path, metavar="PATH",
                   help="volume files or folders (searched recursively)")  # fmt: skip
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="shard folder to write")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "zarr"],
                   help="webdataset: tar shards; zarr: a Zarr v3 store with one chunked array per volume")  # fmt: skip
    p.add_argument("--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"),
                   help="target voxel size in mm (default: 1 1 1)")  # fmt: skip
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"],
                   help="auto: integer voxels with min <= -500 are CT, the rest MR")  # fmt: skip
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default: 256)")
    p.add_argument(
        "--split", default="train=0.9,val=0.1", help="split fractions by patient (default: train=0.9,val=0.1)"
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes preparing volumes (default: min(8, cores)); the output does not depend on it")  # fmt: skip
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="prepare volumes as Ray tasks: 'local' (a private Ray instance with --workers CPUs), 'auto' "
                        "or a cluster address (inputs must be readable on every node); same output")  # fmt: skip
    p.add_argument("--crop-body", action="store_true",
                   help="crop each volume to the box around the body (plus a margin), dropping the air around it")  # fmt: skip
    p.add_argument("--max-reject-fraction", type=float, default=0.5,
                   help="exit with code 3 when more inputs than this are rejected (default: 0.5)")  # fmt: skip
    p.add_argument("--min-size", nargs=3, type=int, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="smallest accepted shape after resampling (default: 64 64 32)")  # fmt: skip
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose name or relative path matches (repeatable), e.g. '*_label*'")  # fmt: skip
    p.add_argument("--series-gaps", default="reject", choices=["reject", "split"],
                   help="a DICOM series with a missing slice or uneven spacing: reject it (default) or split it "
                        "into evenly spaced runs")  # fmt: skip
    p.add_argument("--take-volume", type=int, default=None, metavar="T",
                   help="keep volume T (0-based) of 4D NIfTI/NRRD/MetaImage inputs instead of rejecting them")  # fmt: skip
    p.add_argument("--salt", default="pcrl", help="salt of the patient-id hash")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = {
            "spacing": tuple(args.spacing),
            "modality": args.modality,
            "shard_size_mb": args.shard_size_mb,
            "splits": parse_splits(args.split),
            "workers": args.workers,
            "ray": args.ray,
            "crop_body": args.crop_body,
            "max_reject_fraction": args.max_reject_fraction,
            "min_size": tuple(args.min_size),
            "exclude": tuple(args.exclude),
            "salt": args.salt,
            "series_gaps": args.series_gaps,
            "take_volume": args.take_volume,
            "format": args.format,
            "overwrite": args.overwrite,
            "progress": not args.no_progress,
        }
        opts = ShardOptions(**options)
    except ValueError as e:
        parser.error(str(e))  # exits 2
    with Pool(opts.workers, opts.ray) as pool:
        try:
            job = _start(args.input, args.output, opts, pool)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            parser.error(str(e))  # exits 2
        except PoolError as e:  # Ray unreachable, or a worker died reading DICOM headers
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            summary = _run(job, pool)
        except PoolError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if summary.up_to_date:
        print(f"{args.output} is up to date: same inputs and options as its summary.json; nothing written")
    print(
        f"sharded {summary.accepted} of {summary.inputs} volumes into {summary.shards} shards "
        f"({summary.total_bytes / 2**20:.1f} MiB) in {summary.seconds:.1f} s: splits {summary.per_split}, "
        f"modalities {summary.per_modality}, {summary.rejected} rejected → {args.output}"
    )
    if summary.too_many_rejects:
        print(
            f"error: rejected {summary.rejected} of {summary.inputs} inputs ({summary.reject_fraction:.0%}), more than "
            f"--max-reject-fraction {summary.max_reject_fraction}; the reasons are in {args.output / REJECTS_NAME}",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    # Run the imported module's main so worker processes unpickle data_prep.shard.*, not __main__.*.
    from data_prep.shard import main as _main

    sys.exit(_main())
