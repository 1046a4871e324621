"""DICOM on real data: a multi-file CT series written from the real lung1 NRRD (one file per slice, shuffled
names, per-slice rescale) must read back voxel for voxel and in world coordinates; its bad variants, pydicom's
own non-image objects and a real Enhanced multi-frame MR and Siemens mosaic must be handled as documented."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep.dicom import load_dicom, read_header
from data_prep.readers import RejectedInput, canonicalize, load_volume
from data_prep.shard import shard_volumes

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def _ds(value: float) -> str:
    return f"{value:.10g}"  # DS strings hold at most 16 characters


def write_series(
    folder: Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    origin: np.ndarray,
    direction: np.ndarray,
    *,
    uid: str,
    patient: str = "patient-1",
    slices: list[int] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``volume`` (LPS index order (i, j, k) as SimpleITK has it) as one CT file per slice ``k``.

    Each slice gets its own ImagePositionPatient (origin + k·sz·normal), the shared orientation and pixel
    spacing, and a per-slice RescaleIntercept (alternating 1024/2024 offsets over uint16 storage). File
    names are shuffled so that neither name order nor InstanceNumber tell the slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ks = list(range(volume.shape[2])) if slices is None else slices
    names = rng.permutation(len(ks))
    sx, sy, sz = spacing
    paths = []
    for n, k in enumerate(ks):
        offset = 1024 if k % 2 == 0 else 2024
        pixels = (volume[:, :, k].T.astype(np.int32) + offset).astype(np.uint16)  # (rows=j, cols=i)
        sop = generate_uid(entropy_srcs=[uid, str(k), str(n)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.Modality, ds.PatientID = "CT", patient
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient])
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = int(rng.integers(1, 1000))  # deliberately useless for ordering
        ds.ImagePositionPatient = [_ds(v) for v in origin + direction[:, 2] * sz * k]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = "2.5"  # wrong on purpose: spacing must come from the positions
        ds.RescaleSlope, ds.RescaleIntercept = "1", str(-offset)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"IM{names[n]:04d}"  # no suffix: found by the DICM magic
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _lps_geometry(img: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray]:
    volume = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (i, j, k)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    return volume, img.GetSpacing(), np.asarray(img.GetOrigin()), direction


@pytest.fixture(scope="module")
def lung1_series(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The whole real lung1 CT (512×512×48) as 48 shuffled single-slice DICOM files."""
    volume, spacing, origin, direction = _lps_geometry(sitk.ReadImage(str(sample_volumes["lung1"])))
    folder = tmp_path_factory.mktemp("lung1_dicom") / "patient-1" / "ct"
    return write_series(folder, volume, spacing, origin, direction, uid=generate_uid(entropy_srcs=["lung1"]))


def test_dicom_series_equals_the_nrrd_voxel_for_voxel(
    lung1_series: list[Path], sample_volumes: dict[str, Path]
) -> None:
    """The series written from the NRRD reads back as the identical canonical int16 array and affine: slice
    order from positions (names are shuffled), spacing from positions (SliceThickness lies), per-slice
    intercepts applied."""
    from_dicom = load_dicom(lung1_series)
    from_nrrd = load_volume(sample_volumes["lung1"])
    assert from_dicom.array.dtype == np.int16
    np.testing.assert_array_equal(from_dicom.array, from_nrrd.array)
    np.testing.assert_allclose(from_dicom.affine, from_nrrd.affine, atol=1e-4)
    assert from_dicom.modality_hint == "ct" and from_dicom.header["dicom_layout"] == "series"
    np.testing.assert_allclose(from_dicom.spacing, (0.5703125, 0.5703125, 5.0), atol=1e-5)


