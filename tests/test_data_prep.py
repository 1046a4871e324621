"""data_prep on real volumes: fetching, orientation, resampling, intensity policy, the tar/manifest
contract, determinism, patient splits and rejects."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import fetch
from data_prep.options import parse_splits
from data_prep.prepare import assign_split, patient_hash, resample
from data_prep.readers import canonicalize, load_volume
from data_prep.shard import main, shard_volumes
from pcrl.shards import read_manifest, read_volume

REPO = Path(__file__).resolve().parents[1]
EXPECTED_SHAPES = {  # after resampling to 1 mm: floor(n · spacing), tolerant to header rounding
    "lung1_image.nrrd": (292, 292, 240),
    "lung2_image.nrrd": (321, 321, 305),
    "brain1_image.nrrd": (200, 200, 162),
    "brain2_image.nrrd": (200, 200, 149),
}


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _rejects(folder: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]
    return {r["source"]: r["reason"] for r in lines}


def _by_source(folder: Path) -> dict[str, dict]:
    return {m["source"]: m for m in _manifest(folder)}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# --- fetch -------------------------------------------------------------------------------------------


def test_fetch_samples_names_files_and_reuses_the_cache(sample_volumes: dict[str, Path], monkeypatch) -> None:
    """The sample set has the five real images and their masks; a second fetch downloads nothing (a broken
    cache check would hit the package index on every test run)."""
    assert fetch.image_names(sample_volumes) == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    assert sample_volumes["lung1"].name == "lung1_image.nrrd"
    assert sample_volumes["lung1_label"].name == "lung1_label.nrrd"
    marker = json.loads((sample_volumes["lung1"].parent / fetch.MARKER).read_text())
    assert marker["requirement"] == "pyradiomics-bhklab==3.1.4"
    assert (
        marker["files"]["lung1"]["sha256"] == hashlib.sha256(sample_volumes["lung1"].read_bytes()).hexdigest()
    )

    def no_download(*args, **kwargs):
        raise AssertionError("the cache was complete; nothing should be downloaded")

    monkeypatch.setattr(fetch, "download", no_download)
    assert fetch.fetch_samples(sample_volumes["lung1"].parents[1]) == sample_volumes


def test_fetch_unreachable_index_raises_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    """With the package index unreachable, the error names the package and says to check the network,
    instead of a pip traceback; nothing is left half-extracted."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        fetch.FetchError, match=r"could not download pyradiomics-bhklab==3\.1\.4 .*check network/proxy"
    ):
        fetch.fetch_samples(tmp_path / "samples")
    assert not (tmp_path / "samples" / "pyradiomics").exists()
    assert list((tmp_path / "samples").iterdir()) == []


# --- orientation and geometry ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["brain1", "lung1"])
def test_reader_nrrd_world_coordinates_match_simpleitk(sample_volumes: dict[str, Path], name: str) -> None:
    """Every canonical voxel sits at the RAS world point SimpleITK gives for the same source voxel (LPS with x
    and y negated). brain1's direction flips y, so a missing LPS→RAS or axis flip shows here."""
    img = sitk.ReadImage(str(sample_volumes[name]))
    raw = load_volume(sample_volumes[name])
    assert raw.array.shape == img.GetSize()  # axis order (x, y, z) kept: the scans are near-axial
    inv = np.linalg.inv(raw.affine)
    src = sitk.GetArrayViewFromImage(img)  # (z, y, x)
    rng = np.random.default_rng(0)
    for idx in [(0, 0, 0), tuple(n - 1 for n in img.GetSize())] + [
        tuple(int(rng.integers(n)) for n in img.GetSize()) for _ in range(20)
    ]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        can = inv @ ras
        np.testing.assert_allclose(can[:3], np.round(can[:3]), atol=1e-4)
        i, j, k = np.round(can[:3]).astype(int)
        assert raw.array[i, j, k] == src[idx[2], idx[1], idx[0]]
    codes = nib.aff2axcodes(raw.affine)
    assert codes == ("R", "A", "S")


