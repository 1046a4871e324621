"""Read one medical volume from disk into canonical RAS+ orientation.

Every reader returns a :class:`RawVolume`: the array with axes (x, y, z) exactly as nibabel's
``as_closest_canonical`` gives them, and the 4×4 voxel→world affine in RAS+ millimetres. NIfTI goes through
nibabel (its sform/qform rules are the reference of the array contract); NRRD and MetaImage go through
SimpleITK, whose world frame is LPS: its x and y world axes are negated to get RAS.

A file that cannot become a 3D scalar volume raises :class:`RejectedInput` with a one-line reason; the
sharder writes it to ``rejects.jsonl``. DICOM (series, multi-frame files, mosaics) is read by
:mod:`data_prep.dicom` into the same type, with a ``modality_hint`` from the Modality tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "RawVolume",
    "RejectedInput",
    "canonicalize",
    "finalize",
    "load_volume",
    "volume_suffix",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

# SimpleITK's physical space is LPS; RAS = diag(-1, -1, 1) · LPS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RejectedInput(Exception):
    """The input cannot be used; ``str(exc)`` is the reason written to ``rejects.jsonl``."""


@dataclass
class RawVolume:
    """One volume in canonical orientation, before resampling and intensity policy.

    Attributes:
        array: (X, Y, Z) voxel values in canonical RAS+ axis order (rescale slope/intercept applied).
        affine: (4, 4) voxel index → RAS+ world millimetres.
        stored_dtype: dtype of the values as stored in the file (before any rescaling); integer CT is
            told apart from MR by it.
        modality_hint: ``"ct"``/``"mr"`` when the file format says so (DICOM), else ``None``.
        header: small format-specific facts kept for the metadata (e.g. the source orientation codes).
    """

    array: np.ndarray
    affine: np.ndarray
    stored_dtype: np.dtype
    modality_hint: str | None = None
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (x, y, z)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def volume_suffix(path: Path) -> str | None:
    """The recognised volume suffix of ``path`` (lower case, ``.nii.gz`` as one suffix), or ``None``."""
    name = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def canonicalize(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the axes of ``array`` to the closest RAS+ orientation (nibabel's ``as_closest_canonical``).

    Args:
        array: (I, J, K) voxels.
        affine: (4, 4) voxel → RAS+ world.

    Returns:
        The (X, Y, Z) array (a view where possible) and its (4, 4) affine; world coordinates of every voxel
        are unchanged.
    """
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    out = orientations.apply_orientation(array, ornt)
    return out, affine @ orientations.inv_ornt_aff(ornt, array.shape)


