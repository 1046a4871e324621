"""Checkpoint integrity, the metric record of resumed runs and the preemption flag, without an engine:
manifests, the choice of the tag to resume from, pruning, the Tracker's once-per-step records (real MLflow,
local sqlite) and the signal handlers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from pcrl.checkpoint import (
    CHECKPOINT_MANIFEST,
    find_resume_tag,
    prune_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from pcrl.tracking import Tracker


def _tag(ckpt: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    tag = ckpt / f"step_{step:08d}"
    (tag / "sub").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(payload)
    (tag / "sub" / "shard.pt").write_bytes(payload[::-1])
    write_manifest(tag)
    return tag


def test_verify_checkpoint_names_what_is_wrong(tmp_path: Path) -> None:
    """A complete tag verifies; a truncated file, a same-size corruption, a missing file and a missing or
    unreadable manifest are each reported by name (a bad tag must never be loaded silently)."""
    tag = _tag(tmp_path, 3)
    assert verify_checkpoint(tag) is None
    states = tag / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[:-1])
    assert "mp_rank_00_model_states.pt has 699 bytes instead of 700" in verify_checkpoint(tag)
    states.write_bytes(data[:-1] + b"X")
    assert "mp_rank_00_model_states.pt does not match its sha256" in verify_checkpoint(tag)
    states.write_bytes(data)
    (tag / "sub" / "shard.pt").unlink()
    assert verify_checkpoint(tag) == "sub/shard.pt is missing"
    (tag / CHECKPOINT_MANIFEST).write_text("{")
    assert "manifest.json is unreadable" in verify_checkpoint(tag)
    (tag / CHECKPOINT_MANIFEST).unlink()
    assert "no manifest.json (its save did not finish)" in verify_checkpoint(tag)
    assert verify_checkpoint(tmp_path / "step_00000009") == "the folder does not exist"


def test_find_resume_tag_falls_back_to_the_previous_complete_tag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``latest`` decides; when its tag is damaged the newest older tag that verifies is used, with a warning
    naming the bad one, and nothing on disk changes. A newer unfinished tag (no pointer to it) is ignored;
    no usable tag at all is an error that says what to do."""
    ckpt = tmp_path / "checkpoints"
    assert find_resume_tag(tmp_path) is None
    _tag(ckpt, 3)
    six = _tag(ckpt, 6)
    (ckpt / "step_00000009").mkdir()  # a save killed half-way: latest never named it
    (ckpt / "latest").write_text("step_00000006")
    assert find_resume_tag(tmp_path) == "step_00000006"
    (six / "sub" / "shard.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="pcrl.checkpoint"):
        assert find_resume_tag(tmp_path) == "step_00000003"
    assert f"checkpoint {six} is unusable: sub/shard.pt has 0 bytes" in caplog.text
    assert (ckpt / "latest").read_text() == "step_00000006" and six.is_dir()
    (ckpt / "step_00000003" / CHECKPOINT_MANIFEST).unlink()
    with pytest.raises(RuntimeError, match=r"no usable checkpoint .* delete .* to start the run over"):
        find_resume_tag(tmp_path)
    (ckpt / "latest").write_text("garbage")
    with pytest.raises(RuntimeError, match="no usable checkpoint"):
        find_resume_tag(tmp_path)


def test_prune_keeps_the_newest_tags_by_step(tmp_path: Path) -> None:
    """keep=K deletes all but the K highest steps (not by name order or age); keep=0 deletes nothing."""
    for step in (3, 12, 6, 9):
        _tag(tmp_path, step)
    prune_checkpoints(tmp_path, 0)
    assert len(list(tmp_path.glob("step_*"))) == 4
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000009", "step_00000012"]


def test_tracker_records_each_step_once_and_sends_what_mlflow_missed(tmp_path: Path) -> None:
    """A resumed run recomputes the steps after its checkpoint: steps already in metrics.jsonl are not
    written again (here or to MLflow); a last line cut short by a kill is dropped; records that reached
    metrics.jsonl but not MLflow (killed in between) are sent when the run continues."""
    from mlflow.tracking import MlflowClient

    tracker = Tracker(tmp_path, "", "exp")
    run_id = tracker.start("r", {"a": 1})
    for step in (2, 4):
        tracker.log_metrics({"loss/total": float(step), "optim/lr": 0.1}, step)
    tracker.finish("KILLED")
    # The kill came after step 6 reached metrics.jsonl but before MLflow, and while step 8 was being written.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 6, "time": time.time(), "loss/total": 6.0, "optim/lr": 0.1}) + "\n")
        f.write('{"step": 8, "time": 17')

    resumed = Tracker(tmp_path, "", "exp")
    assert resumed.start("r", {"a": 1}, run_id=run_id) == run_id
    assert resumed.last_step == 6
    for step in (4, 6, 8):
        resumed.log_metrics({"loss/total": step + 0.5, "optim/lr": 0.1}, step)
    resumed.finish("FINISHED")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/total"]) for r in records] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.5)]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.5)]
    assert [m.step for m in client.get_metric_history(run_id, "optim/lr")] == [2, 4, 6, 8]
    # Other ranks keep no records.
    Tracker(tmp_path, "", "exp", main=False).log_metrics({"loss/total": 1.0}, 10)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_stop_signals_only_set_a_flag_and_are_restored() -> None:
    """SIGTERM and SIGUSR1 (Slurm's time-limit and preemption signals) must not kill a training process: they
    set the flag the loop checks at each step boundary, and the previous handlers come back afterwards."""
    import os
    import signal

    from pcrl.engine import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        stop = StopSignals()
        stop.install()
        try:
            assert stop.received is None
            os.kill(os.getpid(), sig)
            assert stop.received == sig.name
        finally:
            stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
