"""Read one medical volume from disk into canonical RAS+ orientation.

Every reader returns a :class:`RawVolume`: the array with axes (x, y, z) exactly as nibabel's
``as_closest_canonical`` gives them, and the 4×4 voxel→world affine in RAS+ millimetres. NIfTI goes through
nibabel (its sform/qform rules are the reference of the array contract); NRRD and MetaImage go through
SimpleITK, whose world frame is LPS: its x and y world axes are negated to get RAS.

A file that cannot become a 3D scalar volume raises :class:`RejectedInput` with a one-line reason; the
sharder writes it to ``rejects.jsonl``. Limits are checked from the header before any voxel is read (or
inflated, for ``.nii.gz`` and compressed NRRD/MetaImage): the voxel count against ``max_voxels``
(:func:`check_voxels`), and the voxel size against [:data:`MIN_VOXEL_MM`, :data:`MAX_VOXEL_MM`], with the
raw NIfTI ``pixdim`` checked before nibabel silently turns a zero into 1 mm. DICOM (series, multi-frame
files, mosaics) is read by
:mod:`data_prep.dicom` into the same type, with a ``modality_hint`` from the Modality tag.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from data_prep.timing import stage

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "MAX_NIFTI_HEADER_BYTES",
    "MAX_VOXEL_MM",
    "MIN_VOXEL_MM",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "RawVolume",
    "RejectedInput",
    "canonicalize",
    "check_spacing",
    "check_voxels",
    "finalize",
    "load_volume",
    "volume_suffix",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

DEFAULT_MAX_VOXELS = 1024**3
"""Default ``--max-voxels``: the most voxels one volume may have, as read and after resampling. A volume
of 1024³ int16 voxels is 2 GiB as read, plus a 4 GiB float32 copy while it is resampled (per worker)."""
MIN_VOXEL_MM = 0.01
"""Smallest accepted voxel size (mm): below it a header is wrong (or in metres), not a micro-CT."""
MAX_VOXEL_MM = 100.0
"""Largest accepted voxel size (mm): 10 cm voxels carry no anatomy; a larger one is a header error."""
MAX_NIFTI_HEADER_BYTES = 64 * 2**20
"""Largest NIfTI header plus extensions (``vox_offset``): nibabel reads the extensions into memory, and
in a ``.nii.gz`` a few bytes on disk can declare gigabytes of them."""

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


def check_voxels(shape: Sequence[int], max_voxels: int, what: str = "") -> None:
    """Reject a volume of ``shape`` when it has more than ``max_voxels`` voxels (``--max-voxels``).

    Called with the shape a header declares, before the voxels are read. ``what`` says where the shape
    comes from (``"its header declares"``).

    Raises:
        RejectedInput: naming the shape, the limit and the option that raises it.
    """
    n = math.prod(int(v) for v in shape)  # Python ints: a hostile header must not overflow int64
    if n > max_voxels:
        raise RejectedInput(
            f"too large: {what + ' ' if what else ''}shape {[int(v) for v in shape]} = {n} voxels, more than "
            f"--max-voxels {max_voxels} (raise --max-voxels to accept it; each worker needs at least 6 bytes "
            "per voxel)"
        )


def check_spacing(sizes: Sequence[float], where: str = "voxel sizes") -> None:
    """Reject voxel sizes (mm) that are zero, negative, non-finite or outside [:data:`MIN_VOXEL_MM`,
    :data:`MAX_VOXEL_MM`].

    Raises:
        RejectedInput: naming the sizes and the accepted range.
    """
    values = [float(v) for v in sizes]
    if all(math.isfinite(v) and MIN_VOXEL_MM <= v <= MAX_VOXEL_MM for v in values):
        return
    if any(not math.isfinite(v) for v in values):
        what = "non-finite"
    elif any(v <= 0 for v in values):
        what = "zero or negative"
    elif any(v < MIN_VOXEL_MM for v in values):
        what = "too small"
    else:
        what = "too large"
    shown = [float(f"{v:.6g}") if math.isfinite(v) else v for v in values]
    raise RejectedInput(
        f"invalid geometry: {where} {shown} mm: {what} (accepted: {MIN_VOXEL_MM:g} to {MAX_VOXEL_MM:g} mm)"
    )


def load_volume(
    path: Path, take_volume: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> RawVolume:
    """Read a NIfTI, NRRD or MetaImage file into a canonical :class:`RawVolume`.

    The header is checked first: a volume of more than ``max_voxels`` voxels, or with a voxel size out of
    range, is rejected before any voxel is read or inflated.

    Args:
        path: the file.
        take_volume: for a 4D file, the index of the volume (along the 4th axis) to keep; ``None`` rejects
            4D files.
        max_voxels: the most voxels of the (3D) volume read (``--max-voxels``).

    Raises:
        RejectedInput: unreadable or unsupported file, not a 3D scalar volume, too many voxels, non-finite
            values or an invalid affine (zero, non-finite, tiny or huge voxel size; singular).
    """
    suffix = volume_suffix(path)
    if suffix is None:
        raise RejectedInput(f"unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RejectedInput(f"unreadable: {e.strerror or type(e).__name__}") from None
    if size == 0:
        raise RejectedInput("unreadable: empty file")
    read = _read_nifti if suffix in NIFTI_SUFFIXES else _read_sitk
    array, affine, stored_dtype, header = read(path, take_volume, max_voxels)
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
    with stage("reorient"):
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
    check_spacing(sizes)
    # Axes (nearly) in one plane: the volume of a voxel is a tiny fraction of the product of its sides.
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(sizes)):
        raise RejectedInput(
            "invalid geometry: the voxel-to-world affine is singular (its axes "
            f"{np.round(affine[:3, :3], 6).tolist()} are not independent)"
        )


def _squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes past the third (NIfTI often stores a 3D volume as X×Y×Z×1)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _open_nifti(path: Path) -> BinaryIO:
    """The file, or its inflated stream for ``.nii.gz`` (inflated only as far as it is read)."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _check_nifti_header(path: Path, max_voxels: int) -> None:
    """Check the raw NIfTI header before nibabel loads the file: the declared shape against ``max_voxels``,
    the header and extension sizes, and the voxel sizes as stored (``pixdim``, which nibabel silently
    repairs: a zero becomes 1 mm) and the sform (non-finite; :func:`finalize` checks the affine it gives).

    Reads at most the header and the 8-byte head of each extension, whatever the file declares.
    """
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header

    with _open_nifti(path) as f:
        block = f.read(540 + 4)
        klass: Any = None
        for k, size in ((Nifti1Header, 348), (Nifti2Header, 540)):
            head = block[:4]
            if head in (struct.pack("<i", size), struct.pack(">i", size)):
                klass = k
        if klass is None:
            raise RejectedInput("unreadable: not a NIfTI-1 or NIfTI-2 header (wrong sizeof_hdr)")
        size = klass.template_dtype.itemsize
        hdr = klass(block[:size], check=False)  # check=False: see the raw fields, not nibabel's repairs
        fields = hdr.structarr
        ndim = int(fields["dim"][0])
        dims = [int(v) for v in fields["dim"][1 : 1 + ndim]] if 1 <= ndim <= 7 else []
        if not dims or any(d < 1 for d in dims):
            raise RejectedInput(f"invalid header: dim {fields['dim'].tolist()} is not a valid image shape")
        # One 3D volume is read at most: a 4D file is rejected, or only volume --take-volume is read.
        check_voxels(_squeeze_to_3d(tuple(dims))[:3], max_voxels, "its header declares")
        vox_offset = float(fields["vox_offset"])
        if not math.isfinite(vox_offset) or not 0 <= vox_offset <= MAX_NIFTI_HEADER_BYTES:
            raise RejectedInput(
                f"invalid header: vox_offset {vox_offset:g} (header and extensions larger than "
                f"{MAX_NIFTI_HEADER_BYTES // 2**20} MiB, or negative)"
            )
        if len(block) >= size + 4 and block[size : size + 1] != b"\x00":
            _check_extensions(f, size + 4, int(vox_offset), hdr.endianness)
    pixdim = [float(v) for v in fields["pixdim"][1:4]]
    # nibabel takes the affine from the sform when sform_code > 0, else from pixdim (and the quaternion).
    if int(fields["sform_code"]) > 0:
        srows = np.stack([fields["srow_x"], fields["srow_y"], fields["srow_z"]]).astype(np.float64)
        if not np.all(np.isfinite(srows)):
            raise RejectedInput("invalid geometry: the NIfTI sform (srow_x/y/z) has non-finite entries")
    else:
        check_spacing(
            pixdim[: min(3, len(dims))], "voxel sizes in the NIfTI header (pixdim[1:4]; sform_code 0)"
        )


