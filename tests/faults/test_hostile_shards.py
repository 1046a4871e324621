"""Shard folders crafted to hurt the training reader: decompression bombs (a zstd frame or a Zarr array that
declares far more than the manifest), manifest sizes past the end of the file, deeply nested or overflowing
JSON, unknown modalities, and shards that are symlinks out of the folder. Each must be refused with the file
(and line, or shard and key) named, before memory is spent on it; in the training stream each costs one
skipped volume, counted against ``data.max_bad_fraction``, never a traceback.

Every case starts from a copy of the real ``sample_shards`` and damages it on disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from pcrl.data import BadDataError, VolumeStream
from pcrl.shards import MANIFEST_NAME, SampleRecord, read_manifest, read_region, read_volume

REPO = Path(__file__).resolve().parents[2]
BOMB_BYTES = 1 << 30
"""What the bombs inflate to: 1 GiB."""
GROWTH_LIMIT_MB = 100
"""Bound on a refused read's peak memory growth: the sample volume the manifest allows is 13 MB."""


def _transform(volume: torch.Tensor, seed: int, threshold: float | None) -> dict:
    return {"mean": volume.mean()}


def _lines(folder: Path) -> list[dict]:
    return [json.loads(s) for s in (folder / MANIFEST_NAME).read_text().splitlines()]


def _write_manifest(folder: Path, lines: list[dict | str]) -> None:
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    (folder / MANIFEST_NAME).write_text(text)


def _write_tar(path: Path, key: str, image: bytes, meta: bytes) -> dict:
    """A one-sample shard as data_prep writes it; returns the manifest offsets of its members."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in ((f"{key}.image.npy.zst", image), (f"{key}.meta.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, BytesIO(payload))
    with tarfile.open(path) as tar:
        img, met = tar.getmembers()
    return {
        "offset": img.offset_data,
        "size": img.size,
        "meta_offset": met.offset_data,
        "meta_size": met.size,
    }


def _zstd_bomb(declare_size: bool) -> bytes:
    """1 GiB of zeros in one zstd frame (~40 KB), with or without the content size in its header."""
    c = zstandard.ZstdCompressor(level=3).compressobj(size=BOMB_BYTES if declare_size else -1)
    block = bytes(1 << 24)
    return b"".join(c.compress(block) for _ in range(BOMB_BYTES >> 24)) + c.flush()


def _read_in_child(folder: Path) -> dict:
    """Read the folder's first volume in a fresh Python; its error and its peak memory growth (ru_maxrss of
    the child, from just before the read)."""
    code = (
        "import json, resource, sys\n"
        "from pcrl.shards import read_manifest, read_volume\n"
        "record = read_manifest(sys.argv[1])[0]\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read_volume(record)\n"
        "    error = None\n"
        "except ValueError as e:\n"
        "    error = str(e)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'error': error, 'growth_mb': (peak - base) / 1024}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def shards(sample_shards: Path, tmp_path: Path) -> Path:
    """A copy of the real sample shards, to damage."""
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    return out


def _smallest(folder: Path) -> dict:
    return min(_lines(folder), key=lambda line: np.prod(line["shape"]))


def _zarr_volume(shards: Path) -> tuple[Path, dict]:
    """The smallest sample volume, cut to 70×64×40, as a Zarr v3 array written by data_prep's own encoder,
    alone in the folder's manifest (two chunks along x). Returns the array folder and its manifest line."""
    from data_prep.zarr_writer import STORE_NAME, encode_array

    line = _smallest(shards)
    (record,) = [r for r in read_manifest(shards) if r.key == line["key"]]
    array, meta = read_volume(record)
    array = np.ascontiguousarray(array[:70, :64, :40])
    folder = shards / STORE_NAME / line["key"]
    for name, data in encode_array(array, meta).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    zline = {
        **line,
        "shard": f"{STORE_NAME}/{line['key']}",
        "offset": 0,
        "size": 1,
        "meta_offset": 0,
        "meta_size": 0,
        "shape": list(array.shape),
        "format": "zarr",
    }
    _write_manifest(shards, [zline])
    return folder, zline


# --- memory bounded before inflation ----------------------------------------------------------------


