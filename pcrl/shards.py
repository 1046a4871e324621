"""The shard contract: what ``data_prep`` writes and everything that reads it back.

Shards (written by ``python -m data_prep.shard``) are uncompressed tar files of samples
``<key>.image.npy.zst`` (the ``.npy`` bytes of one (X, Y, Z) volume, zstd-compressed) and
``<key>.meta.json``, or one Zarr v3 array per volume; ``manifest.jsonl`` beside them records where each
member's bytes start, so one volume is read with a single seek instead of scanning the tar.

This module holds the file names, the sample encoding, the manifest records and their reads (whole
volumes and regions), and the intensity conventions shared by training, evaluation and the QA sheet. It is
the only module of ``pcrl`` that ``data_prep`` imports; the streaming loader is :mod:`pcrl.data`.

Example::

    records = read_manifest("shards/", split="train")
    volume, meta = read_volume(records[0])  # (X, Y, Z) int16 HU or float16 in [0, 1]
    unit = to_unit_range(volume, records[0].modality, ct_window=(-1000, 1000))  # float32 in [0, 1]
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CT_HU_RANGE",
    "IMAGE_SUFFIX",
    "MANIFEST_KEYS",
    "MANIFEST_NAME",
    "META_SUFFIX",
    "SPLITS",
    "ZSTD_LEVEL",
    "SampleRecord",
    "decode_volume",
    "encode_volume",
    "middle_planes",
    "read_manifest",
    "read_region",
    "read_volume",
    "split_or_fallback",
    "threshold_to_unit",
    "to_unit_range",
]

logger = logging.getLogger(__name__)

# --- file names and the sample encoding -------------------------------------------------------------

MANIFEST_NAME = "manifest.jsonl"
IMAGE_SUFFIX = "image.npy.zst"
META_SUFFIX = "meta.json"
CT_HU_RANGE = (-1024, 3071)
"""CT is stored as int16 Hounsfield units clipped to this range."""
ZSTD_LEVEL = 3
MANIFEST_KEYS = (
    "key",
    "shard",
    "offset",
    "size",
    "meta_offset",
    "meta_size",
    "shape",
    "spacing",
    "modality",
    "dtype",
    "split",
    "checksum",
    "source",
)
"""Keys every manifest line has (extra keys are allowed and ignored by the loader)."""
SPLITS = ("train", "val", "test")


def encode_volume(array: np.ndarray) -> tuple[bytes, str]:
    """Serialise a volume as zstd-compressed ``.npy`` bytes.

    Returns:
        The compressed bytes and the sample key: the first 16 hex digits of the sha256 of the
        *uncompressed* ``.npy`` bytes (dtype, shape and values), so the key does not depend on the zstd
        version or level.
    """
    import zstandard

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    raw = buf.getvalue()
    key = hashlib.sha256(raw).hexdigest()[:16]
    # The frame checksum (xxhash64, nearly free) makes a flipped bit in a shard fail the decode.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(raw), key


def decode_volume(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_volume`: zstd-decompress and parse the ``.npy`` bytes (no pickles)."""
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(data)
    return np.load(io.BytesIO(raw), allow_pickle=False)


# --- manifest ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRecord:
    """One volume of a shard set, as listed in ``manifest.jsonl`` (shard path made absolute)."""

    key: str
    shard: Path
    """Absolute path of the tar file holding the sample."""
    offset: int
    """Byte offset of the image member's data inside the tar."""
    size: int
    """Compressed size of the image member in bytes."""
    meta_offset: int
    meta_size: int
    shape: tuple[int, int, int]
    """(X, Y, Z) voxels."""
    spacing: tuple[float, float, float]
    """(x, y, z) mm."""
    modality: str
    """``ct`` (int16 HU) or ``mr`` (float16 in [0, 1])."""
    dtype: str
    split: str
    checksum: str
    """``sha256:<hex>`` of the compressed image bytes (Zarr: of the uncompressed ``.npy`` bytes)."""
    source: str
    format: str = "webdataset"
    """``webdataset`` (``shard`` is a tar, read by offset) or ``zarr`` (``shard`` is one Zarr v3 array)."""

    @classmethod
    def from_line(cls, line: Mapping[str, Any], root: Path) -> SampleRecord:
        """Build a record from a parsed manifest line; ``root`` is the manifest's folder."""
        missing = [k for k in MANIFEST_KEYS if k not in line]
        if missing:
            raise ValueError(f"missing keys {missing}")
        shape = tuple(int(v) for v in line["shape"])
        spacing = tuple(float(v) for v in line["spacing"])
        if len(shape) != 3 or len(spacing) != 3:
            raise ValueError(f"shape and spacing must have 3 values, got {list(shape)} and {list(spacing)}")
        shard = Path(os.path.abspath(root / str(line["shard"])))
        if not shard.is_relative_to(os.path.abspath(root)):
            # A manifest names files of its own folder; one that points elsewhere is damaged or hostile.
            raise ValueError(
                f"shard {line['shard']!r} lies outside the manifest's folder; refusing to read it"
            )
        return cls(
            key=str(line["key"]),
            shard=shard,
            offset=int(line["offset"]),
            size=int(line["size"]),
            meta_offset=int(line["meta_offset"]),
            meta_size=int(line["meta_size"]),
            shape=shape,  # type: ignore[arg-type]
            spacing=spacing,  # type: ignore[arg-type]
            modality=str(line["modality"]),
            dtype=str(line["dtype"]),
            split=str(line["split"]),
            checksum=str(line["checksum"]),
            source=str(line["source"]),
            format=str(line.get("format", "webdataset")),
        )


