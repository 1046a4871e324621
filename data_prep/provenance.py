"""Where each input volume comes from and under which licence: ``--source`` / ``--license`` and ``SOURCE.json``.

A ``SOURCE.json`` file declares the provenance of the volumes in its folder and below it::

    {"source": "LIDC-IDRI", "license": "CC-BY-3.0"}

Both keys are optional, no other key is allowed. A volume takes the *nearest* ``SOURCE.json``: the one in its own
folder, else in the folder above, and so on up to the input folder it was found under (for a file given
directly as ``--input``, only the one beside it). The nearest file decides alone: a key it lacks is
``unknown``, not inherited from a file further up (a sub-folder usually holds another data set).

Each field is resolved on its own: ``--source`` > the nearest ``SOURCE.json``'s ``source`` > ``unknown``, and
the same for ``--license``. A volume of undeclared provenance is sharded as ``unknown``, never dropped.

The declarations found are part of the job's fingerprint (:func:`data_prep.shard.fingerprint`): editing a
``SOURCE.json`` or changing a flag makes another job, which an existing shard set refuses without
``--overwrite``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pcrl.shards import MAX_JSON_BYTES, UNKNOWN, load_json, provenance_text

if TYPE_CHECKING:
    from data_prep.discover import InputFile, Item
    from data_prep.options import ShardOptions

__all__ = [
    "SOURCE_FILE",
    "SOURCE_KEYS",
    "Provenance",
    "find_source_files",
    "item_provenance",
    "read_source_file",
]

SOURCE_FILE = "SOURCE.json"
SOURCE_KEYS = ("source", "license")
"""The keys a ``SOURCE.json`` may hold: the data set's name and its licence id."""


@dataclass(frozen=True)
class Provenance:
    """The provenance recorded for one volume (``data_source`` and ``license`` of its manifest line)."""

    data_source: str = UNKNOWN
    license: str = UNKNOWN


def read_source_file(path: Path) -> dict[str, str]:
    """The declarations of one ``SOURCE.json``.

    Raises:
        ValueError: not a JSON object, an unknown key, or a value that is not a short printable string; the
            message names the file and the key.
    """
    with open(path, "rb") as f:
        text = f.read(MAX_JSON_BYTES + 1)
    try:
        data = load_json(text, str(path))
    except ValueError as e:
        raise ValueError(f'{e}; write it as {{"source": "NAME", "license": "ID"}}') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object such as {{"source": "NAME", "license": "ID"}}')
    unknown = sorted(set(data) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown key {unknown[0]!r}; a {SOURCE_FILE} holds only {' and '.join(SOURCE_KEYS)}"
        )
    return {k: provenance_text(v, f"{path}: key {k!r}") for k, v in sorted(data.items())}


def find_source_files(files: Sequence[InputFile]) -> dict[Path, dict[str, str]]:
    """The ``SOURCE.json`` files that apply to ``files``: in each file's folder or a folder above it, up to the
    input root it was found under.

    Returns:
        Folder → its declarations (:func:`read_source_file`), sorted by folder.

    Raises:
        ValueError: a malformed ``SOURCE.json`` (before any volume is read).
    """
    found: dict[Path, dict[str, str]] = {}
    seen: set[tuple[Path, Path]] = set()
    for f in files:
        for folder in _folders(f.path.parent, f.root):
            if (folder, f.root) in seen:
                break  # this folder and the ones above it were looked at for an earlier file
            seen.add((folder, f.root))
            if (folder / SOURCE_FILE).is_file():
                found[folder] = read_source_file(folder / SOURCE_FILE)
    return dict(sorted(found.items()))


def item_provenance(
    item: Item, declared: Mapping[Path, Mapping[str, str]], options: ShardOptions
) -> Provenance:
    """The provenance of one input volume: the flags, else the nearest ``SOURCE.json``, else ``unknown``.

    Args:
        item: a volume file or DICOM series.
        declared: :func:`find_source_files` of the job's files.
        options: the job's options (``data_source``, ``license``).
    """
    from data_prep.discover import InputSeries

    # A series' files share a folder (else their nearest common one); a file's is its parent.
    start = item.path if isinstance(item, InputSeries) and len(item.paths) > 1 else item.path.parent
    nearest: Mapping[str, str] = next(
        (declared[folder] for folder in _folders(start, item.root) if folder in declared), {}
    )
    return Provenance(
        data_source=options.data_source or nearest.get("source", UNKNOWN),
        license=options.license or nearest.get("license", UNKNOWN),
    )


def _folders(start: Path, root: Path) -> list[Path]:
    """``start`` and its parents up to ``root`` (inclusive), nearest first; just ``start`` outside ``root``."""
    if not start.is_relative_to(root):
        return [start]
    chain = [start]
    while chain[-1] != root:
        chain.append(chain[-1].parent)
    return chain