@pytest.mark.parametrize("declare_size", [True, False], ids=["content-size", "no-content-size"])
def test_zstd_bomb_is_refused_before_it_inflates(shards: Path, declare_size: bool) -> None:
    """Pins: a ~40 KB image member that decompresses to 1 GiB being inflated before its shape is compared
    with the manifest. With a content size in the frame header it is refused unread; without one it is
    inflated into a buffer of the manifest's size and refused one byte past it."""
    line = _smallest(shards)
    bomb = _zstd_bomb(declare_size)
    assert len(bomb) < 100_000
    offsets = _write_tar(shards / "bomb.tar", line["key"], bomb, b"{}")
    _write_manifest(shards, [{**line, "shard": "bomb.tar", **offsets}])
    got = _read_in_child(shards)
    assert got["growth_mb"] < GROWTH_LIMIT_MB, got
    assert f"cannot decode volume {line['key']}" in got["error"] and "bomb.tar" in got["error"]
    if declare_size:
        assert f"declares {BOMB_BYTES} bytes uncompressed" in got["error"], got
        assert "refusing to inflate it" in got["error"]
    else:
        assert "inflates to more than" in got["error"] and "refused at that limit" in got["error"], got


def test_zarr_array_declaring_a_larger_shape_is_refused_before_any_chunk(shards: Path) -> None:
    """Pins: a Zarr array whose zarr.json declares 1 GiB (1024×1024×512 float16) where the manifest says
    70×64×40 being read whole before the shapes are compared."""
    folder, zline = _zarr_volume(shards)
    meta = json.loads((folder / "zarr.json").read_text())
    meta["shape"] = [1024, 1024, 512]
    (folder / "zarr.json").write_text(json.dumps(meta))
    got = _read_in_child(shards)
    assert got["growth_mb"] < GROWTH_LIMIT_MB, got
    assert "zarr.json declares 'float16'[1024, 1024, 512]" in got["error"], got
    assert f"manifest says float16{zline['shape']}" in got["error"] and zline["key"] in got["error"]


def test_zarr_chunk_declaring_a_larger_size_is_refused_before_it_inflates(shards: Path) -> None:
    """A Blosc chunk whose header declares 2 GiB uncompressed (a chunk is 64×64×40 float16 = 320 KB) is
    refused, naming the chunk file, for a whole read and for a region read that touches it."""
    folder, _ = _zarr_volume(shards)
    chunk = folder / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[4:8] = (0x7FFFFFF0).to_bytes(4, "little")
    chunk.write_bytes(bytes(data))
    got = _read_in_child(shards)
    assert got["growth_mb"] < GROWTH_LIMIT_MB, got
    assert str(chunk) in got["error"] and f"declares {0x7FFFFFF0} bytes uncompressed" in got["error"], got
    (record,) = read_manifest(shards)
    with pytest.raises(ValueError, match="refusing to inflate it"):
        read_region(record, (0, 0, 0), (8, 8, 8))
    # A region of the other chunk reads only that chunk, which is intact.
    assert read_region(record, (64, 0, 0), (6, 8, 8)).shape == (6, 8, 8)


def test_member_past_the_end_of_the_file_is_refused_before_reading(shards: Path) -> None:
    """A manifest size or offset that the file cannot hold is compared with the file's real size before any
    read: a size beyond what the volume can compress to is a malformed line; one that fits the volume but
    not the file is an unreadable volume naming both sizes."""
    line = _smallest(shards)
    _write_manifest(shards, [{**line, "size": 1 << 40}])
    with pytest.raises(
        ValueError, match=r"manifest.jsonl:1: malformed manifest line: size 1099511627776 is more"
    ):
        read_manifest(shards)
    file_size = (shards / line["shard"]).stat().st_size
    _write_manifest(shards, [{**line, "meta_offset": file_size - 10, "meta_size": 100}])
    (record,) = read_manifest(shards)
    with pytest.raises(
        ValueError, match=rf"metadata of volume {line['key']} is truncated .* the file has {file_size}"
    ):
        read_volume(record)


# --- malformed manifest lines -----------------------------------------------------------------------


