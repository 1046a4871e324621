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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHUNK", "STORE_NAME", "ZarrWriter", "encode_array"]

STORE_NAME = "volumes.zarr"
CHUNK = (64, 64, 64)


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def encode_array(array: np.ndarray, meta: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of one Zarr v3 array holding the (X, Y, Z) ``array`` with ``meta`` as its attributes.

    Returns:
        Path inside the array's folder (``zarr.json``, ``c/0/0/0``, ...) → bytes.
    """
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import MemoryStore

    files: dict[str, Any] = {}
    z = zarr.create_array(
        store=MemoryStore(files),
        shape=array.shape,
        dtype=array.dtype,
        chunks=tuple(min(c, n) for c, n in zip(CHUNK, array.shape, strict=True)),
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        attributes=dict(meta),
        zarr_format=3,
    )
    z[...] = array
    return {name: buf.to_bytes() for name, buf in sorted(files.items())}


class ZarrWriter:
    """Adds volumes to ``<output>/volumes.zarr``; every :meth:`add` is complete on disk when it returns."""

    def __init__(self, output: Path) -> None:
        import zarr

        self.root = output / STORE_NAME
        self.staging = output / f"{STORE_NAME}.tmp"
        zarr.open_group(store=str(self.root), mode="a", zarr_format=3)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self.total_bytes = 0

    def add(self, key: str, files: Mapping[str, bytes]) -> tuple[str, int]:
        """Write the files of array ``key`` (from :func:`encode_array`). Returns its manifest ``shard`` and
        bytes on disk."""
        tmp = self.staging / key
        shutil.rmtree(tmp, ignore_errors=True)
        for name, data in files.items():
            path = tmp / name
            if not path.resolve().is_relative_to(tmp.resolve()):
                raise ValueError(f"Zarr array {key}: file name {name!r} leaves the array folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        target = self.root / key
        if target.exists():  # renamed by a killed run after its journal's last line: same key, same bytes
            shutil.rmtree(target)
        os.replace(tmp, target)
        size = _bytes_under(target)
        self.total_bytes += size
        return f"{STORE_NAME}/{key}", size

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
