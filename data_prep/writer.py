"""The output folder of a sharding job: the tar shard writer, the journal of finished volumes, resuming an
interrupted job, and ``summary.json``.

Shards appear under temporary names and are renamed when complete (:class:`ShardWriter`); the
:class:`Journal` lists only volumes whose shard (or Zarr array) is complete, so a killed job resumes after
its last complete shard (:func:`prepare_output`), and a folder holding the complete result of the same job
is recognised from its ``summary.json`` (:func:`completed_summary`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from data_prep.prepare import FORMAT_VERSION
from data_prep.qa import QA_NAME
from data_prep.timing import stage
from data_prep.zarr_writer import STORE_NAME
from pcrl.io import fsync_dir, write_atomic
from pcrl.shards import MANIFEST_NAME, SUMMARY_NAME

__all__ = [
    "JOURNAL_NAME",
    "REJECTS_NAME",
    "SHARD_PATTERN",
    "SUMMARY_NAME",
    "Journal",
    "Resume",
    "ShardWriter",
    "Summary",
    "completed_summary",
    "prepare_output",
]

logger = logging.getLogger(__name__)

REJECTS_NAME = "rejects.jsonl"
SHARD_PATTERN = "shard-{:06d}.tar"
JOURNAL_NAME = "journal.jsonl"


class ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of about ``max_bytes`` each, deterministically.

    The tar format is written directly (POSIX ustar headers from :class:`tarfile.TarInfo`, members padded to
    512 bytes, the archive closed by two zero blocks and padded to 10 KiB, exactly as :mod:`tarfile` writes
    it) so that a sample's bytes go to the file in one write instead of 16 KiB copies. A shard is written
    under ``<name>.tmp``, fsynced, renamed and its folder fsynced: a shard that is in the journal survives a
    power loss, not only a killed job.
    """

    def __init__(self, output: Path, max_bytes: int, done: Sequence[str] = ()) -> None:
        self.output = output
        self.max_bytes = max_bytes
        self.shards: list[str] = list(done)
        """Shard names, complete ones first; a resumed job starts after the ``done`` ones."""
        self.closed = len(self.shards)
        """Complete (renamed) shards: everything added before the latest close is on disk for good."""
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._offset = 0

    @staticmethod
    def _member_bytes(size: int) -> int:
        return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def add(self, key: str, members: Sequence[tuple[str, bytes | Path]]) -> dict[str, tuple[int, int]]:
        """Append one sample (never split across shards). A member is its bytes, or a staged file (see
        :func:`data_prep.prepare.prepare_volume`) that is copied in by the kernel and then removed. Returns
        member suffix → (data offset, size)."""
        sizes = [data.stat().st_size if isinstance(data, Path) else len(data) for _, data in members]
        need = sum(self._member_bytes(size) for size in sizes)
        if self._file is not None and self._offset + need > self.max_bytes:
            self._close_shard()
        if self._file is None:
            name = SHARD_PATTERN.format(len(self.shards))
            self._tmp = self.output / f"{name}.tmp"
            self._file = self._tmp.open("wb", buffering=0)  # unbuffered: the kernel copies go to its end
            self._offset = 0
            self.shards.append(name)
        offsets: dict[str, tuple[int, int]] = {}
        for (suffix, data), size in sorted(zip(members, sizes, strict=True), key=lambda m: m[0][0]):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
            pad = -size % tarfile.BLOCKSIZE
            self._write(header)
            if isinstance(data, Path):
                _append_file(self._file, data, size)
                data.unlink()
            else:
                self._write(data)
            self._write(tarfile.NUL * pad)
            offsets[suffix] = (self._offset + len(header), size)
            self._offset += len(header) + size + pad
        return offsets

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:  # an unbuffered write may take fewer bytes than given
            view = view[self._file.write(view) :]

    @property
    def current(self) -> str:
        return self.shards[-1]

    def _close_shard(self) -> None:
        assert self._file is not None and self._tmp is not None
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker
        tail = -(self._offset + len(end)) % tarfile.RECORDSIZE
        self._file.write(end + tarfile.NUL * tail)
        with stage("fsync"):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        self._tmp.replace(self._tmp.with_suffix(""))  # shard-000000.tar.tmp → shard-000000.tar
        with stage("fsync"):
            fsync_dir(self.output)
        self._file = self._tmp = None
        self.closed += 1

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()


