"""Finding the volumes under the inputs of a sharding job: volume files, and DICOM files grouped into series.

Every file under the inputs ends in exactly one place: a volume to prepare (:class:`InputFile`,
:class:`InputSeries`), a DICOM file rejected from its header alone, or a file that is no image at all
(:class:`Discovery`). DICOM headers can be read by the workers of a :class:`data_prep.pool.Pool`, in
batches.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.dicom import DicomHeader, group_series, is_dicom, read_header, series_tag
from data_prep.pool import Pool
from data_prep.provenance import SOURCE_FILE
from data_prep.readers import DEFAULT_MAX_VOXELS, RejectedInput, volume_suffix

__all__ = [
    "HEADER_BATCH",
    "Discovery",
    "InputFile",
    "InputSeries",
    "Item",
    "Rejected",
    "find_inputs",
    "list_files",
    "read_headers",
]


@dataclass
class Rejected:
    """An input that ends in ``rejects.jsonl``: its position in the input order (-1 when it was rejected or
    ignored before preparation), its source name, its path and the reason."""

    index: int
    source: str
    path: str
    reason: str


@dataclass(frozen=True)
class InputFile:
    """One input volume and the root it was found under (``source`` is relative to that root)."""

    path: Path
    root: Path

    @property
    def source(self) -> str:
        return self.path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class InputSeries:
    """One DICOM volume: the files of a series (or of one part of a split series), or one multi-frame or
    mosaic file."""

    paths: tuple[Path, ...]
    root: Path
    series_uid: str
    part: int
    """0 when the SeriesInstanceUID is one volume, else 1, 2, ... (see :func:`data_prep.dicom.group_series`)."""
    dicom_patient: str | None = None
    """``PatientID`` from the headers (hashed before it is stored)."""

    @property
    def path(self) -> Path:
        """The single file, or the folder holding the series' files (for messages)."""
        if len(self.paths) == 1:
            return self.paths[0]
        return Path(os.path.commonpath([str(p.parent) for p in self.paths]))

    @property
    def source(self) -> str:
        """The file relative to the root, or ``<folder>/series-<uid hash>[-partN]`` (no raw UID)."""
        if len(self.paths) == 1 and self.part == 0:
            return self.paths[0].relative_to(self.root).as_posix()
        folder = self.path.relative_to(self.root).as_posix()
        name = f"series-{series_tag(self.series_uid)}" + (f"-part{self.part}" if self.part else "")
        return name if folder == "." else f"{folder}/{name}"


Item = InputFile | InputSeries


@dataclass
class Discovery:
    """What :func:`find_inputs` found: volumes to prepare, DICOM files rejected from their headers alone,
    and files that are no image at all (every file under the inputs is in one of the three)."""

    items: list[Item]
    rejects: list[Rejected]
    ignored: list[Rejected]

    @property
    def files(self) -> int:
        return (
            sum(len(i.paths) if isinstance(i, InputSeries) else 1 for i in self.items)
            + len(self.rejects)
            + len(self.ignored)
        )


def list_files(inputs: Sequence[Path], exclude: Sequence[str] = ()) -> list[InputFile]:
    """Every file given directly or found recursively under a folder, minus ``exclude``, sorted by path.

    ``SOURCE.json`` files are no inputs: they declare the provenance of the volumes beside and below them
    (:mod:`data_prep.provenance`).

    Raises:
        FileNotFoundError: an input does not exist.
    """
    found: dict[Path, InputFile] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            root = path.absolute()
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    found.setdefault(p, InputFile(p, root))
        elif path.is_file():
            p = path.absolute()
            found.setdefault(p, InputFile(p, p.parent))  # explicit files are taken whatever their suffix
        else:
            raise FileNotFoundError(f"input {raw} does not exist")

    def excluded(item: InputFile) -> bool:
        return any(fnmatch.fnmatch(item.path.name, g) or fnmatch.fnmatch(item.source, g) for g in exclude)

    return sorted(
        (i for i in found.values() if i.path.name != SOURCE_FILE and not excluded(i)),
        key=lambda i: str(i.path),
    )


