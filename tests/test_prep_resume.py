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
from data_prep.shard import JOURNAL_NAME, shard_volumes

REPO = Path(__file__).resolve().parents[1]


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


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


def test_shard_rerun_with_other_options_needs_overwrite(
    sample_volumes: dict[str, Path], sample_shards: Path
) -> None:
    """Another spacing is another job: the existing set is not silently mixed with or replaced by it."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        shard_volumes(images, sample_shards, shard_size_mb=4, spacing=(2.0, 2.0, 2.0), progress=False)


def test_shard_killed_job_resumes_to_the_same_manifest(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """SIGKILL the CLI once two shards are complete, re-run: the first shard file is reused untouched, the
    rest is recomputed from the journal's position, and manifest, rejects and every shard are byte-identical
    to the uninterrupted run (sample_shards, same options)."""
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.shard", "--input", *map(str, images), "--output", str(out),
           "--shard-size-mb", "4", "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "shard-000001.tar").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.jsonl").exists() and (out / JOURNAL_NAME).exists()
    first = (out / "shard-000000.tar").stat()

    summary = shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False)
    assert summary.resumed >= 1 and not summary.up_to_date
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # reused, not rewritten
    names = sorted(p.name for p in sample_shards.glob("shard-*.tar"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == names
    for name in ["manifest.jsonl", "rejects.jsonl", *names]:
        assert (out / name).read_bytes() == (sample_shards / name).read_bytes(), name
    assert not (out / JOURNAL_NAME).exists() and not list(out.glob("*.tmp"))
    assert json.loads((out / "summary.json").read_text())["accepted"] == 4