def load_volume(path: Path, take_volume: int | None = None) -> RawVolume:
    """Read a NIfTI, NRRD or MetaImage file into a canonical :class:`RawVolume`.

    Args:
        path: the file.
        take_volume: for a 4D file, the index of the volume (along the 4th axis) to keep; ``None`` rejects
            4D files.

    Raises:
        RejectedInput: unreadable or unsupported file, not a 3D scalar volume, non-finite values or an
            invalid affine (zero/non-finite voxel size).
    """
    suffix = volume_suffix(path)
    if suffix is None:
        raise RejectedInput(f"unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise RejectedInput("unreadable: empty file")
    read = _read_nifti if suffix in NIFTI_SUFFIXES else _read_sitk
    array, affine, stored_dtype, header = read(path, take_volume)
    return finalize(array, affine, stored_dtype, header=header)


def finalize(
    array: np.ndarray,
    affine: np.ndarray,
    stored_dtype: np.dtype,
    modality_hint: str | None = None,
    header: dict[str, Any] | None = None,
) -> RawVolume:
    """Check a freshly read (I, J, K) volume and its voxel → RAS+ affine, and canonicalise it.

    Raises:
        RejectedInput: an invalid affine, non-finite values or a non-scalar voxel type.
    """
    header = dict(header or {})
    _check_geometry(affine)
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise RejectedInput(f"non-finite values: {bad} voxels are NaN or Inf")
    elif array.dtype.kind not in "iub":
        raise RejectedInput(f"unsupported voxel type {array.dtype} (expected integer or float scalars)")
    header["source_orientation"] = "".join(_axcodes(affine))
    array, affine = canonicalize(array, affine)
    return RawVolume(
        array=array, affine=affine, stored_dtype=stored_dtype, modality_hint=modality_hint, header=header
    )


def _four_d(shape: tuple[int, ...], take_volume: int | None) -> str:
    """The reason a 4D shape is rejected, or ``""`` when ``take_volume`` picks a valid volume of it."""
    if take_volume is None:
        return (
            f"not a 3D volume: shape {list(shape)} is 4D ({shape[3]} volumes); "
            "--take-volume T keeps volume T of every 4D input"
        )
    if not 0 <= take_volume < shape[3]:
        return f"4D volume has {shape[3]} volumes; --take-volume {take_volume} is out of range"
    return ""


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    from nibabel import orientations

    return tuple(str(c) for c in orientations.aff2axcodes(affine))


def _check_geometry(affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise RejectedInput("invalid geometry: the voxel-to-world affine has non-finite entries")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(sizes <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12:
        raise RejectedInput(
            f"invalid geometry: voxel sizes {np.round(sizes, 6).tolist()} mm (zero or degenerate)"
        )


def _squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes past the third (NIfTI often stores a 3D volume as X×Y×Z×1)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_nifti(
    path: Path, take_volume: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.dtype, dict[str, Any]]:
    import nibabel as nib

    header: dict[str, Any] = {"reader": "nibabel"}
    try:
        img = nib.load(str(path))
        shape = _squeeze_to_3d(img.shape)
        stored_dtype = np.dtype(img.get_data_dtype())
        if stored_dtype.names is not None or stored_dtype.kind == "c":
            raise RejectedInput(f"not a scalar volume: voxel type {stored_dtype}")
        if len(shape) == 4 and not _four_d(shape, take_volume):
            # Slicing the proxy reads (and scales) only that volume.
            array = np.asanyarray(img.dataobj[..., take_volume]).reshape(shape[:3])
            header["volume_index"] = take_volume
        elif len(shape) == 4:
            raise RejectedInput(_four_d(shape, take_volume))
        elif len(shape) != 3:
            raise RejectedInput(f"not a 3D volume: shape {list(img.shape)} ({len(shape)}D)")
        else:
            # asanyarray applies scl_slope/scl_inter (and keeps the stored dtype when there is none).
            array = np.asanyarray(img.dataobj).reshape(shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except RejectedInput:
        raise
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib/gzip errors, ...)
        raise RejectedInput(f"unreadable: {type(e).__name__}: {_first_line(e)}") from None
    return array, affine, stored_dtype, header


def _read_sitk(
    path: Path, take_volume: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.dtype, dict[str, Any]]:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        dim = reader.GetDimension()
        size = reader.GetSize()
        if dim == 4 and not _four_d(tuple(size), take_volume):
            # Extract only volume T: index (0, 0, 0, T), size (X, Y, Z, 0) collapses the 4th axis.
            reader.SetExtractIndex([0, 0, 0, int(take_volume)])  # type: ignore[arg-type]
            reader.SetExtractSize([*size[:3], 0])
        elif dim == 4:
            raise RejectedInput(_four_d(tuple(size), take_volume))
        elif dim != 3:
            raise RejectedInput(f"not a 3D volume: size {list(size)} ({dim}D)")
        if reader.GetNumberOfComponents() != 1:
            raise RejectedInput(f"not a scalar volume: {reader.GetNumberOfComponents()} components per voxel")
        img = reader.Execute()
    except RejectedInput:
        raise
    except Exception as e:  # ITK raises RuntimeError with a multi-line trace
        raise RejectedInput(f"unreadable: {type(e).__name__}: {_first_line(e)}") from None
    # GetArrayFromImage gives (z, y, x); transpose to index order (i, j, k) = (x, y, z) of the file.
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)  # scale columns
    lps[:3, 3] = img.GetOrigin()
    return array, _LPS_TO_RAS @ lps, array.dtype, {"reader": "SimpleITK"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # ITK messages start with a source location; the useful part is usually the last line.
    msg = lines[-1] if lines else repr(e)
    return msg[:300]
