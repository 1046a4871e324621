"""File helpers that must behave the same everywhere: atomic writes and file digests.

Atomic writes: a file is either its old complete version or its new complete version, never half.

The one implementation of "write to a temporary name beside the target, fsync, rename, fsync the folder"
used by the config, checkpoints, tracking, figures and ``data_prep`` (which may import it: this module
depends on nothing but the standard library). A write that fails (a full disk, an I/O error) removes its
temporary file and leaves the previous version of the target untouched.

Example::

    write_atomic(run_dir / "checkpoints/latest", "step_00001000")
    with atomic_path(run_dir / "images/recon.png") as tmp:
        figure.savefig(tmp, format="png")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "file_sha256", "fsync_dir", "read_jsonl", "write_atomic"]


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file, and how many lines after the valid part were left out.

    Reading stops at the first line that is not a JSON object: a line cut short by a kill ends the valid
    part of an append-only log. A missing file has no records.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    return records, len(lines) - len(records)


def file_sha256(path: str | os.PathLike[str], fsync: bool = False) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB chunks.

    With ``fsync``, the file is also flushed to disk before returning, so a manifest that records the digest
    never promises bytes still in the page cache (a writer such as ``torch.save`` does not fsync).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, it replaces ``path``.

    The temporary name (``.<name>.<pid>.tmp``) ends in ``.tmp``, so cleaners of leftover ``*.tmp`` files
    find it, and holds the pid, so two processes writing the same target never share one.

    Args:
        path: the target file.
        durable: fsync the file and its folder, so that the new version survives a power loss.

    Raises:
        OSError: the write or the rename failed (``ENOSPC`` included); ``path`` is as it was.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically; see :func:`atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        f.write(payload)
