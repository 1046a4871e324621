"""The parts of data_prep that make it fast, held to what they replaced: the hand-written tar writer against
tarfile, the chunk encoder against zarr's own writes, separable resampling against torch's trilinear kernel,
the stage timings in summary.json, the staging of worker results, --compression-level, and bench/prep.py's
report (its numbers are measured by running it, not here)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.prepare import resample
from data_prep.shard import STAGING_NAME, main, shard_volumes
from data_prep.timing import JOB_STAGES, VOLUME_STAGES, Stopwatch, stage
from data_prep.writer import ShardWriter
from data_prep.zarr_writer import CHUNK, encode_array
from pcrl.shards import decode_volume, read_manifest, read_volume

REPO = Path(__file__).resolve().parents[1]


def test_shard_writer_writes_the_bytes_tarfile_writes(tmp_path: Path) -> None:
    """Members of awkward sizes (empty, one byte, exactly a block, a block and one), one given as a staged
    file: the shard is byte for byte what tarfile writes for the same members, the offsets read them back,
    and the staged file is gone."""
    rng = np.random.default_rng(0)
    samples = {f"{k:04d}": [(s, rng.bytes(n)) for s, n in (("a.bin", size), ("b.json", 7))]
               for k, size in enumerate([0, 1, 512, 513, 70_000])}  # fmt: skip
    staged = tmp_path / "staged"
    staged.write_bytes(samples["0004"][0][1])
    writer = ShardWriter(tmp_path, max_bytes=1 << 30)
    offsets = {}
    for key, members in samples.items():
        given = [(members[0][0], staged), members[1]] if key == "0004" else members
        offsets[key] = writer.add(key, given)
    writer.close()
    assert not staged.exists() and writer.shards == ["shard-000000.tar"]

    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for suffix, data in sorted(members):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "",
                )  # fmt: skip
                tar.addfile(info, io.BytesIO(data))
    shard = (tmp_path / "shard-000000.tar").read_bytes()
    assert shard == reference.getvalue()
    for key, members in samples.items():
        for suffix, data in members:
            start, size = offsets[key][suffix]
            assert shard[start : start + size] == data


def _zarr_reference(array: np.ndarray, meta: dict, level: int) -> dict[str, bytes]:
    """What zarr itself writes for the array: the layout encode_array must reproduce."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import MemoryStore

    files: dict = {}
    z = zarr.create_array(
        store=MemoryStore(files), shape=array.shape, dtype=array.dtype,
        chunks=tuple(min(c, n) for c, n in zip(CHUNK, array.shape, strict=True)),
        compressors=[BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")], attributes=meta, zarr_format=3,
    )  # fmt: skip
    z[...] = array
    return {name: buf.to_bytes() for name, buf in sorted(files.items())}


@pytest.mark.parametrize("level", [1, 3])
def test_encode_array_writes_the_files_zarr_writes(sample_shards: Path, level: int) -> None:
    """On a real CT and a real MRI (edge chunks; the MRI's background gives chunks of zeros, which are not
    written), at two levels: the same file names and bytes as zarr's own write of the array."""
    records = {r.modality: r for r in read_manifest(sample_shards, "all")}
    for modality in ("ct", "mr"):
        array, meta = read_volume(records[modality])
        assert any(n % c for n, c in zip(array.shape, CHUNK, strict=True))  # has edge chunks
        ours = encode_array(array, meta, level)
        assert ours == _zarr_reference(array, meta, level), modality
    background = np.zeros((70, 64, 64), np.float16)
    background[:10] = 0.5
    files = encode_array(background, {}, level)
    assert "c/1/0/0" not in files and files == _zarr_reference(background, {}, level)


def test_separable_resampling_is_torch_trilinear() -> None:
    """Linear passes along each axis (shrinking first) give what one trilinear kernel gives, for axes that
    shrink, grow and stay, up to float32 rounding of the sample positions."""
    import torch
    import torch.nn.functional as F

    from data_prep.prepare import _interpolate_scale, output_shape

    rng = np.random.default_rng(1)
    array = rng.normal(0, 100, size=(37, 29, 11)).astype(np.float32)
    spacing, target = (0.6, 1.0, 3.0), (1.0, 1.0, 1.0)
    ours, _ = resample(array, np.eye(4), spacing, target)
    sizes = output_shape(array.shape, spacing, target)
    scales = [
        _interpolate_scale(n, s, t, m) for n, s, t, m in zip(array.shape, spacing, target, sizes, strict=True)
    ]
    theirs = F.interpolate(torch.from_numpy(array)[None, None], scale_factor=scales, mode="trilinear",
                           align_corners=False, recompute_scale_factor=False)[0, 0].numpy()  # fmt: skip
    assert ours.shape == theirs.shape == tuple(sizes)
    np.testing.assert_allclose(ours, theirs, atol=0.05)  # values of ~100: sample positions within 1e-4 voxel
    assert resample(array, np.eye(4), (1, 1, 1), target)[0] is not array  # a copy even where nothing changes


def test_stopwatch_counts_nested_stages_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage inside another counts as itself only (on a clock that ticks 0, 1, 4, 10: the inner stage 3,
    the outer 10 less those 3); stage() outside any active stopwatch does nothing."""
    import data_prep.timing as timing

    ticks = iter([0.0, 1.0, 4.0, 10.0])
    watch = Stopwatch()
    with stage("nowhere"):
        pass
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    with watch.active(), watch.time("outer"), stage("inner"):
        pass
    assert watch.seconds == {"inner": 3.0, "outer": 7.0}


def test_summary_says_where_the_time_went(sample_shards: Path) -> None:
    """In one process: every stage of a prepared volume is timed, and the stages add up within the parent's
    wait for them, which is within the loop's wall time; the job's fixed costs are there too."""
    timings = json.loads((sample_shards / "summary.json").read_text())["timings"]
    assert timings["backend"] == "inline" and timings["workers"] == 1 and timings["prepared"] == 4
    assert set(timings["job"]) == set(JOB_STAGES) and timings["job"]["qa_sheet"] > 0
    volumes = timings["volumes"]
    assert all(volumes[k] > 0 for k in ("read", "resample", "intensity", "encode", "compress"))
    assert set(volumes) <= set(VOLUME_STAGES) and "stage" not in volumes  # nothing is staged in one process
    parent = timings["parent"]
    assert sum(volumes.values()) <= parent["wait"] <= timings["loop"]
    assert parent["write"] > 0 and parent["fsync"] > 0
    assert timings["parent_cpu"] > 0


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_workers_stage_their_results_and_the_output_is_the_same(
    sample_volumes: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    """Two worker processes write what they prepare beside the output, and the parent moves it in place:
    the same manifest and bytes as one process, including a duplicate input (its staged files are removed),
    and no staging folder is left."""
    images = [sample_volumes["brain1"], sample_volumes["lung1"]]
    copy = tmp_path / "again" / "brain1_copy.nrrd"  # same voxels: rejected as a duplicate
    copy.parent.mkdir()
    copy.write_bytes(images[0].read_bytes())
    one, two = tmp_path / "one", tmp_path / "two"
    shard_volumes([*images, copy], one, format=fmt, workers=1, progress=False)
    summary = shard_volumes([*images, copy], two, format=fmt, workers=2, progress=False)
    assert summary.timings["backend"] == "processes" and summary.timings["volumes"]["stage"] > 0
    assert summary.accepted == 2 and summary.rejected == 1
    assert not (two / STAGING_NAME).exists()
    for name in ["manifest.jsonl", "rejects.jsonl"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    files = sorted(
        p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.suffix not in (".png", ".json")
    )
    assert files == sorted(
        p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.suffix not in (".png", ".json")
    )
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_compression_level_changes_the_bytes_not_the_volumes(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """--compression-level 3: other shard bytes (smaller), the same keys and the same voxels; another job for
    the fingerprint; a level outside 1..9 is a usage error."""
    images = [sample_volumes["lung1"]]
    assert main(["--input", str(images[0]), "--output", str(tmp_path / "l3"), "--compression-level", "3",
                 "--workers", "1", "--no-progress", "--shard-size-mb", "4"]) == 0  # fmt: skip
    default = {r.key: r for r in read_manifest(sample_shards, "all")}
    (record,) = read_manifest(tmp_path / "l3", "all")
    base = default[record.key]
    assert record.size < base.size and record.checksum != base.checksum
    np.testing.assert_array_equal(read_volume(record)[0], read_volume(base)[0])
    with open(record.shard, "rb") as f:
        f.seek(record.offset)
        data = f.read(record.size)
    assert hashlib.sha256(data).hexdigest() == record.checksum.removeprefix("sha256:")
    assert decode_volume(data).shape == tuple(record.shape)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(images[0]), "--output", str(tmp_path / "bad"), "--compression-level", "12"])
    assert e.value.code == 2
    summary = json.loads((tmp_path / "l3" / "summary.json").read_text())
    assert summary["arguments"]["compression_level"] == 3


def test_bench_prep_reports_every_stage(tmp_path: Path) -> None:
    """bench/prep.py on the five real volumes, one pcrl variant: the report has the baseline, the variant's
    ratios and the per-stage, parent and fixed-cost breakdown (its values are measurements, not checked)."""
    import subprocess

    env = {**os.environ, "PCRL_CACHE": os.environ.get("PCRL_CACHE", str(REPO / ".cache"))}
    out = subprocess.run(
        [sys.executable, "bench/prep.py", "--copies", "1", "--formats", "webdataset", "--workers", "2",
         "--no-extras", "--json"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["volumes"] == 5 and len(report["results"]) == 2
    pcrl = report["results"]["pcrl webdataset, 2 workers"]
    assert pcrl["accepted"] == 4 and set(pcrl["worker_ms_per_volume"]) == set(VOLUME_STAGES)
    assert set(pcrl["fixed_s"]) == {*JOB_STAGES, "other"} and pcrl["parent_serial_ms_per_volume"] > 0
    assert pcrl["ratio_to_naive"] > 0 and pcrl["ratio_to_naive_per_volume"] > 0


def test_write_array_files_writes_inside_its_folder_only(tmp_path: Path) -> None:
    """One writer of an array's files, for workers that stage and for the parent: nested chunk folders are
    made, the bytes counted, and a name that leaves the folder is refused before anything is written."""
    from data_prep.zarr_writer import write_array_files

    assert write_array_files(tmp_path / "a", {"zarr.json": b"{}", "c/0/0/1": b"xyz"}) == 5
    assert (tmp_path / "a" / "c" / "0" / "0" / "1").read_bytes() == b"xyz"
    for name in ("../escape", "/abs", "c/../../escape"):
        with pytest.raises(ValueError, match="leaves the array folder"):
            write_array_files(tmp_path / "b", {name: b"x"})
    assert not (tmp_path / "escape").exists()