def _append_file(out: BinaryIO, source: Path, size: int) -> None:
    """Append the ``size`` bytes of ``source`` to ``out`` in the kernel (no copy through this process)."""
    with source.open("rb") as f:
        done = 0
        try:
            while done < size:
                n = os.sendfile(out.fileno(), f.fileno(), done, size - done)
                if n == 0:
                    raise OSError(f"{source}: ended after {done} of {size} bytes")
                done += n
        except OSError as e:
            if done or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP):
                raise
            shutil.copyfileobj(f, out)  # no file-to-file sendfile here (not Linux): copy through memory


@dataclass
class Resume:
    """What an interrupted job left that is complete: journal entries of a prefix of the volumes."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    done: Summary | None = None
    """Set when the output already holds the complete result of the same job."""

    @property
    def next_index(self) -> int:
        return self.entries[-1]["index"] + 1 if self.entries else 0

    @property
    def shards(self) -> list[str]:
        return sorted({e["shard"] for e in self.entries if e.get("shard")})


def _read_journal(path: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The entries of a journal written for ``fingerprint``, or ``None`` (absent, other job, unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("fingerprint") != fingerprint:
            return None
        entries = []
        for text in lines[1:]:
            try:
                entries.append(json.loads(text))
            except ValueError:
                break  # a line cut by the kill: everything after it is recomputed
        return entries
    except (OSError, ValueError, IndexError):
        return None


def completed_summary(output: Path, fingerprint: str) -> Summary | None:
    """The summary of ``output`` when it holds the complete result of the job ``fingerprint``, else None."""
    if not (output / MANIFEST_NAME).exists():
        return None
    try:
        previous = json.loads((output / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if previous.get("fingerprint") != fingerprint:
        return None
    # Killed between the manifest (the set is complete) and removing the journal: only tidy up.
    (output / JOURNAL_NAME).unlink(missing_ok=True)
    return Summary.from_dict(previous)


def prepare_output(output: Path, overwrite: bool, fingerprint: str = "") -> Resume:
    """Check the output folder and find what can be reused.

    A complete set of the same job (same inputs, sizes, mtimes and options) is reused as is; a journal of the
    same job is resumed after its last complete shard; anything else in the way needs ``overwrite``.
    Leftovers of an interrupted run (and, with ``overwrite``, the previous set) are removed.

    Args:
        output: the shard folder (created if missing).
        overwrite: replace whatever shard set is there.
        fingerprint: of the job's inputs and options (:func:`data_prep.shard.fingerprint`); ``""`` resumes
            nothing.

    Returns:
        What to reuse: the finished job's summary (``done``), or the journal entries to resume after.

    Raises:
        FileExistsError: the folder holds the output of another job and ``overwrite`` is not set.
    """
    output.mkdir(parents=True, exist_ok=True)
    ours = [
        *output.glob("shard-*.tar"),
        *(output / n for n in (MANIFEST_NAME, REJECTS_NAME, SUMMARY_NAME, QA_NAME)),
    ]
    ours += [p for p in (output / STORE_NAME).glob("*") if p.is_dir()]  # Zarr arrays, one per volume
    existing = [p for p in ours if p.exists()]
    journal = output / JOURNAL_NAME
    resume = Resume()
    same_job = False  # a journal of this job: whatever it left in the folder is ours to reuse or remove
    if not overwrite and fingerprint and (done := completed_summary(output, fingerprint)) is not None:
        return Resume(done=done)
    if not overwrite and fingerprint and journal.exists() and not (output / MANIFEST_NAME).exists():
        entries = _read_journal(journal, fingerprint)
        if entries is not None:
            # Even with no entries: killed after renaming its first shard or array, before journaling it.
            same_job = True
            resume = Resume(entries)
            # Drop a line cut by the kill before appending to the journal again.
            header = json.dumps({"fingerprint": fingerprint, "format_version": FORMAT_VERSION})
            write_atomic(journal, "".join(json.dumps(e) + "\n" for e in [json.loads(header), *entries]))
            missing = [s for s in resume.shards if not (output / s).exists()]
            if missing:
                logger.warning("cannot resume: %s is gone; starting again", missing[0])
                resume = Resume()
            # Shards and arrays the journal vouches for stay.
            existing = [p for p in existing if p.relative_to(output).as_posix() not in resume.shards]
        elif existing:
            raise FileExistsError(
                f"{output} holds an interrupted job with other inputs, options or provenance ({JOURNAL_NAME}); pass --overwrite "
                "or choose an empty folder"
            )
    if existing and not overwrite and not same_job:
        raise FileExistsError(
            f"{output} already holds a shard set of other inputs, options or provenance ({existing[0].name}, ...); pass "
            "--overwrite or choose an empty folder"
        )
    # Leftovers of an interrupted run (*.tmp, shards renamed after the journal's last line) and, with overwrite,
    # the previous set.
    for p in [*existing, *output.glob("*.tmp")]:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    if not resume.entries:
        journal.unlink(missing_ok=True)
    return resume


class Journal:
    """Append-only record of finished volumes, flushed only when what it lists is complete on disk.

    Entries of volumes in the open shard wait in memory; when the shard is renamed they are written and
    fsynced. A killed job therefore leaves a journal whose entries are a prefix of the input order, all backed
    by complete shards: a re-run skips that prefix and continues with a new shard, exactly where an
    uninterrupted run would have started it.
    """

    def __init__(self, path: Path, fingerprint: str, resumed: bool) -> None:
        self._f = path.open("a" if resumed else "w", encoding="utf-8")
        if not resumed:
            self._f.write(json.dumps({"fingerprint": fingerprint, "format_version": FORMAT_VERSION}) + "\n")
            self._sync()
        self.pending: list[dict[str, Any]] = []

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def commit(self) -> None:
        self._f.write("".join(json.dumps(e) + "\n" for e in self.pending))
        with stage("fsync"):
            self._sync()
        self.pending = []

    def close(self) -> None:
        self._f.close()


@dataclass
class Summary:
    """What a sharding job did (also written to ``summary.json``)."""

    output: str
    inputs: int = 0
    """Volumes tried: volume files, DICOM series and DICOM files rejected from their header."""
    files: int = 0
    """Files found under the inputs (each is in the manifest, in rejects.jsonl, or ignored)."""
    ignored: int = 0
    """Files that are no image format at all (listed in rejects.jsonl with ``"ignored": true``)."""
    accepted: int = 0
    rejected: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    per_modality: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)
    """Accepted volumes per data source (``unknown``: no ``--source`` and no ``SOURCE.json``)."""
    per_license: dict[str, int] = field(default_factory=dict)
    """Accepted volumes per licence id (``unknown``: no ``--license`` and no ``SOURCE.json``)."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """One entry per (data source, licence) pair: ``data_source``, ``license``, ``volumes``, ``per_modality``
    (:func:`pcrl.shards.provenance_totals`)."""
    shards: int = 0
    total_bytes: int = 0
    max_reject_fraction: float = 0.5
    seconds: float = 0.0
    arguments: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    fingerprint: str = ""
    """sha256 of the input files (path, size, mtime) and of the options that change the output."""
    resumed: int = 0
    """Volumes taken over from an interrupted run instead of being prepared again."""
    up_to_date: bool = False
    """True when this call found the complete result of the same job and wrote nothing."""
    qa_sheet: str = ""
    """The QA picture beside the manifest (``qa.png``), or ``""`` when nothing was accepted."""
    qa_keys: list[str] = field(default_factory=list)
    """The volumes it shows, top to bottom."""
    timings: dict[str, Any] = field(default_factory=dict)
    """Where this run's time went (:mod:`data_prep.timing`): ``job`` (seconds of each fixed cost), ``volumes``
    (seconds per stage summed over the ``prepared`` volumes, where they were prepared), ``parent`` (seconds
    per stage of this process while the volumes went through), ``parent_cpu`` (CPU seconds of this process,
    all its threads, in that time), ``loop`` (wall seconds of that time), ``backend`` and ``workers``."""

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.inputs if self.inputs else 0.0

    @property
    def too_many_rejects(self) -> bool:
        return self.reject_fraction > self.max_reject_fraction

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reject_fraction": self.reject_fraction}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