def _expand_braces(pattern: str) -> list[str]:
    """``a/{b,c}/d`` → ``[a/b/d, a/c/d]``; nested groups expand innermost first."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    out: list[str] = []
    for alt in m.group(1).split(","):
        out.extend(_expand_braces(pattern[: m.start()] + alt + pattern[m.end() :]))
    return out


def _find_manifests(shards: str | os.PathLike[str]) -> list[Path]:
    text = os.path.expanduser(str(shards))
    if not text:
        raise ValueError(
            "data.shards is empty: set it to a shard folder, a manifest.jsonl or a glob of folders"
        )
    manifests: list[Path] = []
    for pattern in _expand_braces(text):
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no shard folder or manifest matches {pattern!r} (from {text!r})")
        else:
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                path = path / MANIFEST_NAME
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{match} has no {MANIFEST_NAME}: is it a shard folder written by data_prep.shard?"
                    )
            elif not path.is_file():
                raise FileNotFoundError(f"shard folder or manifest {match} does not exist")
            manifests.append(path)
    # The same folder reached through two patterns is read once.
    unique: dict[Path, Path] = {}
    for m in manifests:
        unique.setdefault(m.resolve(), m)
    return list(unique.values())


def read_manifest(shards: str | os.PathLike[str], split: str = "train") -> list[SampleRecord]:
    """Read the records of one split from one or more shard folders.

    Args:
        shards: a shard folder holding ``manifest.jsonl``, a manifest path, or a glob / brace pattern
            (``/data/{ct,mr}/shards``, ``/data/*/shards``) of such folders or files.
        split: ``train``, ``val``, ``test`` or ``all``.

    Returns:
        Records in manifest order (manifests in sorted pattern order); shard paths are absolute.

    Raises:
        FileNotFoundError: nothing matches, or a folder has no manifest.
        ValueError: a malformed manifest line, an unknown split, or no volume in the split.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all")
    records: list[SampleRecord] = []
    seen: dict[str, Path] = {}
    counts: dict[str, int] = {}
    manifests = _find_manifests(shards)
    for manifest in manifests:
        root = manifest.parent
        with manifest.open("r", encoding="utf-8") as f:
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                    if not isinstance(line, dict):
                        raise ValueError(f"expected a JSON object, got {type(line).__name__}")
                    record = SampleRecord.from_line(line, root)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{manifest}:{lineno}: malformed manifest line: {e}") from None
                counts[record.split] = counts.get(record.split, 0) + 1
                if split != "all" and record.split != split:
                    continue
                if record.key in seen:
                    # The same volume sharded twice would be seen twice per epoch.
                    logger.warning(
                        "volume %s is listed in both %s and %s; using the first",
                        record.key,
                        seen[record.key],
                        manifest,
                    )
                    continue
                seen[record.key] = manifest
                records.append(record)
    if not records:
        where = ", ".join(str(m) for m in manifests)
        raise ValueError(
            f"no volumes with split {split!r} in {where} (splits present: {counts or 'none'}); "
            "choose another data.split or re-shard with a --split that includes it"
        )
    return records


def split_or_fallback(
    shards: str | os.PathLike[str], split: str, fallback: str
) -> tuple[list[SampleRecord], bool]:
    """The records of ``split``, or of ``fallback`` when ``split`` holds none (a shard set without a held-out
    split): the fixed volumes that the validation metric and the reconstruction panel show.

    Returns:
        The records in manifest order, and whether they came from ``fallback``.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_manifest` (no manifest, no volume at all).
    """
    every = read_manifest(shards, "all")
    records = [r for r in every if split == "all" or r.split == split]
    if records:
        return records, False
    return [r for r in every if fallback == "all" or r.split == fallback], True


# --- reading one volume -----------------------------------------------------------------------------


def _read_at(f: io.BufferedReader, offset: int, size: int, what: str, record: SampleRecord) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(
            f"{record.shard}: {what} of volume {record.key} is truncated (read {len(data)} of {size} bytes at "
            f"offset {offset}); the shard is incomplete or the manifest belongs to another shard set"
        )
    return data


def read_volume(record: SampleRecord, verify: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one volume by seeking into its shard.

    Args:
        record: the manifest record.
        verify: also check the sha256 of the compressed bytes (measured: +10–35 % per read, ~1 GB/s).

    Returns:
        The (X, Y, Z) array in its stored dtype (int16 HU for CT, float16 in [0, 1] for MR) and the
        sample's metadata dict (``meta.json``).

    Raises:
        ValueError: truncated shard, checksum mismatch, or an array that does not match the record.
    """
    if record.format == "zarr":
        return _read_zarr(record, verify)
    with open(record.shard, "rb") as f:
        data = _read_at(f, record.offset, record.size, "image", record)
        meta_bytes = _read_at(f, record.meta_offset, record.meta_size, "metadata", record)
    if verify:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != record.checksum:
            raise ValueError(
                f"{record.shard}: checksum mismatch for volume {record.key} ({digest} != {record.checksum})"
            )
    try:
        array = decode_volume(data)
    except Exception as e:
        raise ValueError(
            f"{record.shard}: cannot decode volume {record.key} at offset {record.offset}: {e}"
        ) from e
    if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
        raise ValueError(
            f"{record.shard}: volume {record.key} is {array.dtype}{list(array.shape)} but the manifest says "
            f"{record.dtype}{list(record.shape)}"
        )
    return array, json.loads(meta_bytes)


def _open_zarr(record: SampleRecord) -> Any:
    import zarr

    try:
        return zarr.open_array(store=str(record.shard), mode="r", zarr_format=3)
    except Exception as e:  # FileNotFoundError, zarr's own errors for a missing or broken zarr.json
        raise ValueError(f"{record.shard}: cannot open the Zarr array of volume {record.key}: {e}") from e


def _read_zarr(record: SampleRecord, verify: bool) -> tuple[np.ndarray, dict[str, Any]]:
    z = _open_zarr(record)
    array = np.asarray(z[...])
    if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
        raise ValueError(
            f"{record.shard}: volume {record.key} is {array.dtype}{list(array.shape)} but the manifest says "
            f"{record.dtype}{list(record.shape)}"
        )
    if verify:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
        digest = "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
        if digest != record.checksum:
            raise ValueError(
                f"{record.shard}: checksum mismatch for volume {record.key} ({digest} != {record.checksum})"
            )
    return array, dict(z.attrs)


def read_region(record: SampleRecord, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Read the box ``[start, start + size)`` of one volume.

    A Zarr record reads only the chunks the box touches; a WebDataset record decodes the whole volume
    (its image is one compressed blob) and slices it.

    Args:
        record: the manifest record.
        start: (x, y, z) first voxel.
        size: (x, y, z) voxels, with ``start + size <= record.shape``.

    Returns:
        The (size_x, size_y, size_z) array in the stored dtype.

    Raises:
        ValueError: a box outside the volume.
    """
    if (
        len(start) != 3
        or len(size) != 3
        or any(s < 0 or n < 1 or s + n > m for s, n, m in zip(start, size, record.shape, strict=True))
    ):
        raise ValueError(
            f"region start={list(start)} size={list(size)} is not inside volume {record.key} of shape "
            f"{list(record.shape)}"
        )
    box = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size, strict=True))
    if record.format == "zarr":
        return np.asarray(_open_zarr(record)[box])
    array, _ = read_volume(record)
    return np.ascontiguousarray(array[box])


# --- intensities and pictures -----------------------------------------------------------------------


def middle_planes(volume: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial, coronal and sagittal middle planes of an (X, Y, Z) RAS+ array, in radiological orientation.

    Here, beside the array contract, because both the training pictures (:mod:`pcrl.figures`) and the
    QA sheet of ``data_prep`` (which imports this module, not the training side of pcrl) draw volumes
    with it.

    Every plane is transposed so its second in-plane axis runs down the rows, then flipped both ways: axial
    (x, y) has anterior up and the patient's right on the left; coronal (x, z) has superior up and the
    right on the left; sagittal (y, z) has superior up and anterior on the left.

    Returns:
        (Y, X), (Z, X) and (Z, Y) arrays; row 0 is the top of the picture.
    """
    v = np.asarray(volume, dtype=np.float32)
    x, y, z = (s // 2 for s in v.shape)
    return tuple(p.T[::-1, ::-1] for p in (v[:, :, z], v[:, y, :], v[x, :, :]))  # type: ignore[return-value]


def to_unit_range(array: np.ndarray, modality: str, ct_window: Sequence[float]) -> torch.Tensor:
    """Map a stored volume to float32 in [0, 1].

    Args:
        array: (X, Y, Z) stored volume.
        modality: ``ct`` (HU, windowed linearly and clipped) or ``mr`` (already in [0, 1]).
        ct_window: (low, high) HU mapped to 0 and 1.

    Returns:
        (X, Y, Z) float32 tensor in [0, 1].
    """
    t = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy: the ops below are in place
    if modality == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        if not hi > lo:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {list(ct_window)}")
        return t.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
    if modality == "mr":
        return t.clamp_(0.0, 1.0)
    raise ValueError(f"unknown modality {modality!r}; expected 'ct' or 'mr'")


def threshold_to_unit(threshold_hu: float | None, modality: str, ct_window: Sequence[float]) -> float | None:
    """The tissue threshold in HU as a value of the loader's [0, 1] CT window; ``None`` (no filter) for MR or
    when ``threshold_hu`` is ``None``."""
    if threshold_hu is None or modality != "ct":
        return None
    lo, hi = float(ct_window[0]), float(ct_window[1])
    return (float(threshold_hu) - lo) / (hi - lo)
