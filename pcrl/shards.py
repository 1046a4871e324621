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
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: data_prep's parent process never needs it
    import torch

__all__ = [
    "CT_HU_RANGE",
    "IMAGE_SUFFIX",
    "MANIFEST_KEYS",
    "MANIFEST_NAME",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_VOLUME_BYTES",
    "MAX_ZARR_CHUNKS",
    "META_SUFFIX",
    "PROVENANCE_KEYS",
    "SPLITS",
    "SUMMARY_NAME",
    "UNKNOWN",
    "ZSTD_LEVEL",
    "SampleRecord",
    "compress_volume",
    "decode_volume",
    "encode_volume",
    "load_json",
    "middle_planes",
    "npy_parts",
    "npy_sha256",
    "provenance_text",
    "provenance_totals",
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
# data_prep's job summary beside the manifest (counts, provenance totals, the job fingerprint).
SUMMARY_NAME = "summary.json"
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
PROVENANCE_KEYS = ("data_source", "license")
"""Where a volume came from and under which licence (``--source`` / ``--license`` or ``SOURCE.json`` of
``data_prep.shard``). data_prep writes both on every line; a line without them (a manifest written before
they existed) reads as :data:`UNKNOWN`."""
UNKNOWN = "unknown"
"""The provenance of a volume nobody declared: recorded as such, never dropped."""
MAX_PROVENANCE_CHARS = 200
SPLITS = ("train", "val", "test")
MODALITIES = ("ct", "mr")
FORMATS = ("webdataset", "zarr")

# --- limits of the reader: shards may come from elsewhere, so nothing a file declares is trusted ----------

MAX_VOLUME_BYTES = 4 << 30
"""Largest uncompressed volume a manifest may declare (shape × dtype size): 4 GiB, 8× a 512² × 1000 CT."""
MAX_JSON_BYTES = 1 << 20
"""Largest manifest line, ``meta.json`` member or Zarr ``zarr.json`` read (1 MiB; real ones are < 10 KB)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of ``[`` / ``{`` accepted in those JSON texts (real ones nest 3 deep)."""
MAX_ZARR_CHUNKS = 1 << 16
"""Most chunks one Zarr volume may be cut into (data_prep writes 64³ chunks: a few hundred)."""
_NPY_HEADER_MAX = 1 << 16
"""Room for the ``.npy`` header in front of a volume's bytes (numpy writes 128 bytes; it reads up to 10 000)."""
_KEY = re.compile(r"[0-9A-Za-z_.-]{1,128}")


def _show(value: Any) -> str:
    """A short repr for messages (a hostile value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number JSON allows")


def load_json(text: str | bytes, what: str) -> Any:
    """Parse one untrusted JSON text (a manifest line, ``meta.json``, ``zarr.json``) within the reader's limits.

    Refuses texts over :data:`MAX_JSON_BYTES`, nesting deeper than :data:`MAX_JSON_DEPTH` (checked before
    parsing, so no RecursionError), numbers that overflow a float (``1e400``) and ``NaN``/``Infinity``.

    Raises:
        ValueError: naming ``what`` and the problem.
    """
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{what} is {len(text)} bytes, more than the {MAX_JSON_BYTES} a reader accepts")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: {e}") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # only then can it nest too deep
        # Nesting depth outside strings: strip string literals, then a running count of brackets.
        bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
        steps = np.frombuffer(bare.encode("ascii", "replace"), dtype=np.uint8)
        opens = np.isin(steps, (ord("["), ord("{"))).astype(np.int64)
        depth = np.cumsum(opens - np.isin(steps, (ord("]"), ord("}"))))
        deepest = int(depth.max()) if depth.size else 0
        if deepest > MAX_JSON_DEPTH:
            raise ValueError(
                f"{what} nests {deepest} levels deep, more than the {MAX_JSON_DEPTH} a reader accepts"
            )
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _volume_bytes(shape: Sequence[int], dtype: str) -> int:
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def _zstd_bound(size: int) -> int:
    """ZSTD_compressBound: the largest compressed size of ``size`` bytes (plus room for a checksum)."""
    margin = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + margin + 64


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The ``.npy`` (format 1.0) serialisation of ``array`` as its header and a view of its C-ordered voxel
    bytes, without copying the voxels (a copy is made only when ``array`` is not C-contiguous)."""
    array = np.ascontiguousarray(array)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(array))
    return head.getvalue(), memoryview(array.reshape(-1).view(np.uint8))


