"""Data provenance from raw folders to the exported encoder: ``--source``/``--license`` and ``SOURCE.json`` on
every manifest line, the totals of ``summary.json``, the run's ``data_provenance.json``, and ``encoder.json``'s
``provenance`` with ``MODEL_CARD.md`` after export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from runs import REPO, TINY

from data_prep.shard import main, shard_volumes
from pcrl.config import load_config
from pcrl.shards import UNKNOWN, read_manifest, read_volume

# Tiny volumes: the provenance path does not depend on their size.
SMALL = {"min_size": (8, 8, 8), "workers": 1, "progress": False}
SITE_A = {"source": "site-A", "license": "CC-BY-4.0"}


def _manifest(folder: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return {m["source"]: m for m in lines}


def _provenance(folder: Path) -> dict[str, tuple[str, str]]:
    return {s: (m["data_source"], m["license"]) for s, m in _manifest(folder).items()}


def _volume(path: Path, seed: int, ct: bool) -> None:
    """A 20×18×12 volume at 1 mm: integer HU with air (CT) or positive floats (MR)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 400, (20, 18, 12)).astype(np.int16) if ct else rng.random((20, 18, 12)) * 500
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _raw(root: Path, seed: int) -> Path:
    """``siteA/`` (two CTs, with a SOURCE.json) and ``siteB/`` (one MR, with none)."""
    _volume(root / "siteA/a1.nii.gz", seed, ct=True)
    _volume(root / "siteA/a2.nii.gz", seed + 1, ct=True)
    _volume(root / "siteB/b1.nii.gz", seed + 2, ct=False)
    (root / "siteA/SOURCE.json").write_text(json.dumps(SITE_A))
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _raw(tmp_path_factory.mktemp("raw"), seed=0)


@pytest.fixture(scope="module")
def prov_shards(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``raw`` sharded with no flags: provenance from SOURCE.json only."""
    out = tmp_path_factory.mktemp("prov_shards")
    shard_volumes([raw], out, **SMALL)
    return out


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three other volumes sharded with ``--source other --license CC0-1.0`` (flags over SOURCE.json)."""
    raw = _raw(tmp_path_factory.mktemp("raw_other"), seed=10)
    out = tmp_path_factory.mktemp("other_shards")
    shard_volumes([raw], out, data_source="other", license="CC0-1.0", **SMALL)
    return out


# --- data_prep ---------------------------------------------------------------------------------------


def test_shard_records_source_json_and_unknown_for_every_volume(prov_shards: Path) -> None:
    """SOURCE.json gives its folder's volumes their source and licence; a volume with none is recorded as
    unknown, not dropped; the sample metadata carries the same; SOURCE.json is no input (not even ignored)."""
    assert _provenance(prov_shards) == {
        "siteA/a1.nii.gz": ("site-A", "CC-BY-4.0"),
        "siteA/a2.nii.gz": ("site-A", "CC-BY-4.0"),
        "siteB/b1.nii.gz": (UNKNOWN, UNKNOWN),
    }
    for record in read_manifest(prov_shards, "all"):
        _, meta = read_volume(record)
        assert (meta["data_source"], meta["license"]) == (record.data_source, record.license)
    assert (prov_shards / "rejects.jsonl").read_text() == ""
    summary = json.loads((prov_shards / "summary.json").read_text())
    assert (summary["accepted"], summary["ignored"], summary["files"]) == (3, 0, 3)


def test_shard_summary_totals_provenance(prov_shards: Path) -> None:
    """summary.json counts volumes per source, per licence, and per (source, licence) pair and modality."""
    summary = json.loads((prov_shards / "summary.json").read_text())
    assert summary["per_source"] == {"site-A": 2, UNKNOWN: 1}
    assert summary["per_license"] == {"CC-BY-4.0": 2, UNKNOWN: 1}
    assert summary["sources"] == [
        {"data_source": "site-A", "license": "CC-BY-4.0", "volumes": 2, "per_modality": {"ct": 2}},
        {"data_source": UNKNOWN, "license": UNKNOWN, "volumes": 1, "per_modality": {"mr": 1}},
    ]
    assert summary["per_modality"] == {"ct": 2, "mr": 1}


def test_shard_flags_override_source_json_field_by_field(raw: Path, tmp_path: Path, capsys) -> None:
    """``--license`` alone replaces every licence and keeps SOURCE.json's source; with both flags, every volume
    takes them. The CLI prints the totals."""
    args = ["--input", str(raw), "--min-size", "8", "8", "8", "--workers", "1", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "l"), "--license", "CC-BY-NC-4.0"]) == 0
    assert _provenance(tmp_path / "l") == {
        "siteA/a1.nii.gz": ("site-A", "CC-BY-NC-4.0"),
        "siteA/a2.nii.gz": ("site-A", "CC-BY-NC-4.0"),
        "siteB/b1.nii.gz": (UNKNOWN, "CC-BY-NC-4.0"),
    }
    assert "licences {'CC-BY-NC-4.0': 3}" in capsys.readouterr().out
    assert main([*args, "--output", str(tmp_path / "b"), "--source", "X", "--license", "Y"]) == 0
    assert set(_provenance(tmp_path / "b").values()) == {("X", "Y")}


