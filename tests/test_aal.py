"""The AAL-region task on the real Colin27 T1 (Debian's mricron-data, fetched once into the cache): fetching
and preparing it, hemisphere-disjoint lobe patches, the multi-class linear probe (online and its config), and
fine-tuning through launch/finetune.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcrl.config import ConfigError, load_config
from pcrl.finetune import load_finetune_config
from pcrl.probe import LinearProbe, leave_one_case_out
from pcrl.tasks import AAL_LOBES, aal_patches, aal_starts, probe_task, read_aal

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"
AAL = REPO / "configs/finetune/aal_classification.yaml"


def test_colin27_is_fetched_once_and_prepared_like_the_shards(
    aal_cases: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached source verifies and is not downloaded again; the prepared T1 is float16 in [0, 1] on the
    1 mm RAS grid with its 116 AAL regions and the midline at world x = 0."""
    from conftest import samples_dir

    from data_prep.fetch import FetchError, fetch_samples

    log = subprocess.run(
        [sys.executable, "-m", "data_prep.fetch", "--source", "colin27", "--dest", str(samples_dir())],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert log.returncode == 0 and "already in" in log.stdout, log.stdout + log.stderr
    meta = json.loads((aal_cases / "aal.json").read_text())
    assert meta["shape"] == [181, 217, 181] and meta["regions"] == 116 and meta["midline_x"] == 90.0
    with np.load(aal_cases / meta["file"], allow_pickle=False) as npz:
        image, regions = npz["image"], npz["regions"]
        names = [str(n) for n in npz["region_names"]]
        assert image.dtype == np.float16 and image.min() >= 0.0 and image.max() <= 1.0
        # The percentile rule: ~0.5 % of voxels saturate at 1; the atlas's brain is mid-grey, air is 0.
        assert 0.001 < float(np.mean(image == 1.0)) < 0.01
        assert float(np.median(image[regions > 0])) > 0.3 and float(np.median(image[regions == 0])) < 0.05
        assert set(np.unique(regions)) == set(range(117)) and names[0] == "Precentral_L"
        # Left-hemisphere regions lie at x < 90 in RAS+, right ones at x > 90.
        xs = np.nonzero(regions == names.index("Precentral_L") + 1)[0]
        assert xs.max() < 90 and np.nonzero(regions == names.index("Precentral_R") + 1)[0].min() > 90

    # A package apt does not know: apt-get's own reason and what to check, nothing left behind.
    from data_prep.fetch import SOURCES, Source

    missing = Source("nosuch", "pcrl-no-such-package", "*", sdist=False, default=False, installer="apt")
    monkeypatch.setitem(SOURCES, "nosuch", missing)
    with pytest.raises(FetchError, match=r"apt-get download: .*pcrl-no-such-package.*apt-get update"):
        fetch_samples(tmp_path / "dest", sources=["nosuch"])
    # Without apt-get/dpkg-deb on PATH the error says what to install (and nothing is left behind).
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetchError, match=r"apt-get and dpkg-deb not found: .*install apt and dpkg"):
        fetch_samples(tmp_path / "dest", sources=["colin27"])
    assert not any((tmp_path / "dest").glob("colin27*")) and not any((tmp_path / "dest").glob("nosuch*"))


def test_aal_patches_split_by_hemisphere_without_shared_voxels(aal_cases: Path) -> None:
    """Every patch is centred on a voxel of its lobe in its hemisphere, left patches end before the midline
    column and right ones start after it; right patches are mirrored; the same seed gives the same patches."""
    atlas = read_aal(aal_cases)
    size = (16, 16, 8)
    starts, labels, sides = aal_starts(atlas, size, per_class=3, seed=1)
    assert len(starts) == 2 * 3 * len(AAL_LOBES) and set(sides.tolist()) == {0, 1}
    centres = starts + np.array(size) // 2
    for (x, y, z), label, side in zip(centres, labels, sides, strict=True):
        assert int(atlas.classes[x, y, z]) == label and int(atlas.hemisphere[x, y, z]) == side
    assert (starts[sides == 0, 0] + size[0]).max() <= 90 and starts[sides == 1, 0].min() >= 91

    patches = aal_patches(atlas, size, per_class=3, seed=1)
    assert patches.images.shape == (len(starts), 1, *size) and torch.equal(
        patches.cases, torch.from_numpy(sides)
    )
    i = int(np.nonzero(sides == 1)[0][0])
    crop = tuple(slice(int(a), int(a) + s) for a, s in zip(starts[i], size, strict=True))
    assert torch.equal(patches.masks[i, 0], (atlas.classes[crop] + 1).flip(0))
    flat = patches.images.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(len(flat)), atol=1e-4)
    assert torch.equal(aal_patches(atlas, size, per_class=3, seed=1).images, patches.images)
    assert not torch.equal(aal_patches(atlas, size, per_class=3, seed=2).images, patches.images)
    with pytest.raises(ValueError, match="smaller patch size"):
        aal_starts(atlas, (96, 16, 16), per_class=1, seed=0)


