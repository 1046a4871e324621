"""data_prep.shard is safe to kill and re-run: a re-run on unchanged input writes nothing, and a job killed
mid-way and re-run reuses its complete shards and ends with the same manifest as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.fetch import image_names
from data_prep.shard import shard_volumes
from data_prep.writer import JOURNAL_NAME

REPO = Path(__file__).resolve().parents[1]


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def _assert_same_set(out: Path, ref: Path) -> None:
    """``out`` holds the same shard files as ``ref``, and manifest, rejects and every shard are byte-identical."""
    names = sorted(p.name for p in ref.glob("shard-*.tar"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == names
    for name in ["manifest.jsonl", "rejects.jsonl", *names]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_shard_rerun_on_unchanged_input_writes_nothing(
    sample_volumes: dict[str, Path], sample_shards: Path
) -> None:
    """Running the same job again finds its summary's fingerprint and touches no file (a re-run of a 10^5
    volume job must not redo hours of work or rewrite shards that loaders are reading)."""
    before = _state(sample_shards)
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    summary = shard_volumes(images, sample_shards, shard_size_mb=4, workers=2, progress=False)
    assert summary.up_to_date and summary.accepted == 4
    assert _state(sample_shards) == before


def test_shard_killed_after_its_manifest_only_tidies_up(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """A job killed after writing its manifest (the set is complete) but before removing its journal: the
    re-run recognises the complete set, removes the stale journal and rewrites nothing else."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sample_shards, out)
    (out / JOURNAL_NAME).write_text('{"fingerprint": "x"}\n')
    before = {k: v for k, v in _state(out).items() if k != JOURNAL_NAME}
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    summary = shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False)
    assert summary.up_to_date
    assert _state(out) == before


def test_shard_killed_before_journaling_its_first_shard_resumes(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """The state a kill leaves between renaming the first complete shard and journaling it: shards on disk,
    a journal of this job with no entries, no manifest. The re-run must take them as its own leftovers
    (not as another job's set that needs --overwrite) and end byte-identical."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sample_shards, out)
    job = json.loads((out / "summary.json").read_text())["fingerprint"]
    for name in ["manifest.jsonl", "rejects.jsonl", "summary.json", "qa.png"]:
        (out / name).unlink()
    (out / JOURNAL_NAME).write_text(json.dumps({"fingerprint": job, "format_version": 1}) + "\n")
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    summary = shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False)
    assert summary.accepted == 4 and summary.resumed == 0
    _assert_same_set(out, sample_shards)


def test_shard_rerun_with_other_options_needs_overwrite(
    sample_volumes: dict[str, Path], sample_shards: Path
) -> None:
    """Another spacing is another job: the existing set is not silently mixed with or replaced by it."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        shard_volumes(images, sample_shards, shard_size_mb=4, spacing=(2.0, 2.0, 2.0), progress=False)


def _run_and_kill(images: list[Path], out: Path, killed_when: Path, *extra: str) -> None:
    """Start the CLI on ``images`` and SIGKILL it as soon as ``killed_when`` exists."""
    cmd = [sys.executable, "-m", "data_prep.shard", "--input", *map(str, images), "--output", str(out),
           "--shard-size-mb", "4", "--workers", "1", "--no-progress", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not killed_when.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.jsonl").exists()


def test_shard_killed_job_resumes_to_the_same_manifest(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """SIGKILL the CLI once two shards are complete, re-run: the first shard file is reused untouched, the
    rest is recomputed from the journal's position, and manifest, rejects and every shard are byte-identical
    to the uninterrupted run (sample_shards, same options)."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    out = tmp_path / "out"
    _run_and_kill(images, out, out / "shard-000001.tar")
    assert (out / JOURNAL_NAME).exists()
    first = (out / "shard-000000.tar").stat()

    summary = shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False)
    assert summary.resumed >= 1 and not summary.up_to_date
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # reused, not rewritten
    _assert_same_set(out, sample_shards)
    assert not (out / JOURNAL_NAME).exists() and not list(out.glob("*.tmp"))
    assert json.loads((out / "summary.json").read_text())["accepted"] == 4


def test_shard_killed_before_any_shard_is_complete_resumes_to_the_same_bytes(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """Killed while the very first shard is still a temporary file: the re-run discards the partial file and
    ends byte-identical to the uninterrupted run (nothing half-written is ever taken for complete)."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    out = tmp_path / "out"
    _run_and_kill(images, out, out / "shard-000000.tar.tmp")
    assert not list(out.glob("shard-*.tar"))
    summary = shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False)
    assert summary.resumed == 0 and summary.accepted == 4
    _assert_same_set(out, sample_shards)
    assert not list(out.glob("*.tmp"))


def test_zarr_killed_job_resumes_to_the_same_manifest(
    sample_volumes: dict[str, Path], tmp_path: Path
) -> None:
    """The Zarr store killed after its first complete array and re-run: that array is reused untouched and the
    manifest, rejects and every array file equal those of an uninterrupted run."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    ref = tmp_path / "ref"
    shard_volumes(images, ref, shard_size_mb=4, format="zarr", workers=1, progress=False)
    first_key = json.loads((ref / "manifest.jsonl").read_text().splitlines()[0])["key"]
    out = tmp_path / "out"
    _run_and_kill(images, out, out / "volumes.zarr" / first_key / "zarr.json", "--format", "zarr")
    # The kill lands before or after the journal line of that array: the re-run must be right either way.
    before = (out / "volumes.zarr" / first_key / "zarr.json").stat().st_mtime_ns
    summary = shard_volumes(images, out, shard_size_mb=4, format="zarr", workers=1, progress=False)
    assert summary.accepted == 4 and not summary.up_to_date
    if summary.resumed:
        assert (out / "volumes.zarr" / first_key / "zarr.json").stat().st_mtime_ns == before
    for name in ["manifest.jsonl", "rejects.jsonl"]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    files = sorted(p.relative_to(ref) for p in (ref / "volumes.zarr").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in (out / "volumes.zarr").rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (ref / f).read_bytes() for f in files)
    assert not (out / JOURNAL_NAME).exists() and not (out / "volumes.zarr.tmp").exists()
