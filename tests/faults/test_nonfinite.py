"""A non-finite loss, produced for real: a learning rate of 1e30 blows the weights up after the first update,
so every later loss is NaN. With ``train.max_nonfinite_skips=2`` the run must skip exactly two steps (a
warning naming each, no update, counted in ``metrics.jsonl``) and stop with exit status 3 at the third."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import finish, launch_without_eval

from pcrl import exit_status

pytestmark = pytest.mark.integration


def _states(run_dir: Path, step: int) -> dict[str, Any]:
    """The model-states file of checkpoint ``step`` (the module's tensors and pcrl's client state)."""
    path = run_dir / f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_nonfinite_loss_skips_n_steps_then_stops(sample_shards: Path, tmp_path: Path) -> None:
    """Pins: a skip that still changes the model (momentum applied from stale gradients, BatchNorm statistics
    poisoned by the NaN forward), a skip that is not counted or not named, more skips than allowed, a stop
    without the step or without exit status 3, and a made-up loss logged for a step that had none."""
    log = tmp_path / "nan.log"
    overrides = [
        f"data.shards={sample_shards}",
        f"run.output_dir={tmp_path}",
        "run.name=nan",
        "train.max_steps=8",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=0",
        "train.max_nonfinite_skips=2",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "tracking.enabled=false",
        "tracking.image_every=0",
    ]
    rc = finish(launch_without_eval(overrides, log), log)
    out = log.read_text()
    assert rc == exit_status.NONFINITE, out[-4000:]
    assert "Traceback" not in out
    skipped = [int(s) for s in re.findall(r"the loss is non-finite at step (\d+); skipped", out)]
    assert len(skipped) == 2 and skipped[1] == skipped[0] + 1, out[-4000:]
    stop = skipped[1] + 1
    assert f"pretrain: stopped: the loss became non-finite (nan) at step {stop}" in out, out[-4000:]
    assert "(after 2 skipped, train.max_nonfinite_skips=2)" in out

    run_dir = tmp_path / "nan"
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert records[skipped[0] - 1]["train/nonfinite_skips"] == 0
    assert records[skipped[0]]["train/nonfinite_skips"] == 1
    assert records[skipped[1]]["train/nonfinite_skips"] == 2
    # A step whose only micro-batch was skipped has no loss to average: NaN says so (never a made-up 0);
    # metrics.jsonl writes non-finite values as strings, so the file stays strict JSON.
    assert math.isnan(float(records[skipped[0]]["loss/total"]))
    assert math.isfinite(records[skipped[0] - 1]["loss/total"])
    assert stop not in records, "nothing is logged for the step that stopped the run"

    # A skipped step changes nothing: parameters and buffers saved after the two skips equal those before.
    before, after = _states(run_dir, skipped[0] - 1), _states(run_dir, skipped[1])
    for name, tensor in before["module"].items():
        torch.testing.assert_close(after["module"][name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    # The count survives in the checkpoint, so a relaunch goes on counting.
    assert after["nonfinite_skips"] == 2
