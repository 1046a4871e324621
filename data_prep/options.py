"""The options of a sharding job (:class:`ShardOptions`, the CLI flags of the same names) and the parsing of
``--split``.

They live apart from :mod:`data_prep.shard` (the job) because the worker side, :mod:`data_prep.prepare`,
reads them too, and must not import the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from data_prep.readers import DEFAULT_MAX_VOXELS
from pcrl.shards import SPLITS, provenance_text

__all__ = ["DEFAULT_COMPRESSION_LEVEL", "ShardOptions", "parse_splits"]

DEFAULT_COMPRESSION_LEVEL = 1
"""Level 1 compresses about twice as fast as level 3 for 15 % more bytes (docs/benchmarks.md)."""


def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.9,val=0.1"`` → ``{"train": 0.9, "val": 0.1}`` (fractions must sum to 1)."""
    splits: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLITS:
            raise ValueError(
                f"--split: expected name=fraction with name in {', '.join(SPLITS)}, got {part!r}"
            )
        if name in splits:
            raise ValueError(f"--split: {name} given twice in {text!r}")
        try:
            splits[name] = float(value)
        except ValueError:
            raise ValueError(f"--split: {value!r} is not a number (in {text!r})") from None
        if not 0.0 <= splits[name] <= 1.0:
            raise ValueError(f"--split: fraction of {name} must be in [0, 1], got {splits[name]}")
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"--split: fractions must sum to 1, got {sum(splits.values())} from {text!r}")
    return splits


@dataclass(frozen=True)
class ShardOptions:
    """Options of :func:`data_prep.shard.shard_volumes` (the CLI flags of the same names)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Target voxel size (x, y, z) in mm."""
    modality: str = "auto"
    """``auto`` (integer voxels with min <= -500 → CT, else MR), ``ct`` or ``mr``."""
    shard_size_mb: float = 256.0
    """Target shard size; a shard closes before the sample that would push it past this."""
    splits: Mapping[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.1})
    """Split fractions, assigned by a salted hash of the patient id."""
    workers: int = 1
    """Processes preparing volumes (<= 1: in this process). The output does not depend on it."""
    ray: str | None = None
    """Prepare volumes (and read DICOM headers) as Ray tasks: ``local`` starts a private Ray instance with
    ``workers`` CPUs, anything else is the address of a running cluster (``auto``, ``host:6379``,
    ``ray://host:10001``). The output does not depend on it."""
    crop_body: bool = False
    """Crop each volume to the box around the body (CT: above -500 HU; MR: above 10 % of its robust range;
    largest connected part, plus a margin), dropping the air around the patient. Recorded as ``crop`` in
    the metadata."""
    max_reject_fraction: float = 0.5
    """The CLI exits 3 when more than this fraction of the inputs is rejected."""
    min_size: tuple[int, int, int] = (64, 64, 32)
    """Smallest accepted (x, y, z) shape after resampling."""
    max_voxels: int = DEFAULT_MAX_VOXELS
    """Most voxels of one volume, checked from its header before the voxels are read (or a ``.nii.gz``
    inflated) and again after resampling: bounds the memory of each worker (at least 6 bytes per voxel for
    int16 input: the array read and its float32 copy)."""
    exclude: tuple[str, ...] = ()
    """Glob patterns (matched against the file name and the path relative to its input root) to skip."""
    salt: str = "pcrl"
    """Salt of the patient-id hash (stored ids and split assignment)."""
    format: str = "webdataset"
    """``webdataset`` (tar shards) or ``zarr`` (a Zarr v3 store, one array per volume)."""
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    """zstd level of the WebDataset samples, and of the Blosc-zstd chunks of a Zarr store (1 to 9; any level
    reads the same way). Higher levels store less and prepare more slowly: docs/data.md#throughput."""
    series_gaps: str = "reject"
    """A DICOM series with a missing slice or uneven spacing: ``reject`` it, or ``split`` it into its evenly
    spaced runs (each its own volume)."""
    take_volume: int | None = None
    """For 4D NIfTI/NRRD/MetaImage inputs, keep this volume (0-based) of the 4th axis; ``None`` rejects them."""
    data_source: str | None = None
    """The data set every input comes from (``--source``), recorded as ``data_source`` on each manifest line;
    overrides the ``source`` of any ``SOURCE.json`` (:mod:`data_prep.provenance`). ``None``: from
    ``SOURCE.json``, else ``unknown``."""
    license: str | None = None
    """The licence id of every input (``--license``, e.g. ``CC-BY-4.0``), recorded as ``license`` on each
    manifest line; overrides the ``license`` of any ``SOURCE.json``. ``None``: from ``SOURCE.json``, else
    ``unknown``."""
    overwrite: bool = False
    """Replace an existing shard set in the output folder."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {list(self.spacing)}")
        if self.modality not in ("auto", "ct", "mr"):
            raise ValueError(f"modality must be auto, ct or mr, got {self.modality!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if (
            not self.splits
            or any(k not in SPLITS for k in self.splits)
            or abs(sum(self.splits.values()) - 1) > 1e-6
        ):
            raise ValueError(
                f"splits must map {', '.join(SPLITS)} to fractions summing to 1, got {dict(self.splits)}"
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        if not isinstance(self.max_voxels, int) or self.max_voxels < 1:
            raise ValueError(f"max_voxels must be a positive voxel count, got {self.max_voxels!r}")
        if len(self.min_size) != 3 or min(self.min_size) < 1:
            raise ValueError(f"min_size must be three positive voxel counts, got {list(self.min_size)}")
        if self.series_gaps not in ("reject", "split"):
            raise ValueError(f"series_gaps must be reject or split, got {self.series_gaps!r}")
        if self.take_volume is not None and self.take_volume < 0:
            raise ValueError(f"take_volume must be >= 0, got {self.take_volume}")
        if not isinstance(self.compression_level, int) or not 1 <= self.compression_level <= 9:
            raise ValueError(
                f"compression_level must be an integer from 1 to 9, got {self.compression_level!r}"
            )
        if self.format not in ("webdataset", "zarr"):
            raise ValueError(f"format must be webdataset or zarr, got {self.format!r}")
        if self.data_source is not None:
            provenance_text(self.data_source, "--source")
        if self.license is not None:
            provenance_text(self.license, "--license")
        if self.ray is not None and not self.ray.strip():
            raise ValueError("--ray needs an address: local, auto, host:port or ray://host:port")
