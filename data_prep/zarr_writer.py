"""The Zarr v3 output of ``python -m data_prep.shard --format zarr``.

``<output>/volumes.zarr`` is one Zarr v3 group holding one array per volume, named by the volume key: chunks
of at most 64³ voxels, Blosc-zstd with byte shuffle, and the sample metadata (the ``meta.json`` of the
WebDataset format) as the array's attributes. An array is written completely into
``<output>/volumes.zarr.tmp/<key>`` and then renamed into the group, so the group never shows a half-written
volume. The manifest line of a volume names ``volumes.zarr/<key>`` as its ``shard`` and has
``"format": "zarr"``; :func:`pcrl.data.read_volume` and :func:`pcrl.data.read_region` read it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHUNK", "STORE_NAME", "ZarrWriter"]

STORE_NAME = "volumes.zarr"
CHUNK = (64, 64, 64)


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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

    def add(self, key: str, array: np.ndarray, meta: Mapping[str, Any]) -> tuple[str, int]:
        """Write one (X, Y, Z) volume as array ``key``. Returns its manifest ``shard`` and bytes on disk."""
        import zarr
        from zarr.codecs import BloscCodec

        tmp = self.staging / key
        shutil.rmtree(tmp, ignore_errors=True)
        z = zarr.create_array(
            store=str(tmp),
            shape=array.shape,
            dtype=array.dtype,
            chunks=tuple(min(c, n) for c, n in zip(CHUNK, array.shape, strict=True)),
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
            attributes=dict(meta),
            zarr_format=3,
        )
        z[...] = array
        target = self.root / key
        if target.exists():  # renamed by a killed run after its journal's last line: same key, same bytes
            shutil.rmtree(target)
        os.replace(tmp, target)
        size = _bytes_under(target)
        self.total_bytes += size
        return f"{STORE_NAME}/{key}", size

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
