"""The sample sources of data_prep.fetch on real downloads (cached in the ignored .cache/ after the first
run): the pretraining set (images only, every volume 3-D) is disjoint from the volumes held out for
evaluation, and the CLI lists every source with its role."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import SimpleITK as sitk
from conftest import samples_dir

from data_prep.fetch import SOURCES, Source, fetch_pretraining, fetch_samples, pretraining_sources
from pcrl.io import file_sha256

REPO = Path(__file__).resolve().parents[1]
# Stored (x, y, z) shape of every pretraining image, as nibabel's ``shape`` or SimpleITK's ``GetSize``.
PRETRAINING_SHAPES = {
    "brain1": (256, 256, 25),
    "brain2": (256, 256, 23),
    "breast1": (45, 120, 21),
    "lung1": (512, 512, 48),
    "lung2": (512, 512, 61),
    "S1_raw": (256, 256, 256),
    "mni152_t1": (197, 233, 189),
    "nibabel_anatomical": (33, 41, 25),
}


def _shape(path: Path) -> tuple[int, ...]:
    if path.name.endswith((".nii", ".nii.gz")):
        return tuple(nib.load(str(path)).shape)
    return tuple(sitk.ReadImage(str(path)).GetSize())


@pytest.fixture(scope="module")
def pretraining() -> dict[str, Path]:
    return fetch_pretraining(samples_dir())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.fetch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fetch_pretraining_returns_3d_images_without_masks_or_tables(pretraining: dict[str, Path]) -> None:
    """The pyradiomics images, pycortex's S1, the MNI152 T1 and nibabel's anatomical MRI, each a 3-D volume of
    its known shape; no ``*_label`` mask and no text table."""
    assert sorted(pretraining) == sorted(PRETRAINING_SHAPES)
    assert not [n for n in pretraining if n.endswith(("_label", "_txt"))]
    for name, path in pretraining.items():
        assert path.is_file() and path.parent.parent == samples_dir(), path
        assert _shape(path) == PRETRAINING_SHAPES[name], name
    assert pretraining["mni152_t1"].name == "mni152_t1.nii.gz"


def test_no_pretraining_volume_comes_from_an_eval_source(pretraining: dict[str, Path]) -> None:
    """Colin27 (the AAL task's subject) is eval-role: not a pretraining source, no pretraining file in its
    folder, and no pretraining file is byte-identical to any of its files."""
    assert "colin27" not in pretraining_sources()
    assert SOURCES["colin27"].role == "eval"
    assert all(SOURCES[n].role == "pretrain" for n in pretraining_sources())
    assert set(pretraining_sources()) == {"pyradiomics", "pycortex", "mni152", "nibabel"}
    colin = fetch_samples(samples_dir(), sources=["colin27"])
    colin_folder = colin["colin27_ch2"].parent
    held_out = {file_sha256(p) for p in colin.values()}
    assert colin["colin27_ch2"].name == "colin27_ch2.nii.gz" and len(held_out) == len(colin)
    for name, path in pretraining.items():
        assert colin_folder not in path.resolve().parents, name
        assert file_sha256(path) not in held_out, name
    with pytest.raises(ValueError, match="role must be one of"):
        Source("x", "x==1", "*", role="train")


def test_cli_lists_every_source_with_its_role_and_rejects_an_unknown_one() -> None:
    """``--list`` prints one row per source (role, default, installer, requirement) and fetches nothing; an
    unknown ``--source`` is argparse's usage error (exit 2)."""
    listed = _cli("--list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1 : 1 + len(SOURCES)]}
    assert set(rows) == set(SOURCES)
    for name, source in SOURCES.items():
        default = "yes" if source.default else "no"
        assert rows[name][1:] == [source.role, default, source.installer, source.requirement], rows[name]
    assert "held out for evaluation: colin27" in listed.stdout

    unknown = _cli("--source", "nosuch")
    assert unknown.returncode == 2
    assert "argument --source: invalid choice: 'nosuch'" in unknown.stderr


def test_cli_set_pretrain_prints_where_the_images_went(pretraining: dict[str, Path]) -> None:
    """``--set pretrain`` (cached by now) prints every pretraining image with its path and no mask."""
    out = _cli("--set", "pretrain", "--dest", str(samples_dir()))
    assert out.returncode == 0, out.stderr
    printed = {
        line.split()[0]: Path(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("  ")
    }
    assert printed == pretraining
    assert "mni152: 1 files already in" in out.stdout