def test_source_json_applies_to_its_folder_and_below_nearest_first(tmp_path: Path) -> None:
    """A SOURCE.json covers the folders below it; a nearer one replaces it entirely (a key it lacks is
    unknown, not inherited); a file given directly takes the one beside it."""
    root = tmp_path / "raw"
    _volume(root / "top.nii.gz", 0, ct=True)
    _volume(root / "sub/deep/s1.nii.gz", 1, ct=True)
    _volume(root / "own/o1.nii.gz", 2, ct=True)
    (root / "SOURCE.json").write_text(json.dumps({"source": "top", "license": "CC0-1.0"}))
    (root / "own/SOURCE.json").write_text(json.dumps({"source": "own"}))
    shard_volumes([root], tmp_path / "out", **SMALL)
    assert _provenance(tmp_path / "out") == {
        "top.nii.gz": ("top", "CC0-1.0"),
        "sub/deep/s1.nii.gz": ("top", "CC0-1.0"),
        "own/o1.nii.gz": ("own", UNKNOWN),
    }
    shard_volumes([root / "own/o1.nii.gz"], tmp_path / "file", **SMALL)
    assert _provenance(tmp_path / "file") == {"o1.nii.gz": ("own", UNKNOWN)}


def test_shard_refuses_a_malformed_source_json_before_any_work(raw: Path, tmp_path: Path, capsys) -> None:
    """A misspelt key, an empty value or broken JSON is a usage error (exit 2) naming the file and the key;
    nothing is written. A bad flag value is refused the same way."""
    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    cases = [
        ('{"source": "a", "licence": "CC0-1.0"}', "unknown key 'licence'"),
        ('{"source": ""}', "key 'source' must be a non-empty string"),
        ('{"source": "a",', "is not valid JSON"),
        ('["a"]', "expected a JSON object"),
    ]
    for text, message in cases:
        (root / "siteB/SOURCE.json").write_text(text)
        with pytest.raises(SystemExit) as exc:
            main(["--input", str(root), "--output", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and str(root / "siteB/SOURCE.json") in err, err
        assert not (tmp_path / "out/manifest.jsonl").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(raw), "--output", str(tmp_path / "out"), "--license", "CC\nBY"])
    assert exc.value.code == 2 and "--license must be printable text" in capsys.readouterr().err


def test_shard_provenance_is_part_of_the_job(raw: Path, prov_shards: Path, tmp_path: Path) -> None:
    """The same job is up to date; another --source, or an edited SOURCE.json, is another job that an existing
    set refuses without --overwrite (a resume never mixes two provenances in one manifest)."""
    assert shard_volumes([raw], prov_shards, **SMALL).up_to_date
    with pytest.raises(FileExistsError, match=r"provenance.*--overwrite"):
        shard_volumes([raw], prov_shards, data_source="site-B", **SMALL)
    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    shard_volumes([root], tmp_path / "out", **SMALL)
    (root / "siteA/SOURCE.json").write_text(json.dumps({**SITE_A, "license": "CC-BY-NC-4.0"}))
    with pytest.raises(FileExistsError, match="--overwrite"):
        shard_volumes([root], tmp_path / "out", **SMALL)
    shard_volumes([root], tmp_path / "out", overwrite=True, **SMALL)
    assert _provenance(tmp_path / "out")["siteA/a1.nii.gz"] == ("site-A", "CC-BY-NC-4.0")


