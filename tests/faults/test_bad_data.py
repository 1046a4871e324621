"""Shards damaged on disk: a truncated shard, a flipped byte in a compressed sample, a missing shard file,
non-finite voxels, and a manifest that points outside its folder. Each unreadable volume must be reported
with its shard and key, skipped and counted (or stop the run at once with ``fail``), and the loader must
stop once the unreadable fraction passes the configured limit."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pcrl.data import BadDataError, VolumeStream
from pcrl.shards import encode_volume, read_manifest


def _transform(volume: torch.Tensor, seed: int, threshold: float | None) -> dict:
    return {"mean": volume.mean()}


def _stream(shards: Path, **kw) -> VolumeStream:
    return VolumeStream(
        read_manifest(shards), _transform, rank=0, world_size=1, seed=0, ct_window=(-1000, 1000), **kw
    )


def _keys(stream: VolumeStream, n: int) -> list[str]:
    it = iter(stream)
    return [next(it)["key"] for _ in range(n)]


@pytest.fixture
def damaged(sample_shards: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the 4-volume sample shards with three volumes damaged on disk: shard truncated, one byte of
    the compressed image flipped, shard file deleted. Returns the folder and {damage: key}."""
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    records = read_manifest(out)
    truncated, flipped, missing = records[0], records[1], records[2]
    with truncated.shard.open("r+b") as f:
        f.truncate(truncated.offset + truncated.size // 2)
    with flipped.shard.open("r+b") as f:
        f.seek(flipped.offset + flipped.size // 2)
        byte = f.read(1)[0]
        f.seek(flipped.offset + flipped.size // 2)
        f.write(bytes([byte ^ 0x10]))
    missing.shard.unlink()
    return out, {
        "truncated": truncated.key,
        "flipped": flipped.key,
        "missing": missing.key,
        "good": records[3].key,
    }


def test_bad_volumes_are_reported_skipped_and_counted(damaged, caplog) -> None:
    """Pins: a damaged shard that crashes the loader with a bare traceback, one skipped silently, or one that
    leaves a gap in the stream (every position must still yield a sample)."""
    shards, keys = damaged
    stream = _stream(shards, bad_volumes="skip", max_bad_fraction=0.9)
    with caplog.at_level(logging.WARNING, logger="pcrl.data"):
        got = _keys(stream, 8)
    assert set(got) == {keys["good"]}, "only the readable volume is trained on, in the others' places"
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable volume" in r.getMessage()]
    assert len(warnings) == 3, warnings  # each reported once, not once per epoch
    for damage in ("truncated", "flipped", "missing"):
        (line,) = [w for w in warnings if keys[damage] in w]
        assert "shard-" in line, line
    assert any("truncated" in w for w in warnings)
    assert any("No such file" in w for w in warnings)
    assert "3 unreadable of this loader's 4 volumes" in warnings[-1]


def test_bad_volumes_past_the_limit_or_with_fail_stop_the_loader(damaged) -> None:
    """Pins: a run that keeps training on a mostly broken data set, and data.bad_volumes=fail not failing."""
    shards, keys = damaged
    with pytest.raises(
        BadDataError, match=r"2 of the 4 volumes of one loader are unreadable.*max_bad_fraction=0.25"
    ):
        _keys(_stream(shards, bad_volumes="skip", max_bad_fraction=0.25), 8)
    with pytest.raises(BadDataError, match=r"shard-\d+\.tar.*data.bad_volumes=fail") as info:
        _keys(_stream(shards, bad_volumes="fail"), 8)
    assert any(k in str(info.value) for k in keys.values())


def test_non_finite_voxels_are_caught_with_the_key(sample_shards: Path, tmp_path: Path) -> None:
    """A float volume holding NaN (written by a buggy converter, or a bit flip before checksumming) must be
    refused at the loader, naming its key, instead of turning the loss into NaN steps later."""
    out = tmp_path / "nan"
    out.mkdir()
    (mr,) = [r for r in read_manifest(sample_shards) if r.modality == "mr"][:1]
    volume = np.full(mr.shape, 0.5, dtype=np.float16)
    volume[1, 2, 3] = np.nan
    data, key = encode_volume(volume)
    meta = json.dumps({"key": key}).encode()
    with tarfile.open(out / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in ((f"{key}.image.npy.zst", data), (f"{key}.meta.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    with tarfile.open(out / "shard-000000.tar") as tar:
        image, meta_member = tar.getmembers()
    line = json.loads((sample_shards / "manifest.jsonl").read_text().splitlines()[0])
    line.update(
        key=key,
        shard="shard-000000.tar",
        offset=image.offset_data,
        size=image.size,
        meta_offset=meta_member.offset_data,
        meta_size=meta_member.size,
        shape=list(mr.shape),
        modality="mr",
        dtype="float16",
        split="train",
    )
    (out / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(BadDataError, match=rf"volume {key} holds 1 non-finite voxels"):
        _keys(_stream(out, bad_volumes="fail"), 1)


def test_manifest_paths_outside_the_shard_folder_are_refused(sample_shards: Path, tmp_path: Path) -> None:
    """A manifest whose shard path climbs out of its folder (``../``) or is absolute must not make the loader
    read an arbitrary file."""
    line = json.loads((sample_shards / "manifest.jsonl").read_text().splitlines()[0])
    for shard in ("../../etc/passwd", "/etc/passwd"):
        folder = tmp_path / f"m{len(shard)}"
        folder.mkdir()
        (folder / "manifest.jsonl").write_text(json.dumps({**line, "shard": shard}) + "\n")
        with pytest.raises(ValueError, match="lies outside the manifest's folder"):
            read_manifest(folder)
