"""The Zarr v3 output: the same volumes, keys and manifest facts as the WebDataset output, random access and
region reads through pcrl.shards, the stream on top of it, and the same re-run rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_prep.shard import shard_volumes
from pcrl.data import VolumeStream
from pcrl.shards import read_manifest, read_region, read_volume


@pytest.fixture(scope="module")
def zarr_shards(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lung1 (CT) and brain1 (MRI) at 1 mm in a Zarr store."""
    out = tmp_path_factory.mktemp("zarr_shards")
    shard_volumes([sample_volumes["lung1"], sample_volumes["brain1"]], out, format="zarr", progress=False)
    return out


def test_zarr_store_holds_the_same_volumes_as_the_tars(zarr_shards: Path, sample_shards: Path) -> None:
    """Each Zarr array equals the WebDataset sample with the same key (voxels, dtype, metadata), the manifest
    names it, and the array's attributes carry the sample metadata."""
    tars = {r.key: r for r in read_manifest(sample_shards, "all")}
    records = read_manifest(zarr_shards, "all")
    assert len(records) == 2
    for rec in records:
        assert rec.format == "zarr" and rec.shard == zarr_shards / "volumes.zarr" / rec.key
        array, meta = read_volume(rec, verify=True)
        ref, ref_meta = read_volume(tars[rec.key])
        np.testing.assert_array_equal(array, ref)
        assert array.dtype == ref.dtype and meta == ref_meta
        z = zarr.open_array(store=str(rec.shard), mode="r")
        assert z.metadata.zarr_format == 3 and z.chunks == tuple(min(64, n) for n in rec.shape)
    summary = json.loads((zarr_shards / "summary.json").read_text())
    assert summary["accepted"] == 2 and summary["total_bytes"] > 0
    assert not (zarr_shards / "volumes.zarr.tmp").exists()


def test_read_region_reads_a_box_from_both_formats(zarr_shards: Path, sample_shards: Path) -> None:
    """A region read returns exactly that box of the volume, for Zarr (chunk reads) and tars (decode and
    slice); a box outside the volume is a ValueError naming it."""
    rec = read_manifest(zarr_shards, "all")[0]
    (tar_rec,) = [r for r in read_manifest(sample_shards, "all") if r.key == rec.key]
    full, _ = read_volume(rec)
    start, size = (50, 70, 30), (64, 40, 20)
    box = full[50:114, 70:110, 30:50]
    np.testing.assert_array_equal(read_region(rec, start, size), box)
    np.testing.assert_array_equal(read_region(tar_rec, start, size), box)
    with pytest.raises(ValueError, match="not inside volume"):
        read_region(rec, (0, 0, rec.shape[2] - 1), (8, 8, 8))


def test_stream_reads_zarr_records(zarr_shards: Path) -> None:
    """The training stream takes Zarr records like tar records (the loader does not care about the format)."""
    records = read_manifest(zarr_shards, "all")

    def transform(volume, seed, threshold):
        return {"shape": tuple(volume.shape), "max": float(volume.max())}

    stream = VolumeStream(records, transform, rank=0, world_size=1, seed=0, ct_window=(-1000, 1000))
    samples = [s for _, s in zip(range(2), iter(stream), strict=False)]
    assert sorted(s["key"] for s in samples) == sorted(r.key for r in records)
    assert all(0 < s["max"] <= 1 for s in samples)


def test_zarr_rerun_writes_nothing(sample_volumes: dict[str, Path], zarr_shards: Path) -> None:
    """A re-run of the same Zarr job is recognised and leaves the store untouched."""
    before = {p: p.stat().st_mtime_ns for p in zarr_shards.rglob("*")}
    summary = shard_volumes(
        [sample_volumes["lung1"], sample_volumes["brain1"]], zarr_shards, format="zarr", progress=False
    )
    assert summary.up_to_date
    assert {p: p.stat().st_mtime_ns for p in zarr_shards.rglob("*")} == before


def test_zarr_from_worker_processes_equals_the_inline_store(
    sample_volumes: dict[str, Path], zarr_shards: Path, tmp_path: Path
) -> None:
    """Arrays compressed in two worker processes (and only written by the parent) give the same manifest and
    the same files, byte for byte, as the one-process store."""
    shard_volumes(
        [sample_volumes["lung1"], sample_volumes["brain1"]],
        tmp_path,
        format="zarr",
        workers=2,
        progress=False,
    )
    assert (tmp_path / "manifest.jsonl").read_bytes() == (zarr_shards / "manifest.jsonl").read_bytes()
    ours = {p.relative_to(tmp_path): p for p in (tmp_path / "volumes.zarr").rglob("*") if p.is_file()}
    theirs = {p.relative_to(zarr_shards): p for p in (zarr_shards / "volumes.zarr").rglob("*") if p.is_file()}
    assert sorted(ours) == sorted(theirs) and len(ours) > 10
    assert all(ours[k].read_bytes() == theirs[k].read_bytes() for k in ours)
