"""The shard contract and the streaming loader that feeds training processes.

Shards (written by ``python -m data_prep.shard``) are uncompressed tar files of samples
``<key>.image.npy.zst`` (the ``.npy`` bytes of one (X, Y, Z) volume, zstd-compressed) and
``<key>.meta.json``; ``manifest.jsonl`` beside them records where each member's bytes start, so one
volume is read with a single seek instead of scanning the tar.

The loader is deterministic and independent of worker timing: each epoch draws one permutation of the
manifest from ``(seed, epoch)`` on every rank, consumer ``c`` of ``world_size × num_workers`` takes every
``consumers``-th volume of it, and every view is rendered with a seed derived from
``(seed, epoch, position in the permutation, pair)``.

Example::

    records = read_manifest("shards/", split="train")
    volume, meta = read_volume(records[0])  # (X, Y, Z) int16 HU or float16 in [0, 1]
    loader = build_loader(cfg, PCRLv2Views(cfg.views), rank=0, world_size=1)
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import importlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from pcrl.config import PretrainConfig

__all__ = [
    "CT_HU_RANGE",
    "IMAGE_SUFFIX",
    "MANIFEST_KEYS",
    "MANIFEST_NAME",
    "META_SUFFIX",
    "BadDataError",
    "SampleRecord",
    "ViewLoader",
    "VolumeStream",
    "build_loader",
    "collate_views",
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

# --- the shard contract (data_prep writes it, this module reads it) -------------------------------------

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


class BadDataError(ValueError):
    """Unreadable volumes beyond what ``data.bad_volumes`` / ``data.max_bad_fraction`` allow; the message
    names the shard and the key."""

    @staticmethod
    def message(error: BaseException) -> str:
        """The message alone, without the worker traceback a DataLoader wraps around a worker's error."""
        return str(error).rsplit("BadDataError: ", 1)[-1].strip()


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