def find_inputs(
    inputs: Sequence[Path],
    exclude: Sequence[str] = (),
    split_gaps: bool = False,
    pool: Pool | None = None,
    files: Sequence[InputFile] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Discovery:
    """Files given directly and files found recursively under folders, minus ``exclude``, as volumes.

    NIfTI/NRRD/MetaImage files are one volume each. DICOM files (``.dcm``/``.ima`` or the ``DICM`` magic)
    have their headers read and are grouped into series (:func:`data_prep.dicom.group_series`, per input
    root); a file whose header says it is no image (RTSTRUCT, SR, no pixel data) or that cannot be parsed is
    rejected here. Other files under a folder are listed as ignored. With a parallel ``pool`` the headers
    are read by its workers, in batches. ``files``: the :func:`list_files` of the same arguments, when the
    caller has it already. ``max_voxels``: ``--max-voxels``, which bounds what a deflated DICOM file may
    inflate to (:func:`data_prep.dicom.deflated_limit`).

    Raises:
        FileNotFoundError: an input does not exist, or no volume or DICOM file is found at all.
    """
    files = list_files(inputs, exclude) if files is None else files
    ignored: list[Rejected] = []
    explicit = {Path(r).expanduser().absolute() for r in inputs if Path(r).expanduser().is_file()}
    items: list[Item] = []
    headers: dict[Path, list[DicomHeader]] = {}
    rejects: list[Rejected] = []
    dicom: list[InputFile] = []
    for f in files:
        if volume_suffix(f.path) is not None:
            items.append(f)
        elif is_dicom(f.path):
            dicom.append(f)
        elif f.path in explicit:
            items.append(f)  # rejected by the reader with "unsupported file type"
        else:
            ignored.append(
                Rejected(-1, f.source, str(f.path), "ignored: not a NIfTI, NRRD, MetaImage or DICOM file")
            )
    for f, header in zip(dicom, read_headers([f.path for f in dicom], pool, max_voxels), strict=True):
        if isinstance(header, str):
            rejects.append(Rejected(-1, f.source, str(f.path), header))
        else:
            headers.setdefault(f.root, []).append(header)
    for root, hs in headers.items():
        for s in group_series(hs, split_gaps=split_gaps):
            items.append(InputSeries(s.paths, root, s.series_uid, s.part, s.patient_id))
    items.sort(
        key=lambda i: (str(i.paths[0] if isinstance(i, InputSeries) else i.path), getattr(i, "part", 0))
    )
    if not items and not rejects:
        raise FileNotFoundError(
            f"no volume files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, DICOM) found in {[str(p) for p in inputs]}"
            + (f" after --exclude {list(exclude)}" if exclude else "")
        )
    return Discovery(items, rejects, ignored)


# Files per header-reading task: enough to amortise a task's overhead, few enough to spread 10^3 files.
HEADER_BATCH = 64


def _header_batch(paths: Sequence[Path], max_voxels: int = DEFAULT_MAX_VOXELS) -> list[DicomHeader | str]:
    """Headers of ``paths`` (runs in workers); a file that is rejected, or whose header cannot be read for
    any reason, gives its reason instead."""
    out: list[DicomHeader | str] = []
    for path in paths:
        try:
            out.append(read_header(path, max_voxels))
        except RejectedInput as e:
            out.append(str(e))
        except Exception as e:  # one hostile file must cost only itself, never the job (or the batch)
            out.append(f"unreadable DICOM header: {type(e).__name__}: {str(e).strip()[:200]}")
    return out


def read_headers(
    paths: Sequence[Path], pool: Pool | None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> list[DicomHeader | str]:
    """The DICOM header of every path, in order, or the reason the file is rejected from its header alone.

    The pool's workers read them, :data:`HEADER_BATCH` files per task, when the pool has workers and there
    is more than one batch; else this process does.
    """
    if pool is None or not pool.parallel or len(paths) <= HEADER_BATCH:
        return _header_batch(paths, max_voxels)
    batches = [(paths[i : i + HEADER_BATCH], max_voxels) for i in range(0, len(paths), HEADER_BATCH)]
    return [h for batch in pool.map(_header_batch, batches) for h in batch]