def npy_sha256(array: np.ndarray) -> str:
    """Hex sha256 of the ``.npy`` bytes of ``array`` (dtype, shape and values): the sample key's source and
    the checksum of a Zarr volume."""
    head, data = npy_parts(array)
    h = hashlib.sha256(head)
    h.update(data)
    return h.hexdigest()


def compress_volume(array: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """The zstd frame of the ``.npy`` bytes of ``array`` at ``level`` (any level decodes the same way), with
    its content size declared (a reader refuses a frame that would inflate past the volume's size before
    inflating it) and a frame checksum (xxhash64, nearly free: a flipped bit in a shard fails the decode)."""
    import zstandard

    head, data = npy_parts(array)
    c = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(size=len(head) + data.nbytes)
    return c.compress(head) + c.compress(data) + c.flush()


def encode_volume(array: np.ndarray, level: int = ZSTD_LEVEL) -> tuple[bytes, str]:
    """Serialise a volume as zstd-compressed ``.npy`` bytes (:func:`compress_volume`).

    Returns:
        The compressed bytes and the sample key: the first 16 hex digits of the sha256 of the
        *uncompressed* ``.npy`` bytes (dtype, shape and values; :func:`npy_sha256`), so the key does not
        depend on the zstd version or level.
    """
    return compress_volume(array, level), npy_sha256(array)[:16]


def decode_volume(data: bytes, shape: Sequence[int] | None = None, dtype: str | None = None) -> np.ndarray:
    """Inverse of :func:`encode_volume`: zstd-decompress and parse the ``.npy`` bytes (no pickles).

    Args:
        data: one zstd frame.
        shape, dtype: what the volume must be (from the manifest). When given, the frame's declared content
            size must be exactly that volume's ``.npy`` size before anything is inflated, and a frame that
            declares no size is inflated at most one byte past it, so a decompression bomb costs no memory.

    Raises:
        ValueError: the frame's size, the ``.npy`` header or the array differs from ``shape``/``dtype``;
            zstandard.ZstdError: corrupt bytes (the frame checksum).
    """
    import zstandard

    if shape is None or dtype is None:
        raw = zstandard.ZstdDecompressor().decompress(data)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    nbytes = _volume_bytes(shape, dtype)
    limit = nbytes + _NPY_HEADER_MAX
    declared = zstandard.get_frame_parameters(data).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and not nbytes < declared <= limit:
        raise ValueError(
            f"the compressed image declares {declared} bytes uncompressed but a {dtype}{list(shape)} volume is "
            f"{nbytes} bytes plus a .npy header; refusing to inflate it"
        )
    # Inflate into a buffer of the size the manifest allows, one byte more to see a bomb, never beyond.
    buf = bytearray(limit + 1)
    view = memoryview(buf)
    filled = 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
        while filled < len(buf):
            n = reader.readinto(view[filled:])
            if not n:
                break
            filled += n
    if filled > limit:
        raise ValueError(
            f"the compressed image inflates to more than {limit} bytes, the most a {dtype}{list(shape)} volume "
            "takes with its .npy header; refused at that limit"
        )
    head = io.BytesIO(view[: min(filled, _NPY_HEADER_MAX)])
    try:
        version = np.lib.format.read_magic(head)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} (encode_volume writes 1.0)")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        got_shape, fortran, got_dtype = read_header(head)
    except (ValueError, SyntaxError, TypeError, struct.error) as e:
        raise ValueError(f"the image is not a valid .npy array: {e}") from None
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or filled - head.tell() != nbytes:
        raise ValueError(
            f"the image is {got_dtype}{list(got_shape)} ({filled - head.tell()} data bytes) but the manifest says "
            f"{dtype}{list(shape)} ({nbytes} bytes)"
        )
    flat = np.frombuffer(buf, dtype=got_dtype, count=math.prod(shape), offset=head.tell())
    return flat.reshape(tuple(shape), order="F" if fortran else "C")