def test_dicom_series_voxels_sit_at_their_world_positions(lung1_series: list[Path]) -> None:
    """For pixels of random files, the world point computed straight from that file's header (IPP + c·Δc·row
    + r·Δr·col, LPS → RAS) maps through our affine to a voxel holding that pixel's rescaled value."""
    raw = load_dicom(lung1_series)
    inv = np.linalg.inv(raw.affine)
    rng = np.random.default_rng(3)
    for path in rng.choice(lung1_series, 6, replace=False):
        ds = pydicom.dcmread(path)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in rng.integers(0, 512, size=(10, 2)):
            lps = ipp + c * dc * iop[:3] + r * dr * iop[3:]
            ijk = inv @ [-lps[0], -lps[1], lps[2], 1.0]
            np.testing.assert_allclose(ijk[:3], np.round(ijk[:3]), atol=1e-3)
            i, j, k = np.round(ijk[:3]).astype(int)
            value = int(ds.pixel_array[r, c]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert raw.array[i, j, k] == value


def test_shard_dicom_series_gives_the_nrrd_sample(
    lung1_series: list[Path], sample_shards: Path, tmp_path: Path
) -> None:
    """Sharding the DICOM folder gives the same key (same voxels after resampling) as the NRRD, modality from
    the header, the patient hashed from PatientID, and a source that names the series without its UID."""
    out = tmp_path / "out"
    summary = shard_volumes([lung1_series[0].parents[1]], out, workers=1, progress=False)
    assert (summary.accepted, summary.rejected, summary.files) == (1, 0, 48)
    (line,) = [json.loads(s) for s in (out / "manifest.jsonl").read_text().splitlines()]
    ref = {
        json.loads(s)["source"]: json.loads(s)
        for s in (sample_shards / "manifest.jsonl").read_text().splitlines()
    }["lung1_image.nrrd"]
    assert line["key"] == ref["key"] and line["modality"] == "ct" and line["files"] == 48
    assert line["source"].startswith("ct/series-") and "1.2." not in line["source"]


def test_shard_dicom_rerun_reads_no_header(
    lung1_series: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run of a finished DICOM job is recognised from the file listing alone: it reads no header (a
    no-op re-run over millions of slice files must not parse them all) and writes nothing."""
    from data_prep import discover

    out = tmp_path / "out"
    shard_volumes([lung1_series[0].parents[1]], out, workers=1, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_headers(*args, **kwargs):
        raise AssertionError("headers were read on an unchanged re-run")

    monkeypatch.setattr(discover, "read_headers", no_headers)
    summary = shard_volumes([lung1_series[0].parents[1]], out, workers=1, progress=False)
    assert summary.up_to_date and summary.accepted == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def bad_dicom(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A folder of small real-CT series (a 64×64×12 crop of lung1), each with one defect, plus pydicom's own
    non-image and truncated objects. Returns the folder and the number of files in it."""
    volume, spacing, origin, direction = _lps_geometry(sitk.ReadImage(str(sample_volumes["lung1"])))
    root = tmp_path_factory.mktemp("bad_dicom")
    shifts: dict[str, int] = {}

    def crop_of(name: str) -> tuple[np.ndarray, np.ndarray]:
        x0 = 160 + 8 * shifts.setdefault(name, len(shifts))  # a distinct crop per series: no duplicates
        corner = origin + direction @ (np.array([x0, 220, 10]) * spacing)
        return np.ascontiguousarray(volume[x0 : x0 + 64, 220:284, 10:22]), corner

    def series(name: str, folder: str | None = None, **kw) -> list[Path]:
        uid = kw.pop("uid", generate_uid(entropy_srcs=[name]))
        crop, corner = crop_of(name)
        return write_series(root / (folder or name), crop, spacing, corner, direction, uid=uid, **kw)

    series("good", patient="p-good")
    series("missing", slices=[k for k in range(12) if k != 5])
    uneven = series("uneven")
    ds = pydicom.dcmread(uneven[0])
    ds.ImagePositionPatient[2] = _ds(float(ds.ImagePositionPatient[2]) + 1.5)
    ds.save_as(uneven[0])
    dup = series("duplicate")
    twin = pydicom.dcmread(dup[3])
    twin.SOPInstanceUID = generate_uid(entropy_srcs=["twin"])
    twin.save_as(root / "duplicate" / "IMtwin")
    series("dynamic", slices=[*range(12), *range(12)])  # two time points under one UID
    # One UID, two orientations: the second half is the same crop written as a coronal stack.
    mixed_uid = generate_uid(entropy_srcs=["mixed"])
    series("mixed", uid=mixed_uid)
    crop, corner = crop_of("mixed-coronal")
    coronal = direction[:, [0, 2, 1]] * [1, 1, -1]
    write_series(root / "mixed" / "coronal", crop, spacing, corner, coronal, uid=mixed_uid, seed=1)
    # One UID, two image sizes.
    sizes_uid = generate_uid(entropy_srcs=["sizes"])
    series("sizes", uid=sizes_uid)
    crop, corner = crop_of("sizes-small")
    write_series(root / "sizes" / "small", crop[:48, :40], spacing, corner + np.array([0, 0, 100]), direction,
                 uid=sizes_uid, seed=2)  # fmt: skip
    trunc = series("truncated")
    trunc[4].write_bytes(trunc[4].read_bytes()[:3000])
    nopix = pydicom.dcmread(series("nopixels")[0])
    del nopix.PixelData
    nopix.SeriesInstanceUID = generate_uid(entropy_srcs=["nopixels-single"])
    nopix.save_as(root / "nopixels" / "IMnopix.dcm")
    (root / "objects").mkdir()
    for name in ("rtstruct.dcm", "reportsi.dcm", "CT_small.dcm", "MR_truncated.dcm"):
        shutil.copy(PYDICOM_FILES / name, root / "objects" / name)
    (root / "objects" / "empty.dcm").write_bytes(b"")
    (root / "objects" / "README.txt").write_text("notes, not an image\n")
    return root, sum(1 for p in root.rglob("*") if p.is_file())


def test_shard_dicom_bad_series_are_rejected_or_split_with_reasons(
    bad_dicom: tuple[Path, int], tmp_path: Path
) -> None:
    """Each defect gets the documented outcome and a readable reason; a UID with two orientations or sizes is
    split into parts; every file is accounted for in the manifest or rejects.jsonl."""
    root, n_files = bad_dicom
    out = tmp_path / "out"
    summary = shard_volumes([root], out, min_size=(8, 8, 8), max_reject_fraction=1.0, progress=False)
    manifest = [json.loads(s) for s in (out / "manifest.jsonl").read_text().splitlines()]
    rejects = [json.loads(s) for s in (out / "rejects.jsonl").read_text().splitlines()]
    accepted = sorted(
        m["source"].rsplit("/", 1)[0] + m["source"][-6:] * ("-part" in m["source"]) for m in manifest
    )
    # good, the series beside the file without pixels, and the two parts of each UID split by geometry.
    assert accepted == [
        "good", "mixed-part1", "mixed/coronal-part2", "nopixels", "sizes-part1", "sizes/small-part2",
    ], manifest  # fmt: skip
    reasons = {r["source"]: r["reason"] for r in rejects}
    by_folder = {s.split("/")[0]: r for s, r in reasons.items() if not s.startswith("objects/")}
    assert "missing slice" in by_folder["missing"] and "--series-gaps split" in by_folder["missing"]
    assert "uneven slice spacing" in by_folder["uneven"]
    assert "duplicated slice positions" in by_folder["duplicate"]
    assert "a 4D or multi-echo series" in by_folder["dynamic"]
    assert "unreadable pixel data" in by_folder["truncated"]
    assert "no pixel data" in by_folder["nopixels"]
    assert "structure set" in reasons["objects/rtstruct.dcm"]
    assert "structured report" in reasons["objects/reportsi.dcm"]
    assert "single 2D slice" in reasons["objects/CT_small.dcm"]
    assert "unreadable" in reasons["objects/MR_truncated.dcm"]
    assert "empty file" in reasons["objects/empty.dcm"]
    assert reasons["objects/README.txt"].startswith("ignored")
    # Every file is in exactly one line (series lines count their files).
    assert sum(m["files"] for m in manifest) + sum(r["files"] for r in rejects) == n_files == summary.files
    assert summary.ignored == 1


def test_shard_dicom_series_gaps_split_keeps_the_even_runs(
    bad_dicom: tuple[Path, int], tmp_path: Path
) -> None:
    """With series_gaps=split a series with a missing slice becomes its two evenly spaced runs."""
    root, _ = bad_dicom
    shard_volumes([root / "missing"], tmp_path, min_size=(8, 8, 8), series_gaps="split", progress=False)
    manifest = [json.loads(s) for s in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted((m["source"].rsplit("-", 1)[-1], m["files"]) for m in manifest) == [
        ("part1", 5),
        ("part2", 6),
    ]


def test_dicom_headers_are_read_in_workers_with_the_same_result(
    bad_dicom: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a process pool, DICOM headers are read by the workers in batches, and discovery finds exactly
    the series, parts and header-level rejects of the serial read (a batching bug would drop or reorder
    files)."""
    from data_prep import discover
    from data_prep.pool import Pool

    root, _ = bad_dicom
    serial = discover.find_inputs([root])
    monkeypatch.setattr(discover, "HEADER_BATCH", 16)  # the folder has ~200 DICOM files: several batches
    calls: list[int] = []
    with Pool(workers=2) as pool:
        real_map = pool.map

        def counting_map(fn, args, **kw):
            args = list(args)
            calls.append(len(args))
            return real_map(fn, args, **kw)

        monkeypatch.setattr(pool, "map", counting_map)
        parallel = discover.find_inputs([root], pool=pool)
    assert calls and calls[0] > 1  # the headers went through the pool, in several tasks
    assert parallel.items == serial.items and len(serial.items) > 5
    assert parallel.rejects == serial.rejects and parallel.ignored == serial.ignored


def test_dicom_header_rejects_non_images_before_reading_pixels() -> None:
    """RTSTRUCT and SR objects are rejected from their header with a reason a person understands."""
    with pytest.raises(RejectedInput, match="RT structure set"):
        read_header(PYDICOM_FILES / "rtstruct.dcm")
    with pytest.raises(RejectedInput, match="structured report"):
        read_header(PYDICOM_FILES / "reportsi.dcm")


def test_dicom_enhanced_multiframe_matches_nibabel(tmp_path: Path) -> None:
    """A real Philips Enhanced MR (176 frames, oblique) reads to the same canonical voxels and world affine as
    nibabel's multi-frame wrapper gives (an independent implementation of the per-frame functional groups)."""
    from nibabel.nicom import dicomwrappers

    path = tmp_path / "mprage.dcm"
    path.write_bytes(gzip.decompress((NIBABEL_DICOM / "philips_mprage.dcm.gz").read_bytes()))
    raw = load_dicom([path])
    assert raw.header["dicom_layout"] == "multi-frame" and raw.modality_hint == "mr"
    # nibabel warns that its DICOM readers are experimental: at import (5.2) or here (newer releases).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        theirs = np.asarray(wrapper.get_data())
    their_array, their_affine = canonicalize(theirs, np.diag([-1.0, -1, 1, 1]) @ wrapper.affine)
    assert raw.array.shape == their_array.shape
    # nibabel steps by the nominal slice spacing, we by the stored positions: they differ by < 10 µm/slice.
    np.testing.assert_allclose(raw.affine, their_affine, atol=5e-3)
    np.testing.assert_allclose(raw.array, their_array, rtol=1e-5)


def test_dicom_siemens_mosaic_is_unpacked(tmp_path: Path) -> None:
    """A real Siemens DWI mosaic (one 896² file) becomes a 128×128×48 volume at 1.8×1.8×3 mm."""
    path = tmp_path / "dwi.dcm"
    path.write_bytes(gzip.decompress((NIBABEL_DICOM / "siemens_dwi_1000.dcm.gz").read_bytes()))
    raw = load_dicom([path])
    assert raw.header["dicom_layout"] == "mosaic"
    assert sorted(raw.array.shape) == [48, 128, 128]
    np.testing.assert_allclose(sorted(raw.spacing), [1.796875, 1.796875, 3.0], atol=0.02)