def test_reader_nifti_in_lia_equals_the_nrrd(sample_volumes: dict[str, Path], tmp_path: Path) -> None:
    """The real CT written as NIfTI with axes permuted and flipped (LIA) reads back as the same canonical
    array and affine as the NRRD, and equals nibabel's own as_closest_canonical."""
    img = sitk.ReadImage(str(sample_volumes["lung1"]))
    a = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # LPS index order (i, j, k)
    sx, sy, sz = img.GetSpacing()
    ox, oy, oz = img.GetOrigin()
    assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    a_ras = np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1.0]])
    _, ny, nz = a.shape
    # b[i', j', k'] = a[i', ny-1-k', nz-1-j']: axes L, I, A.
    b = np.ascontiguousarray(a.transpose(0, 2, 1)[:, ::-1, ::-1])
    m = np.array([[1, 0, 0, 0], [0, 0, -1, ny - 1], [0, -1, 0, nz - 1], [0, 0, 0, 1.0]])
    path = _save_nifti(b, a_ras @ m, tmp_path / "lung1_lia.nii.gz")
    assert nib.aff2axcodes(nib.load(str(path)).affine) == ("L", "I", "A")

    from_nifti = load_volume(path)
    from_nrrd = load_volume(sample_volumes["lung1"])
    np.testing.assert_array_equal(from_nifti.array, from_nrrd.array)
    np.testing.assert_allclose(from_nifti.affine, from_nrrd.affine, atol=1e-4)
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    np.testing.assert_array_equal(from_nifti.array, np.asanyarray(canonical.dataobj))
    np.testing.assert_allclose(from_nifti.affine, canonical.affine, atol=1e-5)


@pytest.fixture(scope="module")
def s1_lia() -> Path:
    """The real pycortex subject S1 T1 MRI (256³, 1 mm, uint8, stored LIA), fetched once into the cache."""
    from conftest import samples_dir

    return fetch.fetch_samples(samples_dir(), ["pycortex"])["S1_raw"]


