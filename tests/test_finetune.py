"""Fine-tuning: the skip-connected U-Net, the losses and sliding window, the config, and the whole protocol
through launch/finetune.py on real labelled cases (pretrained export against scratch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcrl.config import ConfigError
from pcrl.finetune import (
    PatchClassifier,
    SegmentationUNet,
    dice_ce_loss,
    load_finetune_config,
    sliding_window,
)
from pcrl.model import PCRLv2Encoder, PCRLv2UNet

REPO = Path(__file__).resolve().parents[1]
CLS = REPO / "configs/finetune/lesion_classification.yaml"
SEG = REPO / "configs/finetune/lesion_segmentation.yaml"


def test_segmentation_unet_uses_skips_and_the_pretraining_encoder_keys() -> None:
    """Logits at input size; every parameter gets a gradient; the finest encoder stage reaches the output
    directly (a skip), and the encoder's keys are those of the pretraining U-Net."""
    encoder = PCRLv2Encoder(1, 4, 3)
    model = SegmentationUNet(encoder)
    x = torch.randn(2, 1, 16, 16, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 2, 16, 16, 8)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.blocks[-1][0].conv.in_channels == 16 + 8  # upsampled (16) + skip of stage 0 (8)
    assert set(encoder.state_dict()) == {
        k for k in PCRLv2UNet(1, 4, 3).state_dict() if k.startswith("encoder.")
    }
    assert PatchClassifier(PCRLv2Encoder(1, 4, 3))(x.detach()).shape == (2, 2)


def test_dice_ce_loss_and_sliding_window() -> None:
    """A confident correct prediction has a near-zero loss, a wrong one a large loss; sliding-window
    probabilities cover every voxel of a region whose size is no multiple of the window and sum to 1."""
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5, 2:5] = 1
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 4, 1, 2, 3).float() * 20
    assert dice_ce_loss(logits, target) < 0.01
    assert dice_ce_loss(-logits, target) > 2.0

    model = PatchClassifier(PCRLv2Encoder(1, 4, 2))
    seg = SegmentationUNet(PCRLv2Encoder(1, 4, 2)).eval()
    probs = sliding_window(seg, torch.rand(21, 18, 9), (8, 8, 4), overlap=0.5)
    assert probs.shape == (2, 21, 18, 9)
    assert torch.allclose(probs.sum(0), torch.ones(21, 18, 9), atol=1e-5)
    del model


def test_finetune_config_overrides_and_errors() -> None:
    """``encoder=PATH`` and dotted overrides go through the typed loader; typos name the key."""
    cfg = load_finetune_config(
        CLS, ["encoder=runs/x", "train.seeds=[0,1]", "train.label_fractions=[1.0,0.1]"]
    )
    assert cfg.encoder == "runs/x" and cfg.train.seeds == [0, 1] and cfg.task.kind == "classification"
    with pytest.raises(ConfigError, match=r"train\.step: unknown key. Did you mean 'steps'"):
        load_finetune_config(CLS, ["train.step=3"])
    with pytest.raises(ConfigError, match=r"task\.kind"):
        load_finetune_config(CLS, ["task.kind=detection"])
    with pytest.raises(ConfigError, match=r"train\.label_fractions"):
        load_finetune_config(CLS, ["train.label_fractions=[0]"])


def _finetune(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "launch/finetune.py"), "--config", str(config), *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_finetune_pretrained_against_scratch(tiny_run: Path, labelled_cases: Path, tmp_path: Path) -> None:
    """Classification from an exported encoder trains the scratch baseline too: rows for both, a paired
    gain, results.json/results.md, and the numbers in the run's MLflow store. Segmentation from scratch
    reports a Dice per label fraction. A bad encoder path exits 2 with the key in the message."""
    export = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/export.py"), str(tiny_run), "--output", str(export)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    small = [f"task.cases={labelled_cases}", "task.names=[lung1,brain2,breast1]", "task.per_class=3",
             "train.steps=2", "train.batch_size=4", f"run.output_dir={tmp_path}"]  # fmt: skip
    proc = _finetune(CLS, f"encoder={export}", "train.seeds=[0,1]", "train.label_fractions=[1.0]", *small)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "lesion_classification"
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["encoder"], r["label_fraction"]) for r in results["rows"]] == [
        ("pretrained", 1.0),
        ("scratch", 1.0),
    ]
    for row in results["rows"]:
        assert len(row["auc"]["per_seed"]) == 2 and 0.0 <= row["auc"]["mean"] <= 1.0
    (gain,) = results["gains"]
    pre, scratch = (r["auc"]["per_seed"] for r in results["rows"])
    assert gain["gain"] == pytest.approx(sum(a - b for a, b in zip(pre, scratch, strict=True)) / 2)
    table = (run_dir / "results.md").read_text()
    assert "| pretrained | 1 |" in table and "| scratch | 1 |" in table and "gain" in table

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcrl-finetune").experiment_id])
    assert run.data.metrics["pretrained/auc/frac_1/mean"] == pytest.approx(results["rows"][0]["auc"]["mean"])
    assert "gain/auc/frac_1" in run.data.metrics and run.data.params["encoder"] == str(export)

    proc = _finetune(SEG, "encoder=none", "train.seeds=[0]", "train.label_fractions=[0.5]", *small)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seg = json.loads((tmp_path / "lesion_segmentation/results.json").read_text())
    ((row,),) = [seg["rows"]]
    assert row["encoder"] == "scratch" and 0.0 <= row["dice"]["mean"] <= 1.0 and seg["gains"] == []

    proc = _finetune(CLS, f"encoder={tmp_path / 'missing'}", *small)
    assert proc.returncode == 2 and "encoder=" in proc.stderr and "Traceback" not in proc.stderr