# --- manifest ---------------------------------------------------------------------------------------


def provenance_text(value: Any, what: str) -> str:
    """Check one provenance value (a data source name or a licence id such as ``CC-BY-4.0``).

    Args:
        value: the value as given (a flag, a ``SOURCE.json`` key, a manifest field).
        what: how to name it in the error (``--license``, ``SOURCE.json key "source"``, ...).

    Returns:
        ``value`` itself: a non-empty printable string of at most :data:`MAX_PROVENANCE_CHARS` characters,
        without leading or trailing spaces.

    Raises:
        ValueError: naming ``what`` and what is wrong.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_PROVENANCE_CHARS or not value.isprintable() or value != value.strip():
        raise ValueError(
            f"{what} must be printable text of at most {MAX_PROVENANCE_CHARS} characters without leading or "
            f"trailing spaces (a name such as 'LIDC-IDRI', a licence id such as 'CC-BY-4.0'), got {_show(value)}"
        )
    return value


def provenance_totals(volumes: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """Count volumes by data source, licence and modality: the totals of ``summary.json`` and of a run's
    ``data_provenance.json``.

    Args:
        volumes: one ``(data_source, license, modality)`` per volume.

    Returns:
        ``per_source`` (source → volumes), ``per_license`` (licence → volumes) and ``sources``: one entry per
        (source, licence) pair, sorted, with its ``volumes`` and ``per_modality`` counts. Volumes of
        :data:`UNKNOWN` provenance are counted under that name like any other.
    """
    per_source: dict[str, int] = {}
    per_license: dict[str, int] = {}
    pairs: dict[tuple[str, str], dict[str, int]] = {}
    for source, licence, modality in volumes:
        per_source[source] = per_source.get(source, 0) + 1
        per_license[licence] = per_license.get(licence, 0) + 1
        counts = pairs.setdefault((source, licence), {})
        counts[modality] = counts.get(modality, 0) + 1
    return {
        "per_source": dict(sorted(per_source.items())),
        "per_license": dict(sorted(per_license.items())),
        "sources": [
            {
                "data_source": source,
                "license": licence,
                "volumes": sum(counts.values()),
                "per_modality": dict(sorted(counts.items())),
            }
            for (source, licence), counts in sorted(pairs.items())
        ],
    }


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
    data_source: str = UNKNOWN
    """The data set the volume came from (``--source`` or ``SOURCE.json``), :data:`UNKNOWN` when undeclared."""
    license: str = UNKNOWN
    """The licence id of that data set (``--license`` or ``SOURCE.json``), :data:`UNKNOWN` when undeclared."""
    root: Path | None = field(default=None, compare=False, repr=False)
    """The shard folder (the manifest's): every file read for this record must resolve inside it."""

    @classmethod
    def from_line(cls, line: Mapping[str, Any], root: Path) -> SampleRecord:
        """Build a record from a parsed manifest line; ``root`` is the manifest's folder.

        Every value is checked for its type and range, the volume for :data:`MAX_VOLUME_BYTES`, and the shard
        path, symlinks resolved, for staying inside ``root``.

        Raises:
            ValueError: naming the key and what is wrong with it.
        """
        missing = [k for k in MANIFEST_KEYS if k not in line]
        if missing:
            raise ValueError(f"missing keys {missing}")

        def integer(name: str, minimum: int = 0) -> int:
            value = line[name]
            if type(value) is not int or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {_show(value)}")
            return value

        def text(name: str, choices: Sequence[str] | None = None) -> str:
            value = line.get(name, "webdataset") if name == "format" else line[name]
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {_show(value)}")
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {name} {_show(value)}; expected one of {', '.join(choices)}")
            return value

        shape, spacing = line["shape"], line["spacing"]
        if not isinstance(shape, list) or len(shape) != 3 or any(type(v) is not int or v < 1 for v in shape):
            raise ValueError(f"shape must be 3 positive integers, got {_show(shape)}")
        if (
            not isinstance(spacing, list)
            or len(spacing) != 3
            or any(type(v) not in (int, float) or not 0 < v < math.inf for v in spacing)
        ):
            raise ValueError(f"spacing must be 3 positive finite numbers, got {_show(spacing)}")
        key = text("key")
        if not _KEY.fullmatch(key):
            raise ValueError(f"key {_show(key)} is not a sample key (letters, digits, '_', '.', '-')")
        dtype = text("dtype")
        try:
            kind = np.dtype(dtype)
        except TypeError:
            kind = None
        if kind is None or kind.kind not in "iuf" or kind.name != dtype:
            raise ValueError(f"dtype {_show(dtype)} is not a numeric dtype name (int16, float16, ...)")
        nbytes = _volume_bytes(shape, dtype)
        if nbytes > MAX_VOLUME_BYTES:
            raise ValueError(
                f"shape {shape} of {dtype} is {nbytes} bytes, more than the {MAX_VOLUME_BYTES} a volume may be"
            )
        fmt = text("format", FORMATS)
        size, meta_size = integer("size", 1 if fmt == "webdataset" else 0), integer("meta_size")
        bound = _zstd_bound(nbytes + _NPY_HEADER_MAX)
        if fmt == "webdataset" and size > bound:
            raise ValueError(
                f"size {size} is more than a compressed {dtype}{shape} volume can take ({bound} bytes)"
            )
        if meta_size > MAX_JSON_BYTES:
            raise ValueError(
                f"meta_size {meta_size} is more than the {MAX_JSON_BYTES} bytes a meta.json may be"
            )
        name = text("shard")
        shard = Path(os.path.abspath(root / name))
        if not _inside(shard, root):
            # A manifest names files of its own folder; one that points elsewhere (``../``, an absolute path, a
            # symlink out of the folder) is damaged or hostile.
            raise ValueError(
                f"shard {_show(name)} lies outside the manifest's folder {root} (symlinks resolved); "
                "refusing to read it"
            )
        return cls(
            key=key,
            shard=shard,
            offset=integer("offset"),
            size=size,
            meta_offset=integer("meta_offset"),
            meta_size=meta_size,
            shape=tuple(shape),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            modality=text("modality", MODALITIES),
            dtype=dtype,
            split=text("split", SPLITS),
            checksum=text("checksum"),
            source=text("source"),
            format=fmt,
            # Optional: manifests written before provenance was recorded read as unknown.
            data_source=provenance_text(line.get("data_source", UNKNOWN), "data_source"),
            license=provenance_text(line.get("license", UNKNOWN), "license"),
            root=Path(os.path.abspath(root)),
        )


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, every symlink resolved, lies inside ``root`` (also resolved)."""
    try:
        return path.resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


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
        with manifest.open("rb") as f:
            lineno = 0
            while raw := f.readline(MAX_JSON_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_JSON_BYTES and not raw.endswith(b"\n"):
                    raise ValueError(
                        f"{manifest}:{lineno}: malformed manifest line: longer than {MAX_JSON_BYTES} bytes"
                    )
                if not raw.strip():
                    continue
                try:
                    line = load_json(raw, "the line")
                    if not isinstance(line, dict):
                        raise ValueError(f"expected a JSON object, got {type(line).__name__}")
                    record = SampleRecord.from_line(line, root)
                except (ValueError, TypeError, OverflowError, RecursionError) as e:
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


def _check_inside(record: SampleRecord, path: Path) -> None:
    """Refuse ``path`` unless it resolves (symlinks included) inside the record's shard folder: checked again at
    read time, since a shard may have become a symlink since the manifest was read."""
    if record.root is not None and not _inside(path, record.root):
        raise ValueError(
            f"{path}: resolves to {path.resolve()}, outside the shard folder {record.root}; refusing to read "
            f"volume {record.key} through a symlink out of the folder"
        )


def _read_at(f: io.BufferedReader, offset: int, size: int, what: str, record: SampleRecord) -> bytes:
    # Checked against the file's real size before reading, so a manifest size far past the end allocates nothing.
    actual = os.fstat(f.fileno()).st_size
    if offset + size > actual:
        raise ValueError(
            f"{record.shard}: {what} of volume {record.key} is truncated (the manifest puts {size} bytes at offset "
            f"{offset}, the file has {actual}); the shard is incomplete or the manifest belongs to another shard set"
        )
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

    Nothing the files declare is trusted before it is checked against the manifest: member offsets and sizes
    against the file's size, the zstd frame's content size (or, without one, a bounded inflate) against the
    manifest's shape × dtype, Zarr metadata against the manifest before any chunk is read; every file must
    resolve inside the shard folder.

    Args:
        record: the manifest record.
        verify: also check the sha256 of the compressed bytes (a cost per read: docs/benchmarks.md).

    Returns:
        The (X, Y, Z) array in its stored dtype (int16 HU for CT, float16 in [0, 1] for MR) and the
        sample's metadata dict (``meta.json``).

    Raises:
        ValueError: truncated shard, checksum mismatch, an array or metadata that does not match the record,
            or a file outside the shard folder; the message names the shard and the key.
        OSError: a missing or unreadable shard file.
    """
    _check_inside(record, record.shard)
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
        array = decode_volume(data, record.shape, record.dtype)
    except Exception as e:  # zstd, numpy and MemoryError alike: all mean this sample cannot be used
        raise ValueError(
            f"{record.shard}: cannot decode volume {record.key} at offset {record.offset}: {e}"
        ) from e
    meta = load_json(meta_bytes, f"{record.shard}: meta.json of volume {record.key}")
    if not isinstance(meta, dict):
        raise ValueError(f"{record.shard}: meta.json of volume {record.key} is not a JSON object")
    return array, meta


def _zarr_layout(record: SampleRecord) -> tuple[tuple[int, int, int], int]:
    """Check the Zarr array's ``zarr.json`` against the manifest before zarr (or anything) reads a chunk.

    Returns:
        The chunk shape and the byte size of one chunk.
    """
    where = f"{record.shard}: Zarr array of volume {record.key}"
    path = record.shard / "zarr.json"
    _check_inside(record, path)
    with open(path, "rb") as f:
        text = f.read(MAX_JSON_BYTES + 1)
    meta = load_json(text, f"{path} (volume {record.key})")
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        raise ValueError(f"{where}: zarr.json does not describe a Zarr v3 array")
    if meta.get("shape") != list(record.shape) or meta.get("data_type") != record.dtype:
        raise ValueError(
            f"{where}: zarr.json declares {_show(meta.get('data_type'))}{_show(meta.get('shape'))} but the "
            f"manifest says {record.dtype}{list(record.shape)}; refusing to read it"
        )
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if (
        not isinstance(grid, dict)
        or grid.get("name") != "regular"
        or not isinstance(chunks, list)
        or len(chunks) != 3
        or any(type(c) is not int or not 1 <= c <= n for c, n in zip(chunks, record.shape, strict=True))
    ):
        raise ValueError(f"{where}: chunk grid {_show(grid)} is not a regular grid within the volume")
    count = math.prod(-(-n // c) for n, c in zip(record.shape, chunks, strict=True))
    if count > MAX_ZARR_CHUNKS:
        raise ValueError(f"{where}: {count} chunks, more than the {MAX_ZARR_CHUNKS} a reader accepts")
    codecs = meta.get("codecs")
    names = [c.get("name") for c in codecs if isinstance(c, dict)] if isinstance(codecs, list) else None
    if names != ["bytes", "blosc"] or meta.get("storage_transformers"):
        # Blosc records each chunk's size in a header checked below; other codecs (gzip, zstd, sharding) would
        # inflate a chunk before its size is known.
        raise ValueError(
            f"{where}: codecs {_show(names)}; the reader takes data_prep's ['bytes', 'blosc'] only"
        )
    encoding = meta.get("chunk_key_encoding")
    if encoding != {"name": "default", "configuration": {"separator": "/"}}:
        raise ValueError(f"{where}: chunk key encoding {_show(encoding)} is not data_prep's default '/'")
    return tuple(chunks), math.prod(chunks) * np.dtype(record.dtype).itemsize  # type: ignore[return-value]


def _check_zarr_chunks(record: SampleRecord, box: tuple[slice, ...] | None = None) -> None:
    """Check the Blosc header of every chunk file the read will touch (all, or those under ``box``): its
    declared uncompressed size must be one chunk's, and the file must resolve inside the shard folder."""
    chunks, chunk_bytes = _zarr_layout(record)
    if box is None:
        box = tuple(slice(0, n) for n in record.shape)
    ranges = [range(b.start // c, -(-b.stop // c)) for b, c in zip(box, chunks, strict=True)]
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                path = record.shard / "c" / str(i) / str(j) / str(k)
                if not os.path.lexists(path):
                    continue  # a chunk of fill values is not written
                _check_inside(record, path)
                with open(path, "rb") as f:
                    header = f.read(16)
                    size = os.fstat(f.fileno()).st_size
                declared, compressed = struct.unpack("<4xI4xI", header) if len(header) == 16 else (-1, -1)
                if declared != chunk_bytes or compressed != size:
                    raise ValueError(
                        f"{path}: chunk of volume {record.key} declares {declared} bytes uncompressed and "
                        f"{compressed} compressed (a chunk is {chunk_bytes} bytes, the file {size}); refusing to "
                        "inflate it"
                    )


def _open_zarr(record: SampleRecord, box: tuple[slice, ...] | None = None) -> Any:
    import zarr

    _check_zarr_chunks(record, box)
    try:
        return zarr.open_array(store=str(record.shard), mode="r", zarr_format=3)
    except Exception as e:  # FileNotFoundError, zarr's own errors for a missing or broken zarr.json
        raise ValueError(f"{record.shard}: cannot open the Zarr array of volume {record.key}: {e}") from e


def _zarr_read(record: SampleRecord, z: Any, box: tuple[slice, ...] | Any) -> np.ndarray:
    try:
        return np.asarray(z[box])
    except Exception as e:  # numcodecs' RuntimeError for corrupt Blosc bytes, zarr's own errors
        raise ValueError(f"{record.shard}: cannot read the Zarr chunks of volume {record.key}: {e}") from e


def _read_zarr(record: SampleRecord, verify: bool) -> tuple[np.ndarray, dict[str, Any]]:
    z = _open_zarr(record)
    array = _zarr_read(record, z, ...)
    if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
        raise ValueError(
            f"{record.shard}: volume {record.key} is {array.dtype}{list(array.shape)} but the manifest says "
            f"{record.dtype}{list(record.shape)}"
        )
    if verify:
        digest = "sha256:" + npy_sha256(array)
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
        ValueError: a box outside the volume; as :func:`read_volume` for a bad shard.
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
        _check_inside(record, record.shard)
        return _zarr_read(record, _open_zarr(record, box), box)
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
    x, y, z = (s // 2 for s in volume.shape)
    # Sliced before conversion: three planes are converted to float32, not the whole volume.
    planes = (volume[:, :, z], volume[:, y, :], volume[x, :, :])
    return tuple(_float_plane(p).T[::-1, ::-1] for p in planes)  # type: ignore[return-value]


def _float_plane(plane: Any) -> np.ndarray:
    if hasattr(plane, "detach"):  # a torch tensor (any dtype or device)
        plane = plane.detach().float().cpu().numpy()
    return np.asarray(plane, dtype=np.float32)


def to_unit_range(array: np.ndarray, modality: str, ct_window: Sequence[float]) -> torch.Tensor:
    """Map a stored volume to float32 in [0, 1].

    Args:
        array: (X, Y, Z) stored volume.
        modality: ``ct`` (HU, windowed linearly and clipped) or ``mr`` (already in [0, 1]).
        ct_window: (low, high) HU mapped to 0 and 1.

    Returns:
        (X, Y, Z) float32 tensor in [0, 1].
    """
    import torch

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
