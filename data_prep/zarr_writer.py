"""The Zarr v3 output of ``python -m data_prep.shard --format zarr``.

``<output>/volumes.zarr`` is one Zarr v3 group holding one array per volume, named by the volume key: chunks
of at most 64³ voxels, Blosc-zstd with byte shuffle, and the sample metadata (the ``meta.json`` of the
WebDataset format) as the array's attributes. An array is written completely into
``<output>/volumes.zarr.tmp/<key>`` and then renamed into the group, so the group never shows a half-written
volume. The manifest line of a volume names ``volumes.zarr/<key>`` as its ``shard`` and has
``"format": "zarr"``; :func:`pcrl.shards.read_volume` and :func:`pcrl.shards.read_region` read it.

Compression happens where the volume is prepared (a worker process or a Ray task): :func:`encode_array`
builds the array in memory and returns its files; the writer in the parent only puts those bytes on disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pcrl.io import fsync_dir

__all__ = ["CHUNK", "STORE_NAME", "ZarrWriter", "encode_array", "write_array_files"]

STORE_NAME = "volumes.zarr"
CHUNK = (64, 64, 64)


def encode_array(array: np.ndarray, meta: Mapping[str, Any], level: int = 1) -> dict[str, bytes]:
    """The files of one Zarr v3 array holding the (X, Y, Z) ``array`` with ``meta`` as its attributes, its
    chunks compressed by Blosc-zstd at ``level`` with byte shuffle: exactly the files zarr writes for it.

    zarr writes ``zarr.json``; the chunks are encoded here, one call each to the Blosc codec zarr would use
    (same configuration), without zarr's per-chunk async machinery, which costs more than the compression
    itself. As zarr does, edge chunks are padded with the fill value (0) and chunks of fill values only are
    not written.

    Returns:
        Path inside the array's folder (``zarr.json``, ``c/0/0/0``, ...) → bytes, sorted by path.
    """
    import numcodecs
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import MemoryStore

    files: dict[str, Any] = {}
    chunks = tuple(min(c, n) for c, n in zip(CHUNK, array.shape, strict=True))
    zarr.create_array(
        store=MemoryStore(files),
        shape=array.shape,
        dtype=array.dtype,
        chunks=chunks,
        compressors=[BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")],
        attributes=dict(meta),
        zarr_format=3,
    )  # writes zarr.json only: no chunk is written yet
    out = {name: buf.to_bytes() for name, buf in files.items()}
    blosc = numcodecs.Blosc(
        cname="zstd",
        clevel=level,
        shuffle=numcodecs.Blosc.SHUFFLE,
        blocksize=0,
        typesize=array.dtype.itemsize,
    )
    grid = [-(-n // c) for n, c in zip(array.shape, chunks, strict=True)]
    padded = np.zeros(chunks, dtype=array.dtype)
    for index in np.ndindex(*grid):
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
        block = array[box]
        if block.shape != chunks:
            padded[...] = 0
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        if not block.any():
            continue  # fill values only
        out["c/" + "/".join(map(str, index))] = bytes(
            blosc.encode(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        )
    return dict(sorted(out.items()))


def write_array_files(folder: Path, files: Mapping[str, bytes]) -> int:
    """Write the files of one array (from :func:`encode_array`) under ``folder``; the bytes written.

    Raises:
        ValueError: a file name that is absolute or climbs out of ``folder`` (``..``).
    """
    made: set[Path] = set()
    for name, data in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"Zarr array {folder.name}: file name {name!r} leaves the array folder")
        path = folder / relative
        if path.parent not in made:  # one mkdir per chunk folder, not per chunk
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data)
    return sum(len(data) for data in files.values())


class ZarrWriter:
    """Adds volumes to ``<output>/volumes.zarr``; every :meth:`add` is complete on disk when it returns (a
    killed job never leaves a half-written array in the group), and durable after the next :meth:`sync`."""

    def __init__(self, output: Path) -> None:
        import zarr

        self.root = output / STORE_NAME
        self.staging = output / f"{STORE_NAME}.tmp"
        zarr.open_group(store=str(self.root), mode="a", zarr_format=3)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self.total_bytes = 0
        self.unsynced_bytes = 0
        """Bytes added since the last :meth:`sync`."""
        self._unsynced: list[Path] = []
        self._syncer: ThreadPoolExecutor | None = None

    def add(self, key: str, files: Mapping[str, bytes]) -> tuple[str, int]:
        """Write the files of array ``key`` (from :func:`encode_array`, sent by a worker that could not stage
        them). Returns its manifest ``shard`` and bytes on disk."""
        tmp = self.staging / key
        shutil.rmtree(tmp, ignore_errors=True)
        size = write_array_files(tmp, files)
        return self.add_staged(key, tmp, tuple(files), size)

    def add_staged(self, key: str, folder: Path, names: Sequence[str], size: int) -> tuple[str, int]:
        """Move array ``key``, written by a worker into ``folder`` (files ``names``, ``size`` bytes in all),
        into the group. Returns its manifest ``shard`` and bytes on disk."""
        target = self.root / key
        if target.exists():  # renamed by a killed run after its journal's last line: same key, same bytes
            shutil.rmtree(target)
        os.replace(folder, target)
        self.total_bytes += size
        self.unsynced_bytes += size
        self._unsynced += [target / name for name in names]
        self._unsynced += [target / p for p in sorted({p for n in names for p in Path(n).parents})]
        return f"{STORE_NAME}/{key}", size

    def sync(self) -> None:
        """fsync every file and folder added since the last call, and the group folder that holds their
        renames. The fsyncs run on a few threads: they wait on the disk, not on the CPU."""
        if self._unsynced:
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(8, thread_name_prefix="zarr-fsync")
            for _ in self._syncer.map(_fsync, self._unsynced):
                pass
        fsync_dir(self.root)
        self._unsynced = []
        self.unsynced_bytes = 0

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None
        shutil.rmtree(self.staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
