"""Hostile inputs to the offline sharding job (``python -m data_prep.shard``), each a real crafted file: a
DICOM whose Rows holds text among good files, gzip bombs whose headers declare gigabytes of zeros, and
NIfTI/NRRD geometry that is zero, negative, non-finite, tiny, huge or singular (also where nibabel would
silently repair it). Every one must be rejected with a reason naming what is wrong, and the job must go on
with the other files, with one worker or two, in bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep.readers import DEFAULT_MAX_VOXELS
from data_prep.shard import main, shard_volumes

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REPO = Path(__file__).resolve().parents[2]
# Peak memory of a sharding process (one worker: inline) that meets the bombs. A normal run of one tiny
# volume peaks at about 270 MB (Python, torch, nibabel, SimpleITK, pydicom, matplotlib for qa.png), the run
# with the bombs at about 370 MB; before the header checks the bombs took 2.4 GB and more.
PEAK_BOUND_MB = 600


def _rejects(folder: Path) -> dict[str, str]:
    lines = (folder / "rejects.jsonl").read_text().splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


def _manifest_sources(folder: Path) -> set[str]:
    return {json.loads(line)["source"] for line in (folder / "manifest.jsonl").read_text().splitlines()}


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, (8, 8, 8)).astype(np.int16)


def _raw_nifti(
    path: Path,
    array: np.ndarray,
    *,
    pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0),
    sform: np.ndarray | None = None,
    shape: tuple[int, ...] | None = None,
) -> Path:
    """Write a NIfTI-1 file byte by byte, with header fields exactly as given (``nib.save`` would repair
    pixdim from the affine). ``sform=None`` leaves sform_code and qform_code 0: pixdim sets the geometry.
    ``shape``: the shape the header declares, when it is to differ from the data written."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape or array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr["pixdim"][1:4] = pixdim
    hdr["qform_code"] = 0
    hdr["sform_code"] = 0
    if sform is not None:
        hdr["sform_code"] = 1
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    hdr["vox_offset"] = 352
    data = hdr.binaryblock + b"\0" * 4 + array.tobytes(order="F")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)
    return path


