"""DICOM → :class:`~data_prep.readers.RawVolume`: series of single-frame files, Enhanced multi-frame files
and Siemens mosaics.

Geometry comes from the headers, never from file names, ``InstanceNumber`` or ``SliceThickness``: slices
are ordered by the projection of ``ImagePositionPatient`` on the slice normal (the cross product of the two
``ImageOrientationPatient`` directions), the slice step is the vector between the first and last position
divided by the number of gaps (so a gantry tilt stays a sheared affine, not a wrong one), and
``RescaleSlope``/``RescaleIntercept`` are applied per slice. DICOM's patient frame is LPS; the result is
canonical RAS+ like every other reader.

Discovery is split from reading: :func:`read_header` reads only what grouping needs (pixel data deferred),
:func:`group_series` turns headers into series (one ``SeriesInstanceUID``, split where orientation or image
size differs, and at gaps when asked), and :func:`load_dicom` reads one series' files with their pixels.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.readers import DEFAULT_MAX_VOXELS, RawVolume, RejectedInput, check_voxels, finalize

__all__ = [
    "DICOM_SUFFIXES",
    "DicomHeader",
    "DicomSeries",
    "deflated_limit",
    "group_series",
    "is_dicom",
    "load_dicom",
    "read_header",
    "series_tag",
]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Objects that carry no image to pretrain on, even when some of them have pixel data (RTDOSE, SEG).
NON_IMAGE_MODALITIES = {
    "RTSTRUCT": "an RT structure set (contours)",
    "RTPLAN": "an RT plan",
    "RTDOSE": "an RT dose grid",
    "RTRECORD": "an RT treatment record",
    "SR": "a structured report",
    "SEG": "a segmentation",
    "REG": "a registration",
    "KO": "a key object selection",
    "PR": "a presentation state",
    "DOC": "an encapsulated document",
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Two slices closer than this along the normal are at the same position (mm).
_SAME_POSITION_MM = 1e-3


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom``/``.ima`` file, or any file with the ``DICM`` magic at byte 128."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _int(ds: Any, keyword: str, default: int, name: str) -> int:
    """An integer element (``Rows``, ``NumberOfFrames``, ...), or a reject naming it and the file when it
    holds anything else (text, a negative count)."""
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        out = int(value)
    except (TypeError, ValueError, OverflowError):
        raise RejectedInput(
            f"malformed DICOM header in {name}: {keyword} is {str(value)[:40]!r}, not an integer"
        ) from None
    if out < 0:
        raise RejectedInput(f"malformed DICOM header in {name}: {keyword} is {out}, not a count")
    return out or default


def _float(value: Any, default: float, keyword: str, name: str) -> float:
    """A decimal element (``RescaleSlope``, ...), or a reject naming it and the file when it is no finite
    number."""
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        out = math.nan
    if not math.isfinite(out):
        raise RejectedInput(
            f"malformed DICOM header in {name}: {keyword} is {str(value)[:40]!r}, not a finite number"
        )
    return out


@dataclass(frozen=True)
class DicomHeader:
    """What grouping needs from one file (read without its pixel data)."""

    path: Path
    series_uid: str
    patient_id: str | None
    modality: str
    rows: int
    cols: int
    frames: int
    mosaic: bool
    orientation: tuple[float, ...] | None
    """``ImageOrientationPatient`` (row direction, column direction), 6 values, or ``None``."""
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None


# Deflated Explicit VR Little Endian: pydicom inflates the whole data set into memory before reading it.
_DEFLATED = "1.2.840.10008.1.2.1.99"


def deflated_limit(max_voxels: int) -> int:
    """The most bytes a deflated DICOM file may inflate to: 2 bytes per voxel of ``--max-voxels`` (16-bit
    pixels) plus 64 MiB for the other elements."""
    return 2 * max_voxels + 64 * 2**20


def _check_deflated(path: Path, max_voxels: int) -> None:
    """For a file in the Deflated transfer syntax, inflate its data set once, in 16 MiB pieces that are
    dropped, and reject it when it passes :func:`deflated_limit` (pydicom would inflate all of it at once)."""
    from pydicom.filereader import read_file_meta_info

    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:
        return  # no readable file meta: pydicom cannot know the data set is deflated either
    if syntax != _DEFLATED:
        return
    limit = deflated_limit(max_voxels)
    with path.open("rb") as f:
        head = f.read(132)
        start = 132 if head[128:132] == b"DICM" else 0
        f.seek(start)
        element = f.read(12)  # (0002,0000) UL: the length of the rest of the file meta
        if element[:6] != b"\x02\x00\x00\x00UL":
            raise RejectedInput("unreadable DICOM: a deflated file without a file meta group length")
        f.seek(start + 12 + struct.unpack("<I", element[8:12])[0])
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while not inflate.eof and (chunk := f.read(2**20)):
            while chunk:
                total += len(inflate.decompress(chunk, 16 * 2**20))
                if total > limit:
                    raise RejectedInput(
                        f"too large: the deflated data set inflates to more than {limit} bytes, the limit for "
                        f"--max-voxels {max_voxels} (not read; raise --max-voxels to accept it)"
                    )
                chunk = inflate.unconsumed_tail


def _dcmread(path: Path, pixels: bool, max_voxels: int = DEFAULT_MAX_VOXELS) -> Any:
    import pydicom

    _check_deflated(path, max_voxels)
    try:
        if pixels:
            return pydicom.dcmread(str(path), force=True)
        return pydicom.dcmread(str(path), force=True, defer_size="4 KB")
    except Exception as e:  # InvalidDicomError, and many other types on hostile bytes (struct.error, ...)
        raise RejectedInput(f"unreadable DICOM: {type(e).__name__}: {str(e).strip()[:200]}") from None


def read_header(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> DicomHeader:
    """Read the grouping facts of one DICOM file.

    Args:
        path: the file.
        max_voxels: ``--max-voxels``; a deflated file that would inflate past :func:`deflated_limit` is
            rejected before pydicom inflates it.

    Raises:
        RejectedInput: empty or unreadable file, malformed header elements, no pixel data, or a non-image
            object (RTSTRUCT, SR, ...).
    """
    if path.stat().st_size == 0:
        raise RejectedInput("unreadable: empty file")
    ds = _dcmread(path, pixels=False, max_voxels=max_voxels)
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds and "PixelData" not in ds:
        raise RejectedInput("unreadable DICOM: no DICOM header found (not a DICOM file, or truncated)")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        raise RejectedInput(f"not an image: {NON_IMAGE_MODALITIES[modality]} (Modality {modality})")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = str(ds.get("SOPClassUID", "unknown"))
        name = getattr(ds.get("SOPClassUID"), "name", sop)
        raise RejectedInput(f"not an image: no pixel data (SOP class {name})")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return DicomHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        patient_id=(str(ds.get("PatientID", "")).strip() or None),
        modality=modality,
        rows=_int(ds, "Rows", 0, path.name),
        cols=_int(ds, "Columns", 0, path.name),
        frames=_int(ds, "NumberOfFrames", 1, path.name),
        mosaic="MOSAIC" in image_type,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
    )


@dataclass(frozen=True)
class DicomSeries:
    """The files of one volume: a single-frame series (or part of one), or one multi-frame/mosaic file."""

    paths: tuple[Path, ...]
    series_uid: str
    part: int
    """0 when the UID is one volume, else 1, 2, ... for the parts it was split into."""
    patient_id: str | None
    split_reason: str = ""


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))


def _runs(headers: list[DicomHeader]) -> list[list[DicomHeader]]:
    """Split slices sorted along the normal into runs of even spacing (breaks at gaps and uneven steps)."""
    assert headers[0].orientation is not None
    normal = _normal(headers[0].orientation)
    ordered = sorted(headers, key=lambda h: float(np.dot(h.position, normal)))  # type: ignore[arg-type]
    pos = [float(np.dot(h.position, normal)) for h in ordered]  # type: ignore[arg-type]
    runs: list[list[DicomHeader]] = [[ordered[0]]]
    step: float | None = None
    for i in range(1, len(ordered)):
        d = pos[i] - pos[i - 1]
        if d < _SAME_POSITION_MM:
            return [headers]  # duplicated positions: not a gap; the reader rejects the series with the reason
        if step is None or abs(d - step) <= _tolerance(step):
            step = d if step is None else step
            runs[-1].append(ordered[i])
        else:
            runs.append([ordered[i]])
            step = None
    return runs


def _tolerance(step: float) -> float:
    """Positions are written as decimal strings with limited digits: allow 1 % of the step + 1 µm."""
    return 0.01 * abs(step) + 1e-3


def group_series(headers: Sequence[DicomHeader], split_gaps: bool = False) -> list[DicomSeries]:
    """Group single-frame files by ``SeriesInstanceUID``; split a UID where orientation, image size or
    pixel spacing differ (one part each), and, with ``split_gaps``, where slice spacing breaks (a missing
    slice or an uneven step). Multi-frame files and mosaics are one series each.

    Returns:
        Series sorted by their first file path (parts by the first path of each part).
    """
    by_uid: dict[str, list[DicomHeader]] = {}
    singles: list[DicomSeries] = []
    for h in headers:
        if h.frames > 1 or h.mosaic:
            singles.append(DicomSeries((h.path,), h.series_uid, 0, h.patient_id))
        else:
            # Files without a UID cannot be told apart from other series: each is its own "series".
            by_uid.setdefault(h.series_uid or f"no-uid:{h.path}", []).append(h)
    out = list(singles)
    for uid, members in by_uid.items():
        groups: dict[tuple[Any, ...], list[DicomHeader]] = {}
        for h in members:
            key = (
                None if h.orientation is None else tuple(round(v, 3) for v in h.orientation),
                h.rows,
                h.cols,
                None if h.pixel_spacing is None else tuple(round(v, 4) for v in h.pixel_spacing),
            )
            groups.setdefault(key, []).append(h)
        parts: list[tuple[list[DicomHeader], str]] = []
        reason = "orientation, image size or pixel spacing differ" if len(groups) > 1 else ""
        for group in groups.values():
            runs = [group]
            geometric = group[0].orientation is not None and all(g.position is not None for g in group)
            if split_gaps and geometric and len(group) > 1:
                runs = _runs(group)
            gap_reason = "slice spacing breaks (missing slice or uneven spacing)" if len(runs) > 1 else ""
            parts.extend((run, "; ".join(r for r in (reason, gap_reason) if r)) for run in runs)
        parts.sort(key=lambda p: min(str(h.path) for h in p[0]))
        patient = next((h.patient_id for h in members if h.patient_id), None)
        for i, (run, why) in enumerate(parts):
            paths = tuple(sorted((h.path for h in run), key=str))
            out.append(DicomSeries(paths, uid, i + 1 if len(parts) > 1 else 0, patient, why))
    return sorted(out, key=lambda s: (str(s.paths[0]), s.part))


def series_tag(uid: str) -> str:
    """A short, stable, non-identifying name for a series UID (8 hex digits of its sha256)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