def middle_planes(volume: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial, coronal and sagittal middle planes of an (X, Y, Z) RAS+ array, in radiological orientation.

    Here, beside the array contract, because both the training pictures (:mod:`pcrl.figures`) and the
    QA sheet of ``data_prep`` (which imports the shard contract, not the training side of pcrl) draw
    volumes with it.

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


# --- the stream -------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, int, "float | None"], dict[str, Any]]


def _sample_seed(seed: int, epoch: int, index: int, pair: int) -> int:
    """A 63-bit seed, a pure function of (seed, epoch, position in the epoch's permutation, pair)."""
    state = np.random.SeedSequence([seed, epoch, index, pair]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class VolumeStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of rendered views, split over ranks and loader workers.

    Epoch ``e`` permutes the records with ``np.random.default_rng([seed, e])`` (the same on every rank).
    There are ``world_size × num_workers`` consumers (one when the loader has no workers); consumer
    ``c = rank·num_workers + worker_id`` takes ``perm[c::consumers]``, cut to ``len(records) // consumers``
    so that every consumer yields the same number of samples per epoch (the remainder is skipped for that
    epoch, and differs from epoch to epoch). Each volume yields ``pairs_per_volume`` samples:
    ``transform(volume, sample_seed, tissue_threshold) | {"key": record.key}``.

    Args:
        records: the volumes (e.g. from :func:`read_manifest`).
        transform: ``(volume (X, Y, Z) float32 in [0, 1], seed, tissue_threshold) -> dict`` (picklable when
            the loader has workers).
        rank: this process's rank.
        world_size: number of ranks.
        seed: the run seed.
        ct_window: (low, high) HU → [0, 1].
        pairs_per_volume: samples rendered from one decoded volume.
        tissue_threshold_hu: tissue threshold in HU, passed to the transform in [0, 1] units for CT and as
            ``None`` for MR; ``None`` turns it off.
        start: ``(epoch, cursor)`` to start from: the epoch and the number of volumes each consumer has
            already finished in it (see :meth:`state_dict`).
        start_batches: resume a DataLoader over this stream (batches of ``batch_size``, any number of
            workers) after it has handed out this many batches: every worker starts exactly where the
            uninterrupted loader's worker would be (see :meth:`worker_positions`). Excludes ``start``.
        batch_size: the DataLoader's batch size (what ``start_batches`` counts in).
        verify: check each volume's checksum while reading.
        bad_volumes: what an unreadable volume (missing or truncated shard, corrupt bytes, non-finite voxels)
            does: ``fail`` raises :class:`BadDataError`; ``skip`` reports it with its shard and key, counts
            it, and reads the next volume of the consumer's share in its place.
        max_bad_fraction: with ``skip``, raise :class:`BadDataError` once the unreadable volumes one consumer
            has met pass this fraction of its share of an epoch.
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        transform: Transform,
        *,
        rank: int,
        world_size: int,
        seed: int,
        ct_window: Sequence[float],
        pairs_per_volume: int = 1,
        tissue_threshold_hu: float | None = -150.0,
        start: tuple[int, int] = (0, 0),
        start_batches: int = 0,
        batch_size: int = 1,
        verify: bool = False,
        bad_volumes: str = "fail",
        max_bad_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if bad_volumes not in ("skip", "fail"):
            raise ValueError(f"bad_volumes must be skip or fail, got {bad_volumes!r}")
        self.bad_volumes = bad_volumes
        self.max_bad_fraction = float(max_bad_fraction)
        self._bad: set[str] = set()
        """Keys of the unreadable volumes this consumer has met (each reported and counted once)."""
        if not records:
            raise ValueError("VolumeStream needs at least one volume")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if pairs_per_volume < 1:
            raise ValueError(f"pairs_per_volume must be >= 1, got {pairs_per_volume}")
        if len(ct_window) != 2 or not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {list(ct_window)}")
        if start[0] < 0 or start[1] < 0:
            raise ValueError(f"start must be (epoch, cursor) with both >= 0, got {start}")
        if start_batches < 0 or batch_size < 1:
            raise ValueError(
                f"start_batches must be >= 0 and batch_size >= 1, got {start_batches} and {batch_size}"
            )
        if start_batches and tuple(start) != (0, 0):
            raise ValueError("give either start or start_batches, not both")
        self.records = list(records)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.ct_window = (float(ct_window[0]), float(ct_window[1]))
        self.pairs_per_volume = pairs_per_volume
        self.tissue_threshold_hu = tissue_threshold_hu
        self.verify = verify
        self.start_batches = int(start_batches)
        self.batch_size = int(batch_size)
        self._start = (int(start[0]), int(start[1]))
        # Position of the consumer iterating in *this* process (epoch, volumes finished in it). With loader
        # workers each worker holds its own copy; exact multi-worker resume is derived from steps later.
        self._position = self._start

    # -- partitioning ----------------------------------------------------------------------------------

    def consumers(self, num_workers: int) -> int:
        """Number of consumers of one epoch for a loader with ``num_workers`` workers per rank."""
        return self.world_size * max(1, num_workers)

    def check_consumers(self, num_workers: int) -> None:
        """Raise ValueError when there are fewer volumes than consumers (some would get nothing)."""
        consumers = self.consumers(num_workers)
        if len(self.records) < consumers:
            raise ValueError(
                f"{len(self.records)} volumes but world_size×num_workers = {self.world_size}×{max(1, num_workers)} = "
                f"{consumers} consumers; lower data.num_workers or add volumes"
            )

    def epoch_indices(self, epoch: int, consumer: int, consumers: int) -> list[tuple[int, int]]:
        """``(position in the permutation, record index)`` pairs that ``consumer`` reads in ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        per_consumer = len(self.records) // consumers
        positions = range(consumer, consumer + consumers * per_consumer, consumers)
        return [(p, int(perm[p])) for p in positions]

    def worker_positions(self, batches: int, num_workers: int) -> list[dict[str, int]]:
        """Where each loader worker of this rank stands once a DataLoader has handed out ``batches`` batches.

        A DataLoader takes its batches round-robin from workers 0..W-1, each ``batch_size`` consecutive
        samples of one worker's stream, so worker ``w`` has made ``ceil((batches - w) / W)`` of them (one
        worker, the loading process itself, when ``num_workers`` is 0). Entry ``w`` is
        ``{"worker", "samples", "epoch", "cursor", "pair"}``: worker ``w`` has yielded ``samples`` samples
        and next renders pair ``pair`` of volume ``cursor`` of its share of epoch ``epoch``.
        """
        workers = max(1, num_workers)
        per_epoch = len(self.records) // self.consumers(num_workers) * self.pairs_per_volume
        positions = []
        for w in range(workers):
            samples = max(0, -(-(batches - w) // workers)) * self.batch_size
            epoch, rest = divmod(samples, per_epoch)
            cursor, pair = divmod(rest, self.pairs_per_volume)
            positions.append(
                {"worker": w, "samples": samples, "epoch": epoch, "cursor": cursor, "pair": pair}
            )
        return positions

    def _consumer(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        self.check_consumers(num_workers)
        # A resumed loader asks worker 0 first, where the uninterrupted one would ask worker
        # start_batches mod W next: worker i carries on the stream of worker (i + start_batches) mod W.
        slot = (worker_id + self.start_batches) % num_workers
        return slot, self.rank * num_workers + slot, self.consumers(num_workers)

    # -- iteration -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, consumer, consumers = self._consumer()
        epoch, cursor = self._start
        first_pair = 0
        if self.start_batches:
            num_workers = consumers // self.world_size
            at = self.worker_positions(self.start_batches, num_workers)[slot]
            epoch, cursor, first_pair = at["epoch"], at["cursor"], at["pair"]
        while True:
            indices = self.epoch_indices(epoch, consumer, consumers)
            for done, (position, _) in enumerate(indices[cursor:], start=cursor + 1):
                record, volume = self._read_readable(indices, done - 1)
                threshold = threshold_to_unit(self.tissue_threshold_hu, record.modality, self.ct_window)
                for pair in range(first_pair, self.pairs_per_volume):
                    sample = self.transform(volume, _sample_seed(self.seed, epoch, position, pair), threshold)
                    sample["key"] = record.key
                    if pair == self.pairs_per_volume - 1:
                        # Advance before the last yield: a generator paused there has handed this volume out.
                        self._position = (epoch, done) if done < len(indices) else (epoch + 1, 0)
                    yield sample
                first_pair = 0
            epoch, cursor = epoch + 1, 0

    def _read_readable(
        self, indices: Sequence[tuple[int, int]], at: int
    ) -> tuple[SampleRecord, torch.Tensor]:
        """The volume at ``indices[at]`` in [0, 1], or, when it is unreadable, the next readable one of this
        consumer's share (cyclically): every position still yields its samples, so positions and resumes stay
        exact. An unreadable volume is reported once with its shard and key, and counted.

        Raises:
            BadDataError: ``bad_volumes="fail"``, or this consumer's unreadable volumes pass
                ``max_bad_fraction`` of its share.
        """
        for k in range(len(indices)):
            record = self.records[indices[(at + k) % len(indices)][1]]
            if record.key in self._bad:
                continue
            try:
                array, _ = read_volume(record, verify=self.verify)
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise ValueError(
                        f"{record.shard}: volume {record.key} holds {int(np.size(array) - np.isfinite(array).sum())} "
                        "non-finite voxels (NaN/inf)"
                    )
            except (OSError, ValueError) as e:
                self._skip(record, e, share=len(indices))
                continue
            volume = to_unit_range(array, record.modality, self.ct_window)
            return record, volume
        raise BadDataError(
            f"no readable volume left in this loader's share of {len(indices)}; see the warnings above"
        )

    def _skip(self, record: SampleRecord, error: Exception, share: int) -> None:
        reason = str(error)
        if record.key not in reason:
            reason = f"volume {record.key}: {reason}"
        if str(record.shard) not in reason:
            reason = f"{record.shard}: {reason}"
        if self.bad_volumes == "fail":
            raise BadDataError(f"{reason} (data.bad_volumes=fail; set it to skip to train on without it)")
        self._bad.add(record.key)
        limit = self.max_bad_fraction * share
        logger.warning(
            "skipping unreadable volume %s of shard %s: %s (%d unreadable of this loader's %d volumes, limit %.3g)",
            record.key,
            record.shard,
            reason,
            len(self._bad),
            share,
            limit,
        )
        if len(self._bad) > limit:
            raise BadDataError(
                f"{len(self._bad)} of the {share} volumes of one loader are unreadable, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows (last: {reason}); check or re-shard "
                "the data (python -m data_prep.shard), or raise data.max_bad_fraction"
            )

    def loader_state(self, batches: int, num_workers: int) -> dict[str, Any]:
        """The data position a checkpoint records for a loader with ``num_workers`` workers that has handed
        out ``batches`` batches: every worker's position, plus everything those positions depend on."""
        return {
            "batches": batches,
            "batch_size": self.batch_size,
            "num_workers": num_workers,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_records": len(self.records),
            "pairs_per_volume": self.pairs_per_volume,
            "workers": self.worker_positions(batches, num_workers),
        }

    def check_loader_state(self, saved: Mapping[str, Any], num_workers: int) -> None:
        """Raise ValueError, naming the setting, unless ``saved`` (from :meth:`loader_state`) is exactly where
        this stream resumes a loader with ``num_workers`` workers."""
        mine = self.loader_state(self.start_batches, num_workers)
        settings = {
            "seed": "run.seed",
            "world_size": "the number of processes",
            "num_workers": "data.num_workers",
            "batch_size": "train.micro_batch_size",
            "pairs_per_volume": "views.pairs_per_volume",
            "num_records": "the number of volumes in data.shards (data.split)",
        }
        for key, setting in settings.items():
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"{setting} was {saved.get(key)} when the checkpoint was written and is {mine[key]} now, so "
                    "the data position cannot be carried over exactly; relaunch with the checkpoint's value "
                    "or start a new run (another run.name)"
                )
        if saved != mine:
            raise ValueError(
                f"the checkpoint's data position {dict(saved)} is not where the loader resumes: {mine}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The position of the consumer iterating in this process, plus what it depends on.

        Exact for a loader without workers. ``start=(state["epoch"], state["cursor"])`` resumes there.
        """
        return {
            "epoch": self._position[0],
            "cursor": self._position[1],
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_records": len(self.records),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Start the next iteration at ``(state["epoch"], state["cursor"])``; refuses another shard set/seed."""
        for key, mine in (
            ("seed", self.seed),
            ("num_records", len(self.records)),
            ("world_size", self.world_size),
        ):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume the data stream: {key} was {state[key]}, now {mine}")
        self._start = self._position = (int(state["epoch"]), int(state["cursor"]))


def collate_views(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack per-sample view dicts into a batch.

    Tensors are stacked on a new first axis (``global_views`` (2, 1, X, Y, Z) → (B, 2, 1, X, Y, Z));
    anything else (``key`` strings, debug boxes) becomes a list of length B.
    """
    if not samples:
        raise ValueError("collate_views got an empty batch")
    names = list(samples[0])
    for i, s in enumerate(samples[1:], 1):
        if list(s) != names:
            raise ValueError(f"sample {i} has keys {sorted(s)} but sample 0 has {sorted(names)}")
    batch: dict[str, Any] = {}
    for name in names:
        values = [s[name] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {name!r}: shapes differ across the batch: {sorted(shapes)}")
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    if "key" in batch:
        batch["keys"] = batch.pop("key")
    return batch


def _loader_seed(seed: int, rank: int) -> int:
    """Seed of the DataLoader's own generator (its workers' base seed), a pure function of (seed, rank)."""
    return int(
        np.random.SeedSequence([seed, rank, 0x10AD]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    )


def _worker_init(worker_id: int) -> None:
    # A preemption signal (SIGTERM/SIGUSR1) may reach the whole process group; it is the training process's
    # to handle at a step boundary, and a worker dying of it would fail the batch in flight.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    # At exit multiprocessing terminates daemonic children with SIGTERM and waits for them; loader workers
    # ignore SIGTERM (above), so a process leaving with its persistent workers alive (an error, a preemption)
    # would wait forever. Registered after multiprocessing's own handler, so it runs first (atexit is LIFO).
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)


def build_loader(
    cfg: PretrainConfig,
    transform: Transform,
    rank: int,
    world_size: int,
    start_batches: int = 0,
    device: torch.device | str | None = None,
) -> torch.utils.data.DataLoader | ViewLoader:
    """The training loader of one rank: manifest → :class:`VolumeStream` → batches of views.

    Batches come from one worker each, round-robin, so the batch sequence is deterministic, and a loader
    built with ``start_batches=N`` continues exactly where one that has handed out N batches stands. The
    workers' own RNGs are seeded from ``(run.seed, rank)``; the views never draw from them (each sample has
    its own seed), and the training process's global RNG is left untouched.

    With a :class:`pcrl.views.PCRLv2Views` (torch or DALI spatial backend) as ``transform``, whole batches are
    rendered at once: in the workers on a CPU ``device`` (default), or in this process on a GPU or by DALI,
    through a :class:`ViewLoader`. Other transforms render per sample in the workers.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_manifest`; ValueError also when there are fewer
            volumes than ``world_size × data.num_workers``.
    """
    records = read_manifest(cfg.data.shards, cfg.data.split)
    stream = VolumeStream(
        records,
        transform,
        rank=rank,
        world_size=world_size,
        seed=cfg.run.seed,
        ct_window=cfg.data.ct_window,
        pairs_per_volume=cfg.views.pairs_per_volume,
        tissue_threshold_hu=cfg.views.filter_threshold_hu,
        start_batches=start_batches,
        batch_size=cfg.train.micro_batch_size,
        bad_volumes=cfg.data.bad_volumes,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    workers = cfg.data.num_workers
    # Fail here, in the training process, rather than inside a worker.
    stream.check_consumers(workers)
    extra: dict[str, Any] = (
        {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": True} if workers else {}
    )
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = collate_views
    render_here = False
    from pcrl.views import PCRLv2Views, TorchSpatial, collate_draws

    if isinstance(transform, PCRLv2Views):
        # Workers decode, draw each sample's geometry and cut its regions; whole batches are rendered at once:
        # by the torch renderer in the worker on a CPU, or here (a GPU, or DALI) from pinned regions.
        device = torch.device(device if device is not None else "cpu")
        stream.transform = transform.draw
        render_here = device.type != "cpu" or not isinstance(transform.spatial, TorchSpatial)
        # A GPU gets the packed float16 regions of pack_regions; DALI on a CPU gets the list of crops.
        collate = (
            functools.partial(collate_draws, pack=device.type != "cpu") if render_here else transform.collate
        )
        if not render_here:
            # compiles the CPU renderer's kernels once here, before the workers fork, not in every worker
            importlib.import_module("pcrl.views.cpu_kernels")
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.train.micro_batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if workers else None,
        generator=torch.Generator().manual_seed(_loader_seed(cfg.run.seed, rank)),
        **extra,
    )
    return ViewLoader(loader, transform, device) if render_here else loader  # type: ignore[arg-type]


class ViewLoader:
    """Batches of draws from a DataLoader, rendered in this process by ``views`` on ``device``.

    Iterating yields rendered batches (the dict of :meth:`pcrl.views.PCRLv2Views.render`); ``dataset`` is the
    DataLoader's :class:`VolumeStream`, so positions and resume work as for a plain loader. The copy of the
    next batch to the GPU is non-blocking from pinned memory and nothing here waits for the device.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, views: Any, device: torch.device) -> None:
        self.loader = loader
        self.views = views
        self.device = device

    @property
    def dataset(self) -> VolumeStream:
        """The stream the batches come from."""
        return self.loader.dataset  # type: ignore[return-value]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.views.render(batch, self.device)
