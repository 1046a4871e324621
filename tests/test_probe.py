"""The online linear probe: its leave-one-case-out scoring, its fixed real patches, its config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcrl.config import ConfigError, load_config
from pcrl.model import PCRLv2UNet
from pcrl.probe import LinearProbe, leave_one_case_out, probe_patches
from pcrl.tasks import lesion_patches, read_cases

TINY = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny.yaml"


def test_leave_one_case_out_separates_and_fails() -> None:
    """Features that carry the label score AUC 1; features independent of it score near chance (the probe
    can fail); a held-out case never trains its own classifier."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 30)
    cases = torch.arange(60) // 20
    noise = torch.randn(60, 5, generator=g)
    good = noise.clone()
    good[:, 0] += 10.0 * labels
    assert leave_one_case_out(good, labels, cases) == {"probe/accuracy": 1.0, "probe/auc": 1.0}
    bad = leave_one_case_out(noise, labels, cases)
    assert bad["probe/auc"] < 0.8 and bad["probe/accuracy"] < 0.8
    # A case whose label depends on it only: learnable inside a case, not across cases.
    flipped = noise.clone()
    flipped[:, 0] += 10.0 * torch.where(cases == 0, labels, 1 - labels)
    assert leave_one_case_out(flipped, labels, cases)["probe/auc"] < 0.8


def test_lesion_patches_hold_what_their_labels_say(labelled_cases: Path) -> None:
    """Lesion patches have a lesion voxel at their centre; background patches none anywhere; patches are
    z-normalised and the same for the same seed."""
    (case,) = read_cases(labelled_cases, (-1000, 1000), ["lung1"])
    p = lesion_patches(case, (32, 32, 16), per_class=4, seed=3)
    assert p.images.shape == (8, 1, 32, 32, 16) and p.labels.tolist() == [1] * 4 + [0] * 4
    assert all(int(m.sum()) > 0 for m in p.masks[:4]) and int(p.masks[4:].sum()) == 0
    flat = p.images.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(8), atol=1e-4)
    assert torch.allclose(flat.std(1), torch.ones(8), atol=1e-3)
    assert torch.equal(lesion_patches(case, (32, 32, 16), per_class=4, seed=3).images, p.images)


def test_probe_is_deterministic_and_leaves_the_model_alone(labelled_cases: Path) -> None:
    """Two calls on the same weights give the same numbers; the training model keeps its mode and buffers;
    a PCRLv2UNet and an encoder with the same weights score the same."""
    patches = probe_patches(
        str(labelled_cases), (-1000, 1000), (32, 32, 16), 3, 0, ["lung1", "brain2", "breast1"]
    )
    probe = LinearProbe(patches)
    model = PCRLv2UNet(1, 8, 4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = probe(model)
    assert set(first) == {"probe/accuracy", "probe/auc"} and all(0 <= v <= 1 for v in first.values())
    assert probe(model) == first
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_probe_config_errors_name_the_key(labelled_cases: Path, tmp_path: Path) -> None:
    """Bad probe settings stop the run before training with the key in the message; no cases = no probe."""
    assert LinearProbe.from_config(load_config(TINY)) is None
    with pytest.raises(ConfigError, match=r"probe\.cases"):
        LinearProbe.from_config(load_config(TINY, [f"probe.cases={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"probe\.patch_size"):
        LinearProbe.from_config(
            load_config(TINY, [f"probe.cases={labelled_cases}", "probe.patch_size=[20,32,16]"])
        )
    with pytest.raises(ConfigError, match=r"probe\.names"):
        load_config(TINY, ["probe.names=[lung1]"])
