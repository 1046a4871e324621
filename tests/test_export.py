"""Encoder export from real DeepSpeed checkpoints: files, metadata, exact weights, clear errors, no pickle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "launch/export.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _module(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def test_export_writes_the_encoder_of_the_latest_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    """The exported tensors are exactly the checkpoint's ``model.encoder.*`` tensors, the JSON describes the
    architecture and preprocessing, and ``pcrl.load_encoder`` gives the pretrained U-Net's encoder outputs."""
    import pcrl
    from pcrl.model import PCRLv2UNet

    proc = _export(str(tiny_run), "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["architecture"] == {
        "name": "PCRLv2Encoder",
        "in_channels": 1,
        "base_channels": 8,
        "depth": 4,
        "norm": "batch",
        "stage_channels": [16, 32, 64, 128],
        "input_multiple": 8,
    }
    pre = meta["preprocessing"]
    assert pre["ct_window_hu"] == [-1000.0, 1000.0] and pre["input_spacing_mm"] == [1.0, 1.0, 1.0]
    assert "(x, y, z)" in pre["axis_order"]
    assert meta["training"]["step"] == 2 and len(meta["training"]["config_hash"]) == 16

    module = _module(tiny_run, 2)
    encoder = pcrl.load_encoder(tmp_path)
    state = encoder.state_dict()
    expected = {k.removeprefix("model."): v for k, v in module.items() if k.startswith("model.encoder.")}
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)

    unet = PCRLv2UNet(1, 8, 4)
    unet.load_state_dict({k.removeprefix("model."): v for k, v in module.items() if k.startswith("model.")})
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        for a, b in zip(encoder(x), unet.eval().encoder_features(x), strict=True):
            assert torch.equal(a, b)


def test_export_step_and_fallback(tiny_run: Path, tmp_path: Path) -> None:
    """``--step 1`` exports that checkpoint; a missing step exits 2 and lists the steps there are; a corrupt
    latest checkpoint makes the default export fall back to the previous verified one."""
    proc = _export(str(tiny_run), "--step", "1", "--output", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "one/encoder.json").read_text())["training"]["step"] == 1

    proc = _export(str(tiny_run), "--step", "7", "--output", str(tmp_path / "seven"))
    assert proc.returncode == 2
    assert "step 7" in proc.stderr and "Steps with a checkpoint: 1, 2" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "seven/encoder.json").exists()

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    states = run / "checkpoints/step_00000002/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-100])  # cut short, as by a full disk
    proc = _export(str(run))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "encoder.json").read_text())["training"]["step"] == 1


def test_load_encoder_names_what_does_not_match(tiny_run: Path, tmp_path: Path) -> None:
    """A JSON that promises another width lists every mis-shaped tensor with both shapes; weights from
    another export are refused by their sha256; a folder without an export says how to make one."""
    from pcrl import load_encoder
    from pcrl.export import EncoderLoadError, load_encoder_state
    from pcrl.model import PCRLv2Encoder

    assert _export(str(tiny_run), "--output", str(tmp_path)).returncode == 0
    meta_path = tmp_path / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"]["base_channels"] = 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(EncoderLoadError) as e:
        load_encoder(tmp_path)
    assert "encoder.0.0.conv.weight: " in str(e.value) and "(8, 1, 3, 3, 3)" in str(e.value)
    assert "(16, 1, 3, 3, 3)" in str(e.value)

    other = PCRLv2Encoder(1, 8, 4).state_dict()
    del other["encoder.3.1.conv.bias"]
    other["extra.weight"] = torch.zeros(1)
    with pytest.raises(EncoderLoadError, match=r"lacks: encoder\.3\.1\.conv\.bias[\s\S]*no place for: extra"):
        load_encoder_state(PCRLv2Encoder(1, 8, 4), other)

    assert _export(str(tiny_run), "--step", "1", "--output", str(tmp_path / "one")).returncode == 0
    shutil.copy(tmp_path / "one/encoder.safetensors", tmp_path / "encoder.safetensors")
    assert _export(str(tiny_run), "--output", str(tmp_path / "two")).returncode == 0
    shutil.copy(tmp_path / "one/encoder.safetensors", tmp_path / "two/encoder.safetensors")
    with pytest.raises(EncoderLoadError, match="sha256"):
        load_encoder(tmp_path / "two")
    with pytest.raises(FileNotFoundError, match=r"launch/export\.py"):
        load_encoder(tmp_path / "nothing")


def test_pretraining_logs_the_online_probe(tiny_run: Path) -> None:
    """The probe runs with the evaluation hook: probe/accuracy and probe/auc are in metrics.jsonl (and so in
    MLflow) at the evaluation step, in [0, 1]."""
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    at_eval = [r for r in records if r["step"] == 2]
    assert at_eval, records
    for key in ("probe/accuracy", "probe/auc"):
        assert 0.0 <= at_eval[0][key] <= 1.0, at_eval[0]
    assert "probe/auc" not in records[0] or records[0]["step"] == 2
