"""What a pretraining run trained on: ``data_provenance.json`` in the run folder.

The engine writes it (rank 0, atomically) when a run starts, from the manifest records of ``data.split`` that
the loader streams: the data sources and licences of the volumes (``data_source`` / ``license`` of each
manifest line, see ``python -m data_prep.shard --source/--license``), volume counts per modality, the voxel
spacings, the CT window the loader applies, and the shard sets by name and job fingerprint. The export copies
it into ``encoder.json`` (``provenance``) and ``MODEL_CARD.md`` (:mod:`pcrl.model_card`).

A run folder from before provenance was recorded has no such file: :func:`read_data_provenance` then returns
the same layout with ``"status": "unknown"``, so an old run still exports and says so.

Example::

    write_data_provenance(run_dir, read_manifest(cfg.data.shards, cfg.data.split), cfg)
    read_data_provenance(run_dir, cfg)["per_license"]  # {"CC-BY-4.0": 120, "unknown": 3}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcrl.io import write_atomic
from pcrl.shards import CT_HU_RANGE, SUMMARY_NAME, UNKNOWN, SampleRecord, provenance_totals

if TYPE_CHECKING:
    from pcrl.config import PretrainConfig

__all__ = [
    "DATA_PROVENANCE",
    "PROVENANCE_FORMAT",
    "data_provenance",
    "read_data_provenance",
    "unknown_provenance",
    "write_data_provenance",
]

DATA_PROVENANCE = "data_provenance.json"
PROVENANCE_FORMAT = "pcrl-data-provenance/1"


def _intensity(cfg: PretrainConfig) -> dict[str, Any]:
    return {"ct_window_hu": [float(v) for v in cfg.data.ct_window], "ct_stored_hu": list(CT_HU_RANGE)}


def _fingerprint(folder: Path) -> str | None:
    """The job fingerprint in a shard folder's ``summary.json`` (None when it cannot be read)."""
    try:
        summary = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = summary.get("fingerprint") if isinstance(summary, dict) else None
    return value if isinstance(value, str) and value else None


def data_provenance(records: Sequence[SampleRecord], cfg: PretrainConfig) -> dict[str, Any]:
    """The provenance of the volumes a run trains on.

    Args:
        records: the manifest records the loader streams (:func:`pcrl.shards.read_manifest` of
            ``data.shards`` and ``data.split``).
        cfg: the run's configuration (``data.split``, ``data.ct_window``).

    Returns:
        ``format``, ``status`` (``recorded``), ``split``, ``volumes``, ``per_modality``, ``per_source``,
        ``per_license``, ``sources`` (one entry per source and licence: ``data_source``, ``license``,
        ``volumes``, ``per_modality``), ``spacing_mm`` (the distinct voxel spacings, (x, y, z) mm),
        ``intensity`` (``ct_window_hu``, the loader's window; ``ct_stored_hu``, the shards' clip range) and
        ``shard_sets`` (folder name, volumes, ``data_prep`` job fingerprint). Folder names only: no path
        of the training machine leaves the run folder through an export.
    """
    per_modality: dict[str, int] = {}
    sets: dict[Path, int] = {}
    for r in records:
        per_modality[r.modality] = per_modality.get(r.modality, 0) + 1
        folder = r.root if r.root is not None else r.shard.parent
        sets[folder] = sets.get(folder, 0) + 1
    return {
        "format": PROVENANCE_FORMAT,
        "status": "recorded",
        "split": cfg.data.split,
        "volumes": len(records),
        "per_modality": dict(sorted(per_modality.items())),
        **provenance_totals((r.data_source, r.license, r.modality) for r in records),
        "spacing_mm": [list(s) for s in sorted({tuple(r.spacing) for r in records})],
        "intensity": _intensity(cfg),
        "shard_sets": [
            {"name": folder.name, "volumes": n, "fingerprint": _fingerprint(folder)}
            for folder, n in sorted(sets.items())
        ],
    }


def unknown_provenance(cfg: PretrainConfig | None, note: str) -> dict[str, Any]:
    """The layout of :func:`data_provenance` for a run that recorded none: ``status`` ``unknown``, empty
    counts, ``note`` saying why; the CT window from ``cfg`` when there is one."""
    return {
        "format": PROVENANCE_FORMAT,
        "status": UNKNOWN,
        "note": note,
        "split": cfg.data.split if cfg is not None else None,
        "volumes": None,
        "per_modality": {},
        "per_source": {},
        "per_license": {},
        "sources": [],
        "spacing_mm": [],
        "intensity": _intensity(cfg) if cfg is not None else {},
        "shard_sets": [],
    }


def write_data_provenance(
    run_dir: str | os.PathLike[str], records: Sequence[SampleRecord], cfg: PretrainConfig
) -> Path:
    """Write ``run_dir/data_provenance.json`` atomically (see :func:`data_provenance`). Returns its path."""
    path = Path(run_dir) / DATA_PROVENANCE
    write_atomic(path, json.dumps(data_provenance(records, cfg), indent=2) + "\n")
    return path


def read_data_provenance(
    run_dir: str | os.PathLike[str], cfg: PretrainConfig | None = None
) -> dict[str, Any]:
    """The ``data_provenance.json`` of a run folder, or :func:`unknown_provenance` when it has none.

    Raises:
        ValueError: the file exists but is not a provenance record (names the file and what to do).
    """
    path = Path(run_dir) / DATA_PROVENANCE
    if not path.is_file():
        return unknown_provenance(
            cfg, f"The run folder has no {DATA_PROVENANCE} (a run from before data provenance was recorded)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); relaunch the run (it rewrites the file from its shards) or remove "
            "the file to export with provenance 'unknown'"
        ) from None
    if not isinstance(data, dict) or data.get("format") != PROVENANCE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path}: format {found!r}, expected {PROVENANCE_FORMAT!r}; relaunch the run to rewrite it, or "
            "remove it to export with provenance 'unknown'"
        )
    return data
