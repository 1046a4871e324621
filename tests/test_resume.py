"""Exact resume and preemption, end to end: real runs of launch/pretrain.py are killed (SIGKILL) or preempted
(SIGTERM/SIGUSR1) at some step, launched again on the same run folder, and must end with parameters bitwise
identical to an uninterrupted run, one MLflow run and a metric history without gaps or duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from runs import finish, launch_pretrain, rank_process, read_records, wait_for

from pcrl import exit_status

pytestmark = pytest.mark.integration

STEPS = 10


def _overrides(shards: Path, out: Path, name: str) -> list[str]:
    return [
        f"data.shards={shards}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"train.max_steps={STEPS}",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=2",
        "data.num_workers=2",
        "tracking.image_every=0",
    ]


def _start(nproc: int, overrides: list[str], log: Path) -> subprocess.Popen[bytes]:
    return launch_pretrain(overrides, log, nproc)


def _run(nproc: int, overrides: list[str], log: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Run to the end (or wait for ``proc``, already started with these arguments); it must succeed."""
    rc = finish(proc or _start(nproc, overrides, log), log, timeout_s=600)
    assert rc == 0, log.read_text()[-4000:]


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints/latest"
    return int(pointer.read_text().removeprefix("step_")) if pointer.is_file() else 0


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_records(run_dir)] if path.is_file() else []