def _check_extensions(f: BinaryIO, start: int, vox_offset: int, endianness: str) -> None:
    """Walk the NIfTI extensions between the header and ``vox_offset`` (nibabel reads each one whole, for
    whatever size it declares): each must fit before the voxel data."""
    pos = start
    f.seek(pos)
    while vox_offset - pos >= 16:
        head = f.read(8)
        if len(head) < 8:
            raise RejectedInput("unreadable: truncated NIfTI header extension")
        esize = struct.unpack(endianness + "i", head[:4])[0]
        if esize < 16 or pos + esize > vox_offset:
            raise RejectedInput(
                f"invalid header: an extension of {esize} bytes at byte {pos} does not fit before the voxel "
                f"data at vox_offset {vox_offset}"
            )
        pos += esize
        f.seek(pos)


def _read_nifti(
    path: Path, take_volume: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray, np.dtype, dict[str, Any]]:
    import nibabel as nib

    header: dict[str, Any] = {"reader": "nibabel"}
    try:
        _check_nifti_header(path, max_voxels)
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
    path: Path, take_volume: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
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
        # Before Execute: ITK allocates (and inflates gzip/zlib data into) the size the header declares.
        check_voxels(size[:3], max_voxels, "its header declares")
        check_spacing(reader.GetSpacing()[:3])
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