def test_multiclass_probe_separates_and_fails() -> None:
    """Six classes: features carrying the class score accuracy and AUC 1; features independent of it score
    near chance (1/6 accuracy)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 6
    cases = torch.arange(120) // 60
    noise = torch.randn(120, 8, generator=g)
    good = torch.cat([noise, torch.nn.functional.one_hot(labels, 6) * 10.0], dim=1)
    assert leave_one_case_out(good, labels, cases) == {"probe/accuracy": 1.0, "probe/auc": 1.0}
    bad = leave_one_case_out(noise, labels, cases)
    assert bad["probe/accuracy"] < 0.4 and bad["probe/auc"] < 0.7


def test_online_probe_defaults_to_aal_when_its_data_is_there(aal_cases: Path, tmp_path: Path) -> None:
    """``probe.task=auto`` picks the AAL task in a folder holding Colin27 and the lesion task elsewhere; the
    probe then scores 6 lobes across hemispheres; lesion names with the AAL task and unknown tasks are
    config errors naming the key."""
    assert probe_task(aal_cases, "auto") == "aal" and probe_task(tmp_path, "auto") == "lesion"
    cfg = load_config(TINY, [f"probe.cases={aal_cases}", "probe.per_class=2", "probe.patch_size=[16,16,16]"])
    probe = LinearProbe.from_config(cfg)
    assert probe is not None
    assert torch.unique(probe.patches.labels).numel() == len(AAL_LOBES)
    assert torch.unique(probe.patches.cases).tolist() == [0, 1]
    from pcrl.model import PCRLv2UNet

    scores = probe(PCRLv2UNet(1, 8, 4))
    assert set(scores) == {"probe/accuracy", "probe/auc"} and all(0 <= v <= 1 for v in scores.values())
    lesion = LinearProbe.from_config(
        load_config(
            TINY,
            [
                f"probe.cases={aal_cases}",
                "probe.task=lesion",
                "probe.names=[lung1,breast1]",
                "probe.per_class=2",
            ],
        )
    )
    assert lesion is not None and torch.unique(lesion.patches.labels).tolist() == [0, 1]
    with pytest.raises(ConfigError, match=r"probe\.names: .*probe\.task=lesion"):
        LinearProbe.from_config(
            load_config(TINY, [f"probe.cases={aal_cases}", "probe.names=[lung1,breast1]"])
        )
    with pytest.raises(ConfigError, match=r"probe\.task"):
        load_config(TINY, ["probe.task=lobes"])
    with pytest.raises(ConfigError, match=r"probe\.cases=.*--task aal"):
        LinearProbe.from_config(load_config(TINY, [f"probe.cases={tmp_path}", "probe.task=aal"]))


def test_aal_finetune_config_errors() -> None:
    cfg = load_finetune_config(AAL)
    assert cfg.task.dataset == "aal" and cfg.task.kind == "classification"
    with pytest.raises(ConfigError, match=r"task\.kind"):
        load_finetune_config(AAL, ["task.kind=segmentation"])
    with pytest.raises(ConfigError, match=r"task\.dataset"):
        load_finetune_config(AAL, ["task.dataset=lobes"])
    with pytest.raises(ConfigError, match=r"task\.names"):
        load_finetune_config(AAL, ["task.names=[lung1,brain1]"])


@pytest.mark.integration
def test_aal_finetune_through_the_launcher(aal_cases: Path, tmp_path: Path) -> None:
    """launch/finetune.py with the AAL config trains one model per hemisphere and reports a 6-class AUC and
    accuracy per seed for the two hemispheres."""
    cmd = [sys.executable, str(REPO / "launch/finetune.py"), "--config", str(AAL), "encoder=none",
           f"task.cases={aal_cases}", "task.per_class=2", "task.patch_size=[16,16,16]", "train.steps=2",
           "train.batch_size=4", "train.seeds=[0,1]", "train.label_fractions=[1.0]", "tracking.enabled=false",
           f"run.output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "aal_classification/results.json").read_text())
    assert results["dataset"] == "aal" and results["classes"] == len(AAL_LOBES)
    assert results["cases"] == "left, right" and results["metric"] == "auc"
    ((row,),) = [results["rows"]]
    assert row["encoder"] == "scratch" and len(row["auc"]["per_seed"]) == 2
    assert all(0.0 <= v <= 1.0 for v in row["auc"]["per_seed"] + row["accuracy"]["per_seed"])
    assert "leave-one-hemisphere-out" in (tmp_path / "aal_classification/results.md").read_text()