def _dicom_slice(path: Path, k: int, uid: str, **override: object) -> Path:
    """One 8×8 CT slice at z = k mm of series ``uid``; ``override`` sets elements as (VR, value)."""
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "patient-dicom", uid
    ds.ImagePositionPatient = [0.0, 0.0, float(k)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    pixels = ((np.arange(64).reshape(8, 8) * 7 + k * 13) % 900 + 100).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.tobytes()
    tags = {"Rows": 0x00280010, "RescaleSlope": 0x00281053}
    for keyword, (vr, value) in override.items():  # type: ignore[misc]
        del ds[keyword]
        ds.add_new(tags[keyword], vr, value)  # a VR that lets text in where a number belongs
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def dicom_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good 70-slice series (more than one header batch, so that two workers read the headers), a file of
    another series whose Rows is text, a 6-slice series with one slice whose RescaleSlope is text, and a
    good NIfTI."""
    root = tmp_path_factory.mktemp("hostile_dicom")
    good = generate_uid()
    for folder in ("good", "rows", "slope"):
        (root / folder).mkdir()
    for k in range(70):
        _dicom_slice(root / "good" / f"IM{k:03d}.dcm", k, good)
    _dicom_slice(root / "rows" / "bad.dcm", 0, generate_uid(), Rows=("LO", "abc"))
    other = generate_uid()
    for k in range(6):
        kw = {"RescaleSlope": ("LO", "one")} if k == 3 else {}
        _dicom_slice(root / "slope" / f"IM{k}.dcm", k, other, **kw)
    _raw_nifti(root / "good.nii.gz", _volume(), sform=np.eye(4)[:3])
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_dicom_header_is_rejected_and_the_job_goes_on(
    dicom_inputs: Path, tmp_path: Path, workers: int, capsys
) -> None:
    """Pins: one DICOM whose Rows holds text stopping the whole job (exit 2, `invalid literal for int()`,
    no file named, nothing written), with headers read inline or in two worker processes; and a RescaleSlope
    holding text costing more than its own series."""
    out = tmp_path / "shards"
    rc = main(["--input", str(dicom_inputs), "--output", str(out), "--workers", str(workers), "--no-progress",
               "--min-size", "1", "1", "1", "--max-reject-fraction", "1"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rejects = _rejects(out)
    assert len(rejects) == 2 and "rows/bad.dcm" in rejects, rejects
    assert "Rows" in rejects["rows/bad.dcm"] and "'abc'" in rejects["rows/bad.dcm"], rejects
    (slope,) = [r for s, r in rejects.items() if s.startswith("slope/series-")]
    assert "IM3.dcm" in slope and "RescaleSlope" in slope, slope
    accepted = _manifest_sources(out)
    assert "good.nii.gz" in accepted and any(s.startswith("good/series-") for s in accepted), accepted
    assert not any("unexpected error" in r for r in rejects.values()), rejects


def _gzip_zeros(n: int, level: int = 9) -> bytes:
    """``n`` zero bytes as gzip members of 64 MiB each, built from one compressed member (fast, small)."""
    block = 64 * 2**20
    member = gzip.compress(b"\0" * block, compresslevel=level)
    out = [member] * (n // block)
    if n % block:
        out.append(gzip.compress(b"\0" * (n % block), compresslevel=level))
    return b"".join(out)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files of a few MB at most that would inflate to gigabytes: a .nii.gz of 1100×1000×1000 zeros
    (complete: its data is all there), a .nii.gz whose header extension declares 2 GB, a gzip NRRD of
    1100×1000×1000 zeros (its header and a 1 MB start of the data) and a deflated DICOM of 2.1 GiB (complete).
    A good tiny volume sits next to them."""
    root = tmp_path_factory.mktemp("bombs")
    shape = (1100, 1000, 1000)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    head = gzip.compress(hdr.binaryblock + b"\0" * 4)
    (root / "bomb.nii.gz").write_bytes(head + _gzip_zeros(int(np.prod(shape))))
    # Extension bomb: a tiny shape, an extension flag, and one extension declaring 2 GB (of zeros).
    small = nib.Nifti1Header()
    small.set_data_shape((8, 8, 8))
    small.set_data_dtype(np.uint8)
    small.set_sform(np.eye(4), 1)
    small["vox_offset"] = 352 + 16
    ext = np.array([2**31 - 16, 0], dtype="<i4").tobytes()
    (root / "extension.nii.gz").write_bytes(
        gzip.compress(small.binaryblock + b"\1\0\0\0" + ext) + _gzip_zeros(2**30)
    )
    nrrd = (
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1100 1000 1000\nspace: left-posterior-superior\n"
        b"space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: gzip\n\n"
    )
    (root / "bomb.nrrd").write_bytes(nrrd + gzip.compress(b"\0" * 2**20))
    # 2 GiB + 128 MiB: past the 2 bytes per voxel of --max-voxels (+ 64 MiB) a deflated file may inflate to.
    _deflated_dicom_bomb(root / "deflated.dcm", 32768, 34816)
    _raw_nifti(root / "good.nii.gz", _volume(), sform=np.eye(4)[:3])
    return root


def _deflated_dicom_bomb(path: Path, rows: int, cols: int) -> Path:
    """A DICOM file in the Deflated transfer syntax whose data set, a ``rows``×``cols`` 16-bit CT image,
    inflates to that many zeros; built from repeated raw deflate pieces, so it is small and quick to write."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_IMAGE_STORAGE, uid, "CT"
    ds.SeriesInstanceUID, ds.Rows, ds.Columns = generate_uid(), rows, cols
    pixel_bytes = rows * cols * 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    head, body = DicomBytesIO(), DicomBytesIO()
    head.is_little_endian = body.is_little_endian = True
    head.is_implicit_VR = body.is_implicit_VR = False
    write_file_meta_info(head, meta)
    write_dataset(body, ds)
    pixel_element = bytes.fromhex("e07f1000") + b"OW\0\0" + pixel_bytes.to_bytes(4, "little")

    def raw(data: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    block = 64 * 2**20
    zeros = raw(b"\0" * block, final=False)  # starts a fresh history: valid after any flush point
    stream = raw(body.getvalue() + pixel_element, False) + zeros * (pixel_bytes // block) + raw(b"", True)
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + stream)
    return path


def _peak_run(args: list[str]) -> tuple[int, int, str]:
    """Run the sharding CLI in a fresh process (inline: one worker); its exit status, its peak resident
    memory in MB and its stderr.

    A small launcher process runs it and reads ``RUSAGE_CHILDREN``: Linux carries a process's peak over
    ``exec`` from the process it was forked from, so measured straight from pytest the peak would be
    pytest's own.
    """
    launcher = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'data_prep.shard', *sys.argv[1:]], stdout=subprocess.DEVNULL)\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(done.returncode)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)  # fmt: skip
    peak = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_KB")]
    assert peak, done.stdout + done.stderr
    return done.returncode, peak[0] // 1024, done.stderr


def test_gzip_bombs_are_rejected_from_their_headers_in_bounded_memory(bombs: Path, tmp_path: Path) -> None:
    """Pins: a 1 MB .nii.gz of 1100×1000×1000 zeros inflated to 2.4 GB before it was rejected as too large
    (a fact its header gave for free); a NIfTI extension that nibabel reads whole, for whatever size it
    declares; a gzip NRRD that ITK inflates into the size its header declares; a deflated DICOM that
    pydicom inflates whole while reading its header."""
    assert all(p.stat().st_size < 4 * 2**20 for p in bombs.iterdir())
    good = tmp_path / "good"
    good.mkdir()
    (good / "good.nii.gz").write_bytes((bombs / "good.nii.gz").read_bytes())
    common = ["--workers", "1", "--no-progress", "--min-size", "1", "1", "1", "--max-reject-fraction", "1"]
    rc, baseline, err = _peak_run(["--input", str(good), "--output", str(tmp_path / "base"), *common])
    assert rc == 0, err
    rc, peak, err = _peak_run(["--input", str(bombs), "--output", str(tmp_path / "out"), *common])
    assert rc == 0, err
    assert peak < PEAK_BOUND_MB, f"peak {peak} MB with the bombs (a normal run: {baseline} MB)"
    rejects = _rejects(tmp_path / "out")
    assert _manifest_sources(tmp_path / "out") == {"good.nii.gz"}
    for name in ("bomb.nii.gz", "bomb.nrrd"):
        reason = rejects[name]
        assert "[1100, 1000, 1000]" in reason and f"--max-voxels {DEFAULT_MAX_VOXELS}" in reason, reason
        assert "raise --max-voxels" in reason, reason
    assert "extension" in rejects["extension.nii.gz"], rejects
    assert "deflated data set inflates to more than" in rejects["deflated.dcm"], rejects
    assert "raise --max-voxels" in rejects["deflated.dcm"], rejects


def test_max_voxels_option_lowers_the_limit(bombs: Path, tmp_path: Path) -> None:
    """``--max-voxels`` is the limit of the header check (a good 8×8×8 volume is rejected under 500) and a
    non-positive value is a usage error."""
    good = tmp_path / "good"
    good.mkdir()
    (good / "good.nii.gz").write_bytes((bombs / "good.nii.gz").read_bytes())
    out = tmp_path / "out"
    rc = main(["--input", str(good), "--output", str(out), "--workers", "1", "--no-progress",
               "--min-size", "1", "1", "1", "--max-reject-fraction", "1", "--max-voxels", "500"])  # fmt: skip
    assert rc == 0
    reason = _rejects(out)["good.nii.gz"]
    assert "its header declares shape [8, 8, 8] = 512 voxels" in reason and "--max-voxels 500" in reason
    with pytest.raises(SystemExit) as e:
        main(["--input", str(good), "--output", str(tmp_path / "x"), "--max-voxels", "0"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def bad_geometry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny volume per kind of bad voxel geometry, and a good one."""
    root = tmp_path_factory.mktemp("geometry")
    a = _volume()
    huge = np.diag([1e30, 1.0, 1.0, 1.0])[:3]
    _raw_nifti(root / "huge_sform.nii.gz", a, sform=huge)
    _raw_nifti(root / "zero_pixdim.nii", a, pixdim=(0.0, 1.0, 1.0))  # nibabel would make it 1 mm
    _raw_nifti(root / "negative_pixdim.nii", a, pixdim=(1.0, -2.0, 1.0))
    _raw_nifti(root / "nan_pixdim.nii", a, pixdim=(1.0, 1.0, float("nan")))
    _raw_nifti(root / "tiny_pixdim.nii", a, pixdim=(0.001, 1.0, 1.0))
    _raw_nifti(root / "huge_pixdim.nii", a, pixdim=(1.0, 1.0, 1e30))
    _raw_nifti(root / "nan_sform.nii", a, sform=np.array([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    _raw_nifti(root / "inf_sform.nii", a, sform=np.array([[1, 0, 0, np.inf], [0, 1, 0, 0], [0, 0, 1, 0]]))
    singular = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0]])  # x and y axes the same vector
    _raw_nifti(root / "singular_sform.nii", a, sform=singular)
    img = sitk.GetImageFromArray(a.transpose(2, 1, 0).copy())
    img.SetSpacing((0.001, 1.0, 1.0))
    sitk.WriteImage(img, str(root / "tiny_spacing.nrrd"))
    _raw_nifti(root / "good.nii", _volume(1), pixdim=(1.0, 1.0, 2.0))
    return root


EXPECTED_GEOMETRY = {
    "huge_sform.nii.gz": ["1e+30", "too large", "0.01 to 100 mm"],
    "zero_pixdim.nii": ["pixdim", "[0.0, 1.0, 1.0]", "zero or negative"],
    "negative_pixdim.nii": ["pixdim", "-2.0", "zero or negative"],
    "nan_pixdim.nii": ["pixdim", "nan", "non-finite"],
    "tiny_pixdim.nii": ["pixdim", "0.001", "too small"],
    "huge_pixdim.nii": ["pixdim", "1e+30", "too large"],
    "nan_sform.nii": ["sform", "non-finite"],
    "inf_sform.nii": ["sform", "non-finite"],
    "singular_sform.nii": ["singular"],
    "tiny_spacing.nrrd": ["0.001", "too small"],
}


def test_bad_voxel_geometry_is_rejected_with_a_reason(bad_geometry: Path, tmp_path: Path, caplog) -> None:
    """Pins: a voxel size of 1e30 rejected as an 'unexpected error' with a traceback; a zero pixdim that
    nibabel silently turns into 1 mm accepted; negative, non-finite, tiny and huge voxel sizes and singular
    or non-finite affines accepted or rejected without saying why."""
    out = tmp_path / "out"
    summary = shard_volumes([bad_geometry], out, min_size=(1, 1, 1), max_reject_fraction=1.0, progress=False)
    assert summary.accepted == 1 and _manifest_sources(out) == {"good.nii"}
    rejects = _rejects(out)
    assert set(rejects) == set(EXPECTED_GEOMETRY), rejects
    for source, words in EXPECTED_GEOMETRY.items():
        assert "invalid geometry" in rejects[source], (source, rejects[source])
        for word in words:
            assert word in rejects[source], (source, word, rejects[source])
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