def _final_module(run_dir: Path) -> dict[str, torch.Tensor]:
    # weights_only: the client state must stay plain data (no pickled objects in checkpoints).
    state = torch.load(
        run_dir / f"checkpoints/step_{STEPS:08d}/mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )
    return state["module"]


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """Bitwise equal parameters and buffers, equal losses at every logged step, one MLflow run whose history
    is exactly [2, 4, ..., STEPS]."""
    a, b = _final_module(resumed), _final_module(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    steps = list(range(2, STEPS + 1, 2))
    records, expected = read_records(resumed), read_records(reference)
    assert [r["step"] for r in records] == steps
    for r, e in zip(records, expected, strict=True):
        assert {k: v for k, v in r.items() if k.startswith("loss/")} == {
            k: v for k, v in e.items() if k.startswith("loss/")
        }, r["step"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{resumed / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("loss/total", "optim/lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps, key


def test_resume_after_sigkill_one_process_is_bitwise_exact(sample_shards: Path, tmp_path: Path) -> None:
    """One process, two loader workers: SIGKILL to the whole process tree after the step-6 checkpoint and the
    step-6 log, then the step-6 checkpoint is truncated on disk. The relaunch must notice (checksums), warn
    naming it, resume from step 3, recompute steps 4-6 without logging them twice, and end bitwise equal to
    an uninterrupted run. Pins: a missing RNG/data-position/optimizer state, a loader that restarts its
    workers at the wrong sample, duplicated or missing metric records, and resuming from a damaged file."""
    reference, run_dir = tmp_path / "reference", tmp_path / "cut"
    # The uninterrupted run goes alongside (same thread counts, so the same arithmetic): less wall time.
    ref_args = (1, _overrides(sample_shards, tmp_path, "reference"), tmp_path / "reference.log")
    ref = _start(*ref_args)

    log = tmp_path / "cut.log"
    proc = _start(1, _overrides(sample_shards, tmp_path, "cut"), log)
    wait_for(
        "the kill point",
        lambda: _latest_step(run_dir) >= 6 and 6 in _logged_steps(run_dir),
        proc,
        log,
        timeout_s=600,
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"
    states = run_dir / f"checkpoints/step_{killed_at:08d}/mp_rank_00_model_states.pt"
    with states.open("r+b") as f:
        f.truncate(states.stat().st_size // 2)

    _run(1, _overrides(sample_shards, tmp_path, "cut"), log)
    _run(*ref_args, proc=ref)
    out = log.read_text()
    assert f"checkpoint {states.parent} is unusable: mp_rank_00_model_states.pt has" in out
    assert f"resuming {run_dir} from step {killed_at - 3}" in out
    _assert_same_run(run_dir, reference)
    # Only the last train.keep_checkpoints=2 tags remain.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000009",
        "step_00000010",
    ]


def test_preemption_then_sigkill_two_processes_is_bitwise_exact(sample_shards: Path, tmp_path: Path) -> None:
    """Two ranks under the deepspeed launcher. SIGUSR1 to rank 1 alone (as Slurm's signal may reach one task
    first): both ranks must agree, save a checkpoint at the next step boundary and exit 75. The relaunch is
    then SIGKILLed after its next checkpoint, and the third launch must end bitwise equal to an
    uninterrupted run, with one MLflow run and no gaps or duplicates in its history."""
    reference, run_dir = tmp_path / "reference", tmp_path / "cut"
    # Not alongside, as in the one-process test: four processes on two cores were slower than in turn.
    _run(2, _overrides(sample_shards, tmp_path, "reference"), tmp_path / "reference.log")

    log = tmp_path / "cut.log"
    proc = _start(2, _overrides(sample_shards, tmp_path, "cut"), log)
    wait_for("the kill point", lambda: 4 in _logged_steps(run_dir), proc, log, timeout_s=600)
    os.kill(rank_process(proc, 1), signal.SIGUSR1)
    assert finish(proc, log, timeout_s=600) == exit_status.PREEMPTED, log.read_text()[-4000:]
    preempted_at = _latest_step(run_dir)
    # Saved at the boundary after the signal, off the every-3-steps schedule.
    assert preempted_at in (4, 5), preempted_at
    message = f"preempted: a signal on another rank received; saved a checkpoint at step {preempted_at}"
    assert message in log.read_text()

    proc = _start(2, _overrides(sample_shards, tmp_path, "cut"), log)
    wait_for("the kill point", lambda: _latest_step(run_dir) > preempted_at, proc, log, timeout_s=600)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _latest_step(run_dir) < STEPS, "the run finished before it could be killed"

    _run(2, _overrides(sample_shards, tmp_path, "cut"), log)
    _assert_same_run(run_dir, reference)
    # Every rank's own state is in the checkpoint (DeepSpeed writes rank 0's client state alone).
    state = torch.load(
        run_dir / f"checkpoints/step_{STEPS:08d}/mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )
    assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]
    assert state["ranks"][0]["generator"].tolist() != state["ranks"][1]["generator"].tolist()
    assert json.loads((run_dir / "checkpoints/step_00000010/manifest.json").read_text())["files"]


def test_resume_with_compile_is_bitwise_exact_and_never_recompiles(
    sample_shards: Path, tmp_path: Path
) -> None:
    """``engine.compile=true``, one process: SIGKILL after the step-6 checkpoint, relaunch (which compiles
    again, from torch's cache), and the run must end bitwise equal to an uninterrupted compiled run. Every
    log step of both runs reports the same three graphs (view 1, view 2 without its restoration, the local
    views): a recompile for another scale draw, or any other, shows as more. Pins a compiled model whose
    state-dict keys, checkpoints or arithmetic differ between launches."""
    reference, run_dir = tmp_path / "reference", tmp_path / "cut"
    compiled = "engine.compile=true"
    ref_args = (1, [*_overrides(sample_shards, tmp_path, "reference"), compiled], tmp_path / "reference.log")
    ref = _start(*ref_args)

    log = tmp_path / "cut.log"
    cut = [*_overrides(sample_shards, tmp_path, "cut"), compiled]
    proc = _start(1, cut, log)
    wait_for("the kill point", lambda: _latest_step(run_dir) >= 6, proc, log, timeout_s=900)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"

    _run(1, cut, log)
    _run(*ref_args, proc=ref)
    assert f"resuming {run_dir} from step {killed_at}" in log.read_text()
    assert "compile on" in log.read_text()
    _assert_same_run(run_dir, reference)
    for folder in (run_dir, reference):
        assert {r["compile/graphs"] for r in read_records(folder)} == {3.0}, folder