def test_shard_provenance_bytes_do_not_depend_on_workers_or_format(
    raw: Path, prov_shards: Path, tmp_path: Path
) -> None:
    """Two worker processes write the same manifest and shard bytes as one; the Zarr store records the same
    provenance per volume, in its manifest and in each array's attributes."""
    shard_volumes([raw], tmp_path / "two", **{**SMALL, "workers": 2})
    for name in ["manifest.jsonl", "shard-000000.tar"]:
        assert (tmp_path / "two" / name).read_bytes() == (prov_shards / name).read_bytes(), name
    shard_volumes([raw], tmp_path / "zarr", format="zarr", **SMALL)
    assert _provenance(tmp_path / "zarr") == _provenance(prov_shards)
    for record in read_manifest(tmp_path / "zarr", "all"):
        attrs = zarr.open_array(store=str(record.shard), mode="r").attrs
        assert (attrs["data_source"], attrs["license"]) == (record.data_source, record.license)


def test_manifest_without_provenance_reads_as_unknown(prov_shards: Path, tmp_path: Path) -> None:
    """A manifest written before provenance existed still loads, every volume unknown; a present but empty
    field is a malformed line naming the key."""
    old = tmp_path / "old"
    shutil.copytree(prov_shards, old)
    lines = [json.loads(line) for line in (old / "manifest.jsonl").read_text().splitlines()]
    stripped = [{k: v for k, v in m.items() if k not in ("data_source", "license")} for m in lines]
    (old / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in stripped))
    records = read_manifest(old, "all")
    assert len(records) == 3 and {(r.data_source, r.license) for r in records} == {(UNKNOWN, UNKNOWN)}
    (old / "manifest.jsonl").write_text(json.dumps({**lines[0], "license": ""}) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: malformed manifest line: license must be"):
        read_manifest(old, "all")


# --- training and export -----------------------------------------------------------------------------


def test_data_provenance_of_mixed_shard_sets(prov_shards: Path, other_shards: Path) -> None:
    """Two shard sets read through one brace pattern: the run's provenance counts volumes per source, licence
    and modality over both, names each set by folder (no machine path) with its job fingerprint."""
    from pcrl.provenance import data_provenance

    pattern = f"{{{prov_shards},{other_shards}}}"
    cfg = load_config(TINY, [f"data.shards={prov_shards}", "data.split=all", "data.ct_window=[-500,500]"])
    p = data_provenance(read_manifest(pattern, "all"), cfg)
    assert (p["status"], p["split"], p["volumes"]) == ("recorded", "all", 6)
    assert p["per_modality"] == {"ct": 4, "mr": 2}
    assert p["per_source"] == {"other": 3, "site-A": 2, UNKNOWN: 1}
    assert p["per_license"] == {"CC-BY-4.0": 2, "CC0-1.0": 3, UNKNOWN: 1}
    assert [(s["data_source"], s["license"], s["per_modality"]) for s in p["sources"]] == [
        ("other", "CC0-1.0", {"ct": 2, "mr": 1}),
        ("site-A", "CC-BY-4.0", {"ct": 2}),
        (UNKNOWN, UNKNOWN, {"mr": 1}),
    ]
    assert p["spacing_mm"] == [[1.0, 1.0, 1.0]]
    assert p["intensity"] == {"ct_window_hu": [-500.0, 500.0], "ct_stored_hu": [-1024, 3071]}
    fingerprints = {f.name: json.loads((f / "summary.json").read_text())["fingerprint"] for f in (prov_shards, other_shards)}  # fmt: skip
    assert {s["name"]: (s["volumes"], s["fingerprint"]) for s in p["shard_sets"]} == {
        prov_shards.name: (3, fingerprints[prov_shards.name]),
        other_shards.name: (3, fingerprints[other_shards.name]),
    }
    assert str(prov_shards.parent) not in json.dumps(p)


@pytest.mark.integration
def test_pretraining_writes_data_provenance(tiny_run: Path, sample_shards: Path) -> None:
    """The tiny run (on shards made without provenance) records its 4 training volumes as unknown, with their
    modalities, spacing, the loader's window and the shard set it read."""
    p = json.loads((tiny_run / "data_provenance.json").read_text())
    assert (p["format"], p["status"], p["split"], p["volumes"]) == (
        "pcrl-data-provenance/1",
        "recorded",
        "train",
        4,
    )
    assert p["per_modality"] == {"ct": 2, "mr": 2}
    assert p["per_source"] == {UNKNOWN: 4} and p["per_license"] == {UNKNOWN: 4}
    assert p["spacing_mm"] == [[1.0, 1.0, 1.0]] and p["intensity"]["ct_window_hu"] == [-1000.0, 1000.0]
    fingerprint = json.loads((sample_shards / "summary.json").read_text())["fingerprint"]
    assert p["shard_sets"] == [{"name": sample_shards.name, "volumes": 4, "fingerprint": fingerprint}]


@pytest.mark.integration
def test_export_writes_provenance_and_a_model_card(tiny_run: Path, tmp_path: Path) -> None:
    """``launch/export.py`` copies the run's provenance into encoder.json and writes MODEL_CARD.md with the
    architecture, config hash and step, the data table with its unknown-licence warning, the preprocessing and
    the probe/validation results of the exported step (none at step 1: they came at step 2)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/export.py"), str(tiny_run), "--output", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "MODEL_CARD.md" in proc.stdout and "licences {'unknown': 4}" in proc.stdout
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["provenance"] == json.loads((tiny_run / "data_provenance.json").read_text())
    card = (tmp_path / "MODEL_CARD.md").read_text()
    for text in [
        "# Model card: PCRLv2 encoder of run `tiny`, step 2",
        "## Architecture",
        "widths 16, 32, 64, 128 (base 8)",
        f"config hash: `{meta['training']['config_hash']}`",
        "steps: 2 (the exported checkpoint)",
        f"sha256 `{meta['weights']['sha256']}`",
        "| unknown | unknown | 4 | ct 2, mr 2 |",
        "**4 of 4 volumes have an unknown source or licence**",
        "- orientation and axes: RAS+ canonical",
        "- voxel spacing: 1 × 1 × 1 mm",
        "window [-1000.0, 1000.0] HU",
        "z-score over each input crop",
        "| `probe/auc` |",
        "| `val/psnr` |",
        "non-commercial licence",
    ]:
        assert text in card, text
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    auc = next(r["probe/auc"] for r in records if "probe/auc" in r)
    assert f"| `probe/auc` | {auc:.4g} | 2 |" in card

    from pcrl.export import export_encoder

    export_encoder(tiny_run, step=1, output=tmp_path / "one")
    card = (tmp_path / "one/MODEL_CARD.md").read_text()
    assert "step 1" in card and "no evaluation results up to step 1" in card and "probe/auc" not in card


@pytest.mark.integration
def test_export_of_mixed_and_of_unrecorded_provenance(
    tiny_run: Path, prov_shards: Path, other_shards: Path, tmp_path: Path
) -> None:
    """A run whose provenance lists several sources shows each with its licence in the card; a run folder
    from before provenance (no data_provenance.json) still exports, saying unknown in both files; a damaged
    one is refused naming the file."""
    from pcrl.export import export_encoder
    from pcrl.provenance import write_data_provenance

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    pattern = f"{{{prov_shards},{other_shards}}}"
    cfg = load_config(TINY, [f"data.shards={prov_shards}", "data.split=all"])
    write_data_provenance(run, read_manifest(pattern, "all"), cfg)
    _, meta_path = export_encoder(run, output=tmp_path / "mixed")
    assert json.loads(meta_path.read_text())["provenance"]["per_license"] == {
        "CC-BY-4.0": 2, "CC0-1.0": 3, UNKNOWN: 1,
    }  # fmt: skip
    card = (tmp_path / "mixed/MODEL_CARD.md").read_text()
    assert "| other | CC0-1.0 | 3 | ct 2, mr 1 |" in card and "| site-A | CC-BY-4.0 | 2 | ct 2 |" in card
    assert "**1 of 6 volumes have an unknown source or licence**" in card
    assert "every licence above (CC-BY-4.0, CC0-1.0)" in card

    (run / "data_provenance.json").unlink()
    _, meta_path = export_encoder(run, output=tmp_path / "old")
    provenance = json.loads(meta_path.read_text())["provenance"]
    assert provenance["status"] == UNKNOWN and provenance["volumes"] is None and provenance["sources"] == []
    assert (
        "**Unknown.** The run folder has no data_provenance.json"
        in (tmp_path / "old/MODEL_CARD.md").read_text()
    )

    (run / "data_provenance.json").write_text("{")
    with pytest.raises(ValueError, match=r"data_provenance\.json: not valid JSON.*remove the file"):
        export_encoder(run, output=tmp_path / "bad")
    assert not (tmp_path / "bad/encoder.json").exists()
