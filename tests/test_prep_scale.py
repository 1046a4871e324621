"""data_prep at scale: a Ray cluster (a local Ray instance here) runs the same code path as the local
process pool and writes the same bytes; the pool keeps results in order and bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.fetch import image_names
from data_prep.pool import Pool, WorkerDied
from data_prep.shard import shard_volumes


def test_shard_on_local_ray_writes_the_same_bytes_as_one_process(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """``ray="local"`` (the CLI's ``--ray local``) prepares every volume as a Ray task on a real local Ray
    instance and ends with byte-identical shards, manifest and rejects to the one-process run (a back end
    that reordered, dropped or re-encoded volumes would show here); Ray is stopped afterwards."""
    ray = pytest.importorskip("ray")
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    summary = shard_volumes(images, tmp_path, shard_size_mb=4, workers=2, ray="local", progress=False)
    assert (summary.accepted, summary.rejected) == (4, 1)
    names = sorted(p.name for p in sample_shards.glob("shard-*.tar"))
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == names
    for name in ["manifest.jsonl", "rejects.jsonl", *names]:
        assert (tmp_path / name).read_bytes() == (sample_shards / name).read_bytes(), name
    assert not ray.is_initialized()


def _square_or_die(x: int) -> int:
    if x == 3:
        os._exit(1)  # a worker killed mid-task (as the OOM killer does)
    return x * x


def test_pool_keeps_order_and_reports_a_dead_worker() -> None:
    """Results come back in submission order with a small window; a worker that dies is a WorkerDied
    naming the task (not a hang, and not a silent gap in the results)."""
    with Pool(workers=2) as pool:
        assert list(pool.map(_square_or_die, [(x,) for x in [5, 4, 2, 1, 0]], window=2)) == [25, 16, 4, 1, 0]
    with Pool(workers=2) as pool:  # started in the background first: map waits for it, then runs as before
        pool.start()
        assert pool.wait_started() >= 0.0
        assert pool.wait_started() == 0.0  # the second call has nothing to wait for
        assert list(pool.map(_square_or_die, [(x,) for x in [6, 2]])) == [36, 4]
    with Pool(workers=2) as pool, pytest.raises(WorkerDied, match=r"died while working on \d"):
        list(pool.map(_square_or_die, [(x,) for x in range(6)]))