# --- reading pixels -----------------------------------------------------------------------------------


@dataclass
class _Slice:
    name: str
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,)
    spacing: tuple[float, float]  # (between rows, between columns) mm
    pixels: np.ndarray  # (rows, cols), rescaled
    stored_dtype: np.dtype


def _rescale(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and float(intercept).is_integer() and pixels.dtype.kind in "iu":
        # Integer HU stay integers (int32 cannot overflow for 16-bit input and an integer intercept).
        return pixels.astype(np.int32) + int(intercept)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _pixels(ds: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:  # pydicom raises ValueError/AttributeError/RuntimeError/NotImplementedError...
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RejectedInput(f"unreadable pixel data in {name}: {text}") from None


def _slice_from_file(path: Path, files: int = 1, max_voxels: int = DEFAULT_MAX_VOXELS) -> _Slice:
    ds = _dcmread(path, pixels=True, max_voxels=max_voxels)
    # Before decoding: a compressed slice is decoded into the size its header declares.
    rows, cols = _int(ds, "Rows", 0, path.name), _int(ds, "Columns", 0, path.name)
    check_voxels((cols, rows, files), max_voxels, f"the headers of its series ({path.name}) declare")
    if _int(ds, "NumberOfFrames", 1, path.name) > 1:
        raise RejectedInput(f"{path.name} is a multi-frame file inside a series of single-frame files")
    ori = _floats(ds.get("ImageOrientationPatient"), 6)
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if ori is None or pos is None or spacing is None:
        raise RejectedInput(
            f"no geometry: {path.name} lacks ImageOrientationPatient, ImagePositionPatient or PixelSpacing"
        )
    pixels = _pixels(ds, path.name)
    if pixels.ndim != 2:
        raise RejectedInput(f"not a scalar image: {path.name} has pixel array shape {list(pixels.shape)}")
    slope = _float(ds.get("RescaleSlope"), 1.0, "RescaleSlope", path.name) or 1.0
    intercept = _float(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept", path.name)
    return _Slice(
        path.name, np.asarray(pos), np.asarray(ori), spacing,  # type: ignore[arg-type]
        _rescale(pixels, slope, intercept), pixels.dtype,
    )  # fmt: skip


def _first(ds: Any, frame: Any, sequence: str, attr: str) -> Any:
    """A functional-group attribute from the per-frame item, else the shared one, else the top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for holder in (frame, shared[0] if shared else None):
        items = holder.get(sequence) if holder is not None else None
        if items and attr in items[0]:
            return items[0].get(attr)
    return ds.get(attr)


def _slices_from_multiframe(ds: Any, name: str) -> list[_Slice]:
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    n = _int(ds, "NumberOfFrames", 1, name)
    if not frames or len(frames) != n:
        raise RejectedInput(
            f"no geometry: multi-frame {name} has {n} frames but no per-frame functional groups with positions"
        )
    pixels = _pixels(ds, name)
    if pixels.ndim != 3 or pixels.shape[0] != n:
        raise RejectedInput(f"not a scalar image: {name} has pixel array shape {list(pixels.shape)}")
    out = []
    for i, frame in enumerate(frames):
        ori = _floats(_first(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        pos = _floats(_first(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
        spacing = _floats(_first(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ori is None or pos is None or spacing is None:
            raise RejectedInput(
                f"no geometry: frame {i + 1} of {name} lacks orientation, position or spacing"
            )
        slope = _first(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _first(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(
            _Slice(
                f"{name}[frame {i + 1}]", np.asarray(pos), np.asarray(ori), spacing,  # type: ignore[arg-type]
                _rescale(pixels[i], _float(slope, 1.0, "RescaleSlope", name),
                         _float(intercept, 0.0, "RescaleIntercept", name)),
                pixels.dtype,
            )
        )  # fmt: skip
    return out


def _assemble(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Order slices along the normal, check the spacing, stack. Returns (array (cols, rows, slices), LPS
    affine, stored dtype)."""
    if len(slices) < 2:
        raise RejectedInput(f"not a 3D volume: a single 2D slice ({slices[0].name})")
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
            raise RejectedInput(
                f"mixed orientations in one series: {ref.name} {np.round(ref.orientation, 4).tolist()} vs "
                f"{s.name} {np.round(s.orientation, 4).tolist()}"
            )
        if s.pixels.shape != ref.pixels.shape or not np.allclose(s.spacing, ref.spacing, atol=1e-4):
            raise RejectedInput(
                f"mixed image sizes in one series: {ref.name} {list(ref.pixels.shape)} at {list(ref.spacing)} mm "
                f"vs {s.name} {list(s.pixels.shape)} at {list(s.spacing)} mm"
            )
    normal = _normal(ref.orientation)
    pos = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    steps = np.diff(pos)
    same = np.flatnonzero(steps < _SAME_POSITION_MM)
    if same.size:
        i = int(same[0])
        counts = np.unique(np.round(pos / max(_SAME_POSITION_MM, 1e-6)), return_counts=True)[1]
        if counts.min() == counts.max() > 1:
            raise RejectedInput(
                f"not a 3D volume: {int(counts[0])} images at each of {len(counts)} slice positions (a 4D or "
                "multi-echo series); split it into one series per volume before sharding"
            )
        raise RejectedInput(
            f"duplicated slice positions: {slices[i].name} and {slices[i + 1].name} both at {pos[i]:.3f} mm "
            "along the slice normal"
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > _tolerance(step))
    if bad.size:
        i = int(bad[0])
        if steps[i] > 1.5 * step and np.isclose(steps[i] / step, round(steps[i] / step), rtol=0.02):
            missing = round(steps[i] / step) - 1
            what = f"missing slice: {missing} slice(s) missing" if missing > 1 else "missing slice"
        else:
            what = f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm"
        raise RejectedInput(
            f"{what} between {slices[i].name} and {slices[i + 1].name} ({pos[i]:.3f} → {pos[i + 1]:.3f} mm "
            f"where the spacing is {step:.3f} mm); --series-gaps split keeps the even runs as separate volumes"
        )
    row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ref.spacing[1]  # array axis 0 = column index, steps along the row direction
    lps[:3, 1] = col_dir * ref.spacing[0]  # array axis 1 = row index
    lps[:3, 2] = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    lps[:3, 3] = slices[0].position
    # int32 after an integer rescale: narrow to int16 when the values fit (CT HU always do).
    array = np.stack([s.pixels for s in slices], axis=-1).transpose(1, 0, 2)  # (cols, rows, slices)
    if array.dtype == np.int32 and array.size and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return array, lps, slices[0].stored_dtype


def _mosaic(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    import warnings

    from nibabel.nicom import dicomwrappers

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # "the DICOM readers are highly experimental" (mosaics are their core)
        try:
            wrapper = dicomwrappers.wrapper_from_data(ds)
            if not isinstance(wrapper, dicomwrappers.MosaicWrapper):
                raise RejectedInput(f"{name} says MOSAIC but has no Siemens mosaic header")
            array = np.asarray(wrapper.get_data())  # rescale applied; axes (rows, cols, slices)
            affine = np.asarray(wrapper.affine, dtype=np.float64)  # voxel → LPS
        except RejectedInput:
            raise
        except Exception as e:
            raise RejectedInput(f"unreadable Siemens mosaic {name}: {type(e).__name__}: {e}") from None
    return array, affine


def load_dicom(paths: Sequence[Path], max_voxels: int = DEFAULT_MAX_VOXELS) -> RawVolume:
    """Read one series (several single-frame files) or one multi-frame / mosaic file into a canonical volume.

    Args:
        paths: the files of one :class:`DicomSeries`.
        max_voxels: the most voxels of the volume (``--max-voxels``), checked against ``Rows`` ×
            ``Columns`` × the number of files or frames before any pixel data is decoded.

    Raises:
        RejectedInput: unreadable or truncated files, malformed headers, too many voxels, no geometry, a
            single 2D slice, duplicated positions, a missing slice or uneven spacing, mixed orientations or
            sizes, 4D content, non-finite values.
    """
    paths = list(paths)
    first = _dcmread(paths[0], pixels=True, max_voxels=max_voxels)
    name = paths[0].name
    rows, cols = _int(first, "Rows", 0, name), _int(first, "Columns", 0, name)
    depth = len(paths) if len(paths) > 1 else _int(first, "NumberOfFrames", 1, name)
    check_voxels((cols, rows, depth), max_voxels, f"the headers ({name}) declare")
    modality = str(first.get("Modality", "") or "").upper()
    header: dict[str, Any] = {"reader": "pydicom", "dicom_modality": modality, "files": len(paths)}
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if len(paths) == 1 and "MOSAIC" in image_type:
        array, lps = _mosaic(first, paths[0].name)
        stored_dtype = array.dtype
        header["dicom_layout"] = "mosaic"
    else:
        if len(paths) == 1 and _int(first, "NumberOfFrames", 1, name) > 1:
            slices = _slices_from_multiframe(first, paths[0].name)
            header["dicom_layout"] = "multi-frame"
        else:
            del first  # read again below with the others; keeps at most one copy of each slice
            slices = [_slice_from_file(p, len(paths), max_voxels) for p in paths]
            header["dicom_layout"] = "series"
        array, lps, stored_dtype = _assemble(slices)
        del slices
    hint = {"CT": "ct", "MR": "mr"}.get(modality)
    return finalize(array, _LPS_TO_RAS @ lps, stored_dtype, modality_hint=hint, header=header)