def test_reader_real_lia_nifti_keeps_every_voxel_at_its_world_point(s1_lia: Path, tmp_path: Path) -> None:
    """A real scan stored LIA (pycortex S1) is read as RAS+ (x, y, z): every sampled source voxel keeps its
    value at its world point under the new affine, and the sample's stored voxels are that canonical array
    with the recorded MRI normalisation (a flipped or permuted axis anywhere would break both)."""
    img = nib.load(str(s1_lia))
    assert nib.aff2axcodes(img.affine) == ("L", "I", "A")
    raw = load_volume(s1_lia)
    assert nib.aff2axcodes(raw.affine) == ("R", "A", "S") and raw.array.shape == (256, 256, 256)
    src = np.asanyarray(img.dataobj)
    inv = np.linalg.inv(raw.affine)
    rng = np.random.default_rng(0)
    picks = [(0, 0, 0), (255, 255, 255), (255, 0, 17)] + [tuple(rng.integers(0, 256, 3)) for _ in range(200)]
    picks += [tuple(ijk) for ijk in np.argwhere(src > np.percentile(src, 99))[::5000]]  # bright voxels
    for ijk in picks:
        can = inv @ img.affine @ [*ijk, 1.0]
        np.testing.assert_allclose(can[:3], np.round(can[:3]), atol=1e-4)
        i, j, k = np.round(can[:3]).astype(int)
        assert raw.array[i, j, k] == src[ijk]

    shard_volumes([s1_lia], tmp_path, progress=False)
    (rec,) = read_manifest(tmp_path, "all")
    stored, meta = read_volume(rec)
    assert meta["source_orientation"] == "LIA" and rec.shape == (256, 256, 256) and rec.modality == "mr"
    np.testing.assert_allclose(np.array(meta["affine"]), raw.affine, atol=1e-4)
    lo, hi = meta["intensity"]["values"]
    expected = np.clip((raw.array.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3)


def test_shard_nifti_lia_and_nrrd_give_the_same_sample(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """Sharding the LIA NIfTI gives the same key (identical voxels) and world coordinates as the NRRD."""
    raw = load_volume(sample_volumes["lung1"])
    array, affine = raw.array, raw.affine
    # RAS → LIA by hand on the canonical array: flip x, swap y/z, flip the new y.
    nx, _, nz = array.shape
    b = np.ascontiguousarray(array[::-1].transpose(0, 2, 1)[:, ::-1])  # b[i,j,k] = a[nx-1-i, k, nz-1-j]
    m = np.array([[-1, 0, 0, nx - 1], [0, 0, 1, 0], [0, -1, 0, nz - 1], [0, 0, 0, 1.0]])
    path = _save_nifti(b, affine @ m, tmp_path / "in" / "lung1_lia.nii.gz")
    out = tmp_path / "out"
    shard_volumes([path], out, workers=1, progress=False)
    (line,) = _manifest(out)
    ref = _by_source(sample_shards)["lung1_image.nrrd"]
    assert line["key"] == ref["key"] and line["shape"] == ref["shape"]
    (rec,) = read_manifest(out, "all")
    (ref_rec,) = [r for r in read_manifest(sample_shards, "all") if r.key == ref["key"]]
    arr, meta = read_volume(rec)
    ref_arr, ref_meta = read_volume(ref_rec)
    np.testing.assert_array_equal(arr, ref_arr)
    np.testing.assert_allclose(meta["affine"], ref_meta["affine"], atol=1e-4)
    assert meta["source_orientation"] == "LIA" and ref_meta["source_orientation"] == "LPS"


def test_canonicalize_is_nibabels_as_closest_canonical() -> None:
    """Our canonicalisation is exactly nibabel's for an oblique, permuted affine."""
    rng = np.random.default_rng(1)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    rot = np.array([[0, 0.98, 0.2], [-0.2, 0, -0.98], [-0.98, -0.2, 0.02]])
    affine = np.eye(4)
    affine[:3, :3] = rot * [0.7, 1.3, 2.5]
    affine[:3, 3] = [10, -20, 30]
    ours, ours_affine = canonicalize(array, affine)
    theirs = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    np.testing.assert_array_equal(ours, np.asanyarray(theirs.dataobj))
    np.testing.assert_allclose(ours_affine, theirs.affine)


def test_resample_is_exact_on_a_linear_ramp() -> None:
    """Trilinear resampling reproduces a linear function of world position at every output voxel whose
    sample point lies inside the input: pins the voxel-centre convention and the new affine together."""
    spacing = (0.7, 1.3, 2.5)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-12.0, 5.0, 40.0]
    shape = (40, 30, 12)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    coef = np.array([0.3, -0.7, 1.1])
    array = (world @ coef).reshape(shape).astype(np.float32)

    out, out_affine = resample(array, affine, spacing, (1.0, 1.0, 1.0))
    assert out.shape == (28, 39, 30)
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), [1, 1, 1])
    oijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    oworld = oijk @ out_affine[:3, :3].T + out_affine[:3, 3]
    src = (np.linalg.inv(affine) @ np.c_[oworld, np.ones(len(oworld))].T).T[:, :3]
    inside = np.all((src >= 0) & (src <= np.array(shape) - 1), axis=1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(out.reshape(-1)[inside], (oworld @ coef)[inside], atol=1e-3)
    # The field of view stays centred: the centre of the old and new grids coincide.
    centre = affine @ [*(np.array(shape) - 1) / 2, 1]
    new_centre = out_affine @ [*(np.array(out.shape) - 1) / 2, 1]
    np.testing.assert_array_less(np.abs(centre - new_centre)[:3], 1.0)


# --- the real sample set -------------------------------------------------------------------------------


def test_shard_sample_set_accepts_four_at_1mm(sample_shards: Path) -> None:
    """2 CT + 2 MRI are accepted at 1 mm with the expected shapes; the small breast crop is rejected with a
    reason; summary.json counts agree."""
    lines = _by_source(sample_shards)
    assert {s: tuple(m["shape"]) for s, m in lines.items()} == EXPECTED_SHAPES
    for m in lines.values():
        assert m["spacing"] == [1.0, 1.0, 1.0]
        assert m["split"] == "train"
    assert {s: m["modality"] for s, m in lines.items()} == {
        "lung1_image.nrrd": "ct", "lung2_image.nrrd": "ct", "brain1_image.nrrd": "mr", "brain2_image.nrrd": "mr",
    }  # fmt: skip
    rejects = _rejects(sample_shards)
    assert list(rejects) == ["breast1_image.nrrd"]
    assert "too small after resampling" in rejects["breast1_image.nrrd"]
    summary = json.loads((sample_shards / "summary.json").read_text())
    assert (summary["inputs"], summary["accepted"], summary["rejected"]) == (5, 4, 1)
    assert summary["per_modality"] == {"ct": 2, "mr": 2} and summary["shards"] == 4


def test_shard_ct_is_int16_hu_with_plausible_values(sample_shards: Path) -> None:
    """Stored CT is int16 HU in [-1024, 3071]: air outside the body ≈ -1000, lung parenchyma and soft tissue
    present (a wrong rescale or a window baked into shards fails this)."""
    for rec in read_manifest(sample_shards, "all"):
        if rec.modality != "ct":
            continue
        array, meta = read_volume(rec)
        assert array.dtype == np.int16
        assert array.min() >= -1024 and array.max() <= 3071
        assert meta["intensity"] == {"kind": "ct_hu", "clip_hu": [-1024, 3071], "dtype": "int16"}
        corners = np.concatenate([array[:20, :20].ravel(), array[-20:, -20:].ravel()])
        assert np.median(corners) < -900
        assert ((array > -950) & (array < -500)).mean() > 0.03  # lung
        assert ((array > -100) & (array < 100)).mean() > 0.03  # soft tissue


def test_shard_mr_is_float16_unit_range_with_percentiles(sample_shards: Path) -> None:
    """Stored MRI is float16 in [0, 1], normalised by the 0.5/99.5 percentiles recorded in the metadata."""
    for rec in read_manifest(sample_shards, "all"):
        if rec.modality != "mr":
            continue
        array, meta = read_volume(rec)
        assert array.dtype == np.float16
        assert array.min() == 0.0 and array.max() == 1.0
        policy = meta["intensity"]
        assert policy["kind"] == "mr_percentile" and policy["percentiles"] == [0.5, 99.5]
        lo, hi = policy["values"]
        assert 0 <= lo < hi
        assert 0.001 < (array == 1.0).mean() < 0.03  # ~0.5 % clipped at the top


def test_manifest_offsets_read_the_same_bytes_as_tarfile(sample_shards: Path) -> None:
    """Seeking to a manifest offset reads exactly the member tarfile extracts; checksums match; members are
    plain ``<key>.<ext>`` with fixed metadata, in sorted order."""
    lines = _manifest(sample_shards)
    for line in lines:
        with tarfile.open(sample_shards / line["shard"]) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names == sorted(names)
            assert all(
                "/" not in n and m.mtime == 0 and m.uid == 0 and m.gid == 0
                for n, m in zip(names, members, strict=True)
            )
            image = tar.extractfile(f"{line['key']}.image.npy.zst").read()  # type: ignore[union-attr]
            meta = tar.extractfile(f"{line['key']}.meta.json").read()  # type: ignore[union-attr]
        with open(sample_shards / line["shard"], "rb") as f:
            f.seek(line["offset"])
            assert f.read(line["size"]) == image
            f.seek(line["meta_offset"])
            assert f.read(line["meta_size"]) == meta
        assert line["checksum"] == "sha256:" + hashlib.sha256(image).hexdigest()
        meta = json.loads(meta)
        assert (
            meta["key"] == line["key"] and meta["shape"] == line["shape"] and meta["split"] == line["split"]
        )
        assert len(meta["affine"]) == 4 and meta["patient"] != meta["source"]


def test_shard_output_is_identical_for_another_run_with_two_workers(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """A second run with a process pool of 2 writes byte-identical shards, manifest and rejects (the output
    must not depend on worker timing or count)."""
    images = [sample_volumes[n] for n in fetch.image_names(sample_volumes)]
    shard_volumes(images, tmp_path, shard_size_mb=4, workers=2, progress=False)
    for name in [
        "manifest.jsonl",
        "rejects.jsonl",
        *sorted(p.name for p in sample_shards.glob("shard-*.tar")),
    ]:
        assert (tmp_path / name).read_bytes() == (sample_shards / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == sorted(
        p.name for p in sample_shards.glob("shard-*")
    )


# --- splits ----------------------------------------------------------------------------------------


def test_assign_split_fractions_and_stability() -> None:
    """Split assignment is a pure function of the salted patient id and follows the fractions."""
    splits = parse_splits("train=0.8,val=0.1,test=0.1")
    got = [assign_split(patient_hash(f"patient{i}", "s"), splits) for i in range(20000)]
    assert abs(got.count("train") / len(got) - 0.8) < 0.02 and abs(got.count("test") / len(got) - 0.1) < 0.02
    assert got == [assign_split(patient_hash(f"patient{i}", "s"), splits) for i in range(20000)]
    assert patient_hash("p", "a") != patient_hash("p", "b")
    for bad in ["train=0.9", "train=0.5,bogus=0.5", "train=x,val=1", "train=0.5,train=0.5"]:
        with pytest.raises(ValueError, match="--split"):
            parse_splits(bad)


def test_shard_splits_by_patient_folder(sample_volumes: dict[str, Path], tmp_path: Path) -> None:
    """Two volumes per patient folder always land in the same split, both splits are used, and the stored
    patient id is the salted hash of the folder name."""
    raw = load_volume(sample_volumes["brain2"])
    root = tmp_path / "raw"
    for p in range(8):
        for v in range(2):
            x0, y0 = 20 + 9 * p, 30 + 40 * v
            crop = np.ascontiguousarray(raw.array[x0 : x0 + 60, y0 : y0 + 60, 4:14])
            affine = raw.affine.copy()
            affine[:3, 3] = (raw.affine @ [x0, y0, 4, 1])[:3]
            _save_nifti(crop, affine, root / f"patient{p:02d}" / f"scan{v}.nii.gz")
    out = tmp_path / "out"
    summary = shard_volumes(
        [root], out, splits={"train": 0.5, "val": 0.5}, min_size=(8, 8, 8), progress=False
    )
    assert summary.accepted == 16 and summary.rejected == 0
    by_patient: dict[str, set[str]] = {}
    for line in _manifest(out):
        folder = line["source"].split("/")[0]
        assert line["patient"] == patient_hash(folder, "pcrl")
        by_patient.setdefault(folder, set()).add(line["split"])
    assert len(by_patient) == 8
    assert all(len(s) == 1 for s in by_patient.values()), by_patient
    assert {next(iter(s)) for s in by_patient.values()} == {"train", "val"}


# --- rejects and the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of one good real crop and one of each kind of bad input (including a duplicate)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    raw = load_volume(sample_volumes["brain1"])
    crop = np.ascontiguousarray(raw.array[40:140, 40:140, 5:15])  # 78 × 78 × 65 mm
    _save_nifti(crop, raw.affine, root / "good.nii.gz")
    _save_nifti(crop, raw.affine, root / "good_copy.nii")  # same voxels, another file
    (root / "empty.nii.gz").write_bytes(b"")
    whole = (root / "good.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (root / "text.nii.gz").write_text("this is not a NIfTI file\n")
    _save_nifti(np.ascontiguousarray(raw.array[:, :, 10]), raw.affine, root / "flat2d.nii.gz")
    sitk.WriteImage(
        sitk.GetImageFromArray(np.ascontiguousarray(raw.array[:, :, 10].T)), str(root / "flat2d.nrrd")
    )
    example4d = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if example4d.is_file():
        shutil.copy(example4d, root / "fmri4d.nii.gz")
    else:  # nibabel wheels without test data: a real crop repeated over time
        _save_nifti(np.stack([crop, crop], -1), raw.affine, root / "fmri4d.nii.gz")
    nan = crop.astype(np.float32)
    nan[5, 5, 5] = np.nan
    _save_nifti(nan, raw.affine, root / "nan.nii.gz")
    _save_nifti(np.ascontiguousarray(raw.array[50:60, 50:60, 5:8]), raw.affine, root / "tiny.nii.gz")
    _save_nifti(np.full((90, 90, 12), 7, np.int16), raw.affine, root / "constant.nii.gz")
    return root


EXPECTED_REJECTS = {
    "good_copy.nii": "duplicate: same voxels as good.nii.gz",
    "empty.nii.gz": "empty file",
    "truncated.nii.gz": "unreadable",
    "text.nii.gz": "unreadable",
    "flat2d.nii.gz": "not a 3D volume",
    "flat2d.nrrd": "not a 3D volume",
    "fmri4d.nii.gz": "not a 3D volume",
    "nan.nii.gz": "non-finite values",
    "tiny.nii.gz": "too small after resampling",
    "constant.nii.gz": "constant intensity",
}


def test_shard_rejects_each_bad_input_with_a_reason(bad_inputs: Path, tmp_path: Path) -> None:
    """Every bad input gets one rejects.jsonl line with its reason and the job still finishes with the good
    volume sharded (a crash or a silent drop would lose track of inputs)."""
    summary = shard_volumes([bad_inputs], tmp_path, max_reject_fraction=1.0, progress=False)
    rejects = _rejects(tmp_path)
    assert sorted(rejects) == sorted(EXPECTED_REJECTS)
    for source, reason in EXPECTED_REJECTS.items():
        assert reason in rejects[source], (source, rejects[source])
    assert [m["source"] for m in _manifest(tmp_path)] == ["good.nii.gz"]
    assert (summary.inputs, summary.accepted, summary.rejected) == (11, 1, 10)
    assert not summary.too_many_rejects


def test_shard_cli_exits_3_when_rejects_exceed_the_fraction(bad_inputs: Path, tmp_path: Path) -> None:
    """The CLI writes everything, then exits 3 and points at rejects.jsonl when too many inputs fail."""
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.shard", "--input", str(bad_inputs), "--output", str(tmp_path / "out"),
         "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "--max-reject-fraction 0.5" in proc.stderr and "rejects.jsonl" in proc.stderr
    assert "sharded 1 of 11 volumes" in proc.stdout
    assert len(_rejects(tmp_path / "out")) == 10 and len(_manifest(tmp_path / "out")) == 1


def test_shard_cli_usage_errors_exit_2(bad_inputs: Path, tmp_path: Path, capsys) -> None:
    """Bad options, a missing input and an existing shard set are usage errors (exit 2) naming the problem."""
    cases = [
        (["--split", "train=0.7"], "fractions must sum to 1"),
        (["--modality", "pet"], "invalid choice"),
        (["--spacing", "1", "0", "1"], "spacing must be three positive"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--input", str(bad_inputs), "--output", str(tmp_path / "x"), *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(bad_inputs), "--output", str(tmp_path / "done")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_shard_take_volume_keeps_one_volume_of_a_4d_image(tmp_path: Path) -> None:
    """``take_volume`` (``--take-volume T``) accepts a real 4D fMRI by keeping volume T: the stored voxels are
    that volume's (a reader that took the wrong axis or volume would differ), and the metadata says which."""
    example4d = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if not example4d.is_file():
        pytest.skip("this nibabel wheel has no test data")
    img = nib.load(str(example4d))
    keys = {}
    for t in (0, 1):
        out = tmp_path / f"t{t}"
        shard_volumes([example4d], out, take_volume=t, min_size=(8, 8, 8), progress=False)
        (rec,) = read_manifest(out, "all")
        _, meta = read_volume(rec)
        assert meta["volume_index"] == t
        keys[t] = rec.key
        # The same volume saved as its own 3D NIfTI gives the same sample.
        single = _save_nifti(np.asanyarray(img.dataobj[..., t]), img.affine, tmp_path / f"vol{t}.nii.gz")
        ref = tmp_path / f"ref{t}"
        shard_volumes([single], ref, min_size=(8, 8, 8), progress=False)
        assert _manifest(ref)[0]["key"] == rec.key
    assert keys[0] != keys[1]
    out = tmp_path / "out-of-range"
    shard_volumes([example4d], out, take_volume=5, max_reject_fraction=1.0, progress=False)
    assert "--take-volume 5 is out of range" in _rejects(out)["example4d.nii.gz"]


def test_shard_metaimage_gives_the_nrrd_sample(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """A real MRI saved as MetaImage (.mha, through SimpleITK) shards to the same key, i.e. the same voxels,
    as the NRRD it came from."""
    path = tmp_path / "in" / "brain1.mha"
    path.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(sample_volumes["brain1"])), str(path))
    shard_volumes([path], tmp_path / "out", progress=False)
    assert _manifest(tmp_path / "out")[0]["key"] == _by_source(sample_shards)["brain1_image.nrrd"]["key"]


# --- body crop and the QA sheet -------------------------------------------------------------------------


def test_shard_crop_body_drops_air_and_keeps_the_body(
    sample_volumes: dict[str, Path], sample_shards: Path, tmp_path: Path
) -> None:
    """``crop_body`` on the real lung2 CT: the stored volume is exactly a box of the uncropped one at the
    recorded start, its affine moved to that box, smaller than the scan; every voxel outside the box is air
    or part of something apart from the body (the table), and the body itself is inside."""
    shard_volumes([sample_volumes["lung2"]], tmp_path, crop_body=True, progress=False)
    (rec,) = read_manifest(tmp_path, "all")
    cropped, meta = read_volume(rec)
    (full_rec,) = [r for r in read_manifest(sample_shards, "all") if r.source == "lung2_image.nrrd"]
    full, full_meta = read_volume(full_rec)
    crop = meta["crop"]
    assert crop["kind"] == "body" and crop["uncropped_shape"] == list(full.shape)
    (x, y, z), (nx, ny, nz) = crop["start"], cropped.shape
    np.testing.assert_array_equal(cropped, full[x : x + nx, y : y + ny, z : z + nz])
    np.testing.assert_allclose(
        np.array(meta["affine"]), np.array(full_meta["affine"]) @ np.array(
            [[1, 0, 0, x], [0, 1, 0, y], [0, 0, 1, z], [0, 0, 0, 1.0]]
        ), atol=1e-6,
    )  # fmt: skip
    assert cropped.size < 0.95 * full.size
    outside = np.ones(full.shape, bool)
    outside[x : x + nx, y : y + ny, z : z + nz] = False
    tissue = full > -500
    assert tissue[~outside].sum() > 100 * tissue[outside].sum()  # the body is in the box
    assert np.median(full[outside]) < -900  # what was dropped is mostly air


def test_shard_crop_body_on_mri_and_fingerprint(sample_volumes: dict[str, Path], tmp_path: Path) -> None:
    """On a real MRI the crop keeps at least the minimum shape and records its threshold; a cropped job is a
    different job from an uncropped one in the same folder (not silently mixed)."""
    shard_volumes([sample_volumes["brain2"]], tmp_path, crop_body=True, progress=False)
    (rec,) = read_manifest(tmp_path, "all")
    _, meta = read_volume(rec)
    assert meta["crop"]["threshold"] > 0 and meta["crop"]["uncropped_shape"] == [200, 200, 149]
    assert all(n >= m for n, m in zip(rec.shape, (64, 64, 32), strict=True))
    assert list(rec.shape) != meta["crop"]["uncropped_shape"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        shard_volumes([sample_volumes["brain2"]], tmp_path, progress=False)


def test_shard_writes_a_qa_sheet_of_the_accepted_volumes(sample_shards: Path) -> None:
    """qa.png sits beside the manifest, lists its volumes in summary.json, and shows one row of three planes
    per volume (a blank or missing picture, or keys that are not in the manifest, fail)."""
    import matplotlib.image

    summary = json.loads((sample_shards / "summary.json").read_text())
    keys = [m["key"] for m in _manifest(sample_shards)]
    assert summary["qa_sheet"] == "qa.png" and summary["qa_keys"] == keys
    picture = matplotlib.image.imread(sample_shards / "qa.png")
    height, width = picture.shape[:2]
    assert height > 4 * 100 and width > 300
    gray = picture[..., :3].mean(-1)
    assert gray.std() > 0.1 and (gray < 0.1).mean() > 0.05  # drawn volumes: dark air, bright tissue


def test_qa_pick_spreads_over_the_manifest() -> None:
    """The sheet's sample is deterministic and spread over the whole manifest, first and last included."""
    from data_prep.qa import pick

    lines = [{"key": str(i)} for i in range(100)]
    chosen = [int(c["key"]) for c in pick(lines, 8)]
    assert chosen[0] == 0 and chosen[-1] == 99 and len(set(chosen)) == 8 and chosen == sorted(chosen)
    assert pick(lines[:3], 8) == lines[:3]