def _bad_lines(line: dict) -> dict[str, tuple[str, str]]:
    """id → (manifest line text, what the error must say)."""
    good = json.dumps(line)
    return {
        "not-json": ("{not json", "is not valid JSON"),
        "overflow": (
            good.replace(f'"offset": {line["offset"]}', '"offset": 1e400'),
            "number 1e400 is out of range",
        ),
        "nan": (good.replace('"spacing": [1.0', '"spacing": [NaN'), "NaN is not a number JSON allows"),
        "deep": ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nests 100000 levels deep, more than the 64"),
        "deep-extra-key": (good[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}", "nests 5001 levels deep"),
        "long": (good[:-1] + ', "x": "' + "a" * (1 << 20) + '"}', "longer than 1048576 bytes"),
        "array": ("[1, 2]", "expected a JSON object, got list"),
        "offset-string": (json.dumps({**line, "offset": "512"}), "offset must be an integer >= 0, got '512'"),
        "offset-negative": (json.dumps({**line, "offset": -1}), "offset must be an integer >= 0, got -1"),
        "offset-bool": (json.dumps({**line, "offset": True}), "offset must be an integer >= 0, got True"),
        "shape-type": (json.dumps({**line, "shape": "200"}), "shape must be 3 positive integers, got '200'"),
        "shape-float": (json.dumps({**line, "shape": [200, 200, 1.5]}), "shape must be 3 positive integers"),
        "shape-huge": (
            json.dumps({**line, "shape": [4096, 4096, 4096]}),
            "more than the 4294967296 a volume",
        ),
        "spacing-zero": (json.dumps({**line, "spacing": [1, 1, 0]}), "spacing must be 3 positive finite"),
        "modality": (
            json.dumps({**line, "modality": "pet"}),
            "unknown modality 'pet'; expected one of ct, mr",
        ),
        "split": (json.dumps({**line, "split": 7}), "split must be a non-empty string, got 7"),
        "dtype": (json.dumps({**line, "dtype": "object"}), "dtype 'object' is not a numeric dtype"),
        "key": (json.dumps({**line, "key": "../../x\nlog"}), "is not a sample key"),
        "format": (json.dumps({**line, "format": "hdf5"}), "unknown format 'hdf5'"),
        "meta-size": (json.dumps({**line, "meta_size": 1 << 30}), "meta_size 1073741824 is more than"),
    }


@pytest.mark.parametrize("case", list(_bad_lines({"offset": 0}).keys()))
def test_malformed_manifest_lines_are_refused_naming_file_line_and_problem(shards: Path, case: str) -> None:
    """Pins: ``1e400`` (OverflowError), a deeply nested line (RecursionError) or an unknown modality escaping
    as a traceback that names neither the manifest nor the line; and wrong types read as something else."""
    lines = _lines(shards)
    text, what = _bad_lines(lines[0])[case]
    _write_manifest(shards, [lines[1], text])
    with pytest.raises(ValueError) as info:
        read_manifest(shards)
    message = str(info.value)
    assert message.startswith(f"{shards / MANIFEST_NAME}:2: malformed manifest line: "), message[:300]
    assert what in message, message[:300]
    assert len(message) < 500, "a hostile value is not echoed in full"


# --- symlinks out of the folder ---------------------------------------------------------------------


def test_shard_symlinked_outside_the_folder_is_refused(shards: Path, tmp_path: Path) -> None:
    """Pins: a shard that is a symlink to a file outside the folder being read (the path was checked with
    abspath, not resolved). Refused when the manifest is read; a link made after that is refused at read
    time, for tars and for Zarr chunk files."""
    line = _lines(shards)[0]
    outside = tmp_path / "outside.tar"
    shutil.move(shards / line["shard"], outside)
    (shards / line["shard"]).symlink_to(outside)
    with pytest.raises(
        ValueError, match=rf":1: malformed manifest line: shard '{line['shard']}' lies outside"
    ):
        read_manifest(shards)
    # A link inside the folder is fine.
    shutil.move(outside, shards / "real.tar")
    (shards / line["shard"]).unlink()
    (shards / line["shard"]).symlink_to(shards / "real.tar")
    records = read_manifest(shards)
    assert read_volume(records[0])[0].shape == tuple(line["shape"])
    # Swapped for a link out of the folder once the manifest has been read.
    shutil.move(shards / "real.tar", outside)
    (shards / line["shard"]).unlink()
    (shards / line["shard"]).symlink_to(outside)
    with pytest.raises(
        ValueError, match=rf"{line['shard']}: resolves to .*outside.tar, outside the shard folder"
    ):
        read_volume(records[0])


def test_zarr_chunk_symlinked_outside_the_folder_is_refused(shards: Path, tmp_path: Path) -> None:
    folder, _ = _zarr_volume(shards)
    chunk = folder / "c" / "1" / "0" / "0"
    outside = tmp_path / "chunk"
    shutil.move(chunk, outside)
    chunk.symlink_to(outside)
    (record,) = read_manifest(shards)
    with pytest.raises(ValueError, match=r"c/1/0/0: resolves to .*, outside the shard folder"):
        read_volume(record)


# --- the training stream: one skipped volume each ---------------------------------------------------


@pytest.fixture
def hostile(shards: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The 4 sample volumes plus 4 hostile ones the manifest accepts: a zstd bomb, a deeply nested
    meta.json, a metadata member past the end of its file, and a shard swapped for a symlink out of the
    folder after the manifest was read (made by the test). Returns the folder and {damage: key}."""
    lines = _lines(shards)
    good = _smallest(shards)
    # Real volumes re-keyed, so each hostile sample is a volume of its own.
    added, keys = [], {}
    for i, damage in enumerate(["bomb", "deep-meta", "past-end", "symlink"]):
        key = f"hostile{i:02d}{damage.replace('-', '')}"
        src = shards / good["shard"]
        image = src.read_bytes()[good["offset"] : good["offset"] + good["size"]]
        meta = b"{}"
        if damage == "bomb":
            image = _zstd_bomb(declare_size=True)
        if damage == "deep-meta":
            meta = b"[" * 20_000 + b"]" * 20_000
        offsets = _write_tar(shards / f"{key}.tar", key, image, meta)
        if damage == "past-end":
            offsets.update(meta_offset=(shards / f"{key}.tar").stat().st_size - 10, meta_size=100)
        added.append({**good, "key": key, "shard": f"{key}.tar", **offsets})
        keys[damage] = key
    _write_manifest(shards, [*lines, *added])
    return shards, {**keys, "good": [line["key"] for line in lines]}


def _stream(records: list[SampleRecord], **kw) -> VolumeStream:
    return VolumeStream(records, _transform, rank=0, world_size=1, seed=0, ct_window=(-1000, 1000), **kw)


def test_hostile_volumes_are_skipped_named_and_counted(hostile, tmp_path: Path, caplog) -> None:
    """Every hostile volume the manifest lets through costs one skipped volume, warned with its shard and
    key and counted against data.max_bad_fraction; none raises a traceback. A record with a modality the
    loader does not know (built in code, as the manifest refuses it) is skipped the same way."""
    import dataclasses

    shards, keys = hostile
    records = read_manifest(shards)
    (linked,) = [r for r in records if r.key == keys["symlink"]]
    shutil.move(linked.shard, tmp_path / "elsewhere.tar")
    linked.shard.symlink_to(tmp_path / "elsewhere.tar")
    pet = dataclasses.replace(records[0], key="hostile99pet", modality="pet")
    records.append(pet)
    keys["modality"] = pet.key
    stream = _stream(records, bad_volumes="skip", max_bad_fraction=0.9)
    with caplog.at_level(logging.WARNING, logger="pcrl.data"):
        it = iter(stream)
        got = {next(it)["key"] for _ in range(2 * len(records))}
    assert got == set(keys["good"]), "only the sample volumes are trained on"
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable volume" in r.getMessage()]
    assert len(warnings) == 5, warnings
    expect = {
        "bomb": "refusing to inflate it",
        "deep-meta": "nests 20000 levels deep",
        "past-end": "is truncated",
        "symlink": "outside the shard folder",
        "modality": "unknown modality 'pet'",
    }
    for damage, what in expect.items():
        (warning,) = [w for w in warnings if keys[damage] in w]
        assert what in warning, warning
        assert str(shards) in warning, warning
    assert "5 unreadable of this loader's 9 volumes" in warnings[-1]
    # Past the limit, or with fail, the stream stops with BadDataError (pretrain's exit status 4).
    with pytest.raises(BadDataError, match=r"of the 9 volumes of one loader are unreadable"):
        it = iter(_stream(records, bad_volumes="skip", max_bad_fraction=0.2))
        for _ in range(2 * len(records)):
            next(it)
    with pytest.raises(BadDataError, match=r"hostile\d\d\w+.*data.bad_volumes=fail"):
        it = iter(_stream(records, bad_volumes="fail"))
        for _ in range(2 * len(records)):
            next(it)
