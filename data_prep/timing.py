"""Where a sharding job spends its time: seconds per stage, summed over volumes, in ``summary.json``.

The stages of one volume (:data:`VOLUME_STAGES`) are timed where the volume is prepared (a worker process, a
Ray task or this process) and travel back with it; the parent's own stages (:data:`PARENT_STAGES`) and the
job's fixed costs (:data:`JOB_STAGES`) are timed in the parent. ``python bench/prep.py`` prints them per
variant. The timer costs two ``perf_counter`` calls per stage, so it is always on.

Code deep inside a stage (a reader's reorientation, say) marks its part with :func:`stage`, which adds to
the :class:`Stopwatch` that is active in this process and does nothing when none is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["JOB_STAGES", "PARENT_STAGES", "VOLUME_STAGES", "Stopwatch", "stage"]

VOLUME_STAGES = ("read", "reorient", "resample", "intensity", "encode", "compress", "stage")
"""Per volume, where it is prepared: read and decode the file; reorder its axes to RAS+; resample to the
target spacing; the intensity policy (and the body crop); serialise and hash the ``.npy`` bytes (and the
sample metadata); compress (zstd, or the Zarr array's Blosc chunks); write the result to the staging folder
(workers on the writer's machine: :func:`data_prep.prepare.prepare_volume`)."""
PARENT_STAGES = ("receive", "write", "fsync", "bookkeeping")
"""Per volume, in the parent: take the prepared volume from the pool (unpickling included, waiting for a
worker excluded); append it to a shard or write its Zarr files; make shards and the journal durable; the
manifest line, duplicate check and journal entry."""
JOB_STAGES = ("start", "pool_start", "qa_sheet", "finish")
"""Once per job: list the inputs, fingerprint them and read DICOM headers; start the worker processes (as far
as it did not overlap the start); draw ``qa.png``; write the rejects, summary and manifest."""

_active: Stopwatch | None = None


class Stopwatch:
    """Seconds per stage name, summed over every time the stage ran. Stages nest: a stage timed inside
    another is counted as itself only, so that the stages add up to the time spent."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[float] = []  # per stage being timed: seconds of the stages nested in it so far

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def merge(self, seconds: Mapping[str, float]) -> None:
        for name, value in seconds.items():
            self.add(name, value)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (less the stages timed inside it)."""
        start = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.add(name, elapsed - self._open.pop())
            if self._open:
                self._open[-1] += elapsed

    @contextmanager
    def active(self) -> Iterator[Stopwatch]:
        """Make this the stopwatch that :func:`stage` adds to, in this process, for the ``with`` block."""
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {k: round(v, digits) for k, v in sorted(self.seconds.items())}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the ``with`` block as stage ``name`` of the active :class:`Stopwatch` (none active: untimed)."""
    if _active is None:
        yield
        return
    with _active.time(name):
        yield
