"""A rank of a 2-process run killed with SIGKILL mid-run, for real. The other rank must stop within a bounded
time (never hang in a collective), with a non-zero status and a message naming the lost rank and the
checkpoint a relaunch resumes from.

Two ways of starting the ranks are covered: as Slurm starts them (each process launched by itself with
RANK/WORLD_SIZE, nobody to kill the survivor, so it must notice on its own; rank 1 is killed and rank 0,
which hosts the rendezvous store, names it), and under the ``deepspeed`` launcher (rank 0 is killed, so
the store is gone too; the launcher stops the survivor and exits with the dead rank's status)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import NO_EVAL, REPO, TINY, finish, launch_without_eval, launcher_env, rank_process, wait_for

from pcrl import exit_status
from pcrl.distributed import free_port

pytestmark = pytest.mark.integration

# What bounds the survivor's exit when a peer stops answering without closing its sockets; a SIGKILLed peer
# closes them, so the survivor notices at once and the roll call (10 s) is all the waiting.
DIST_TIMEOUT_S = 60
# Start-up of two processes on a loaded 2-core machine is slow; the bound that matters is after the kill.
STOP_WITHIN_S = 150


def _overrides(shards: Path, out: Path) -> list[str]:
    return [
        f"data.shards={shards}",
        f"run.output_dir={out}",
        "run.name=lost",
        "train.max_steps=400",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "tracking.enabled=false",
        "tracking.image_every=0",
        f"engine.dist_timeout_s={DIST_TIMEOUT_S}",
    ]


def _latest(run_dir: Path) -> str:
    pointer = run_dir / "checkpoints/latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


@pytest.mark.timeout(600)
def test_slurm_style_ranks_survivor_names_the_killed_rank(sample_shards: Path, tmp_path: Path) -> None:
    """Pins: a survivor that hangs in the gradient all-reduce (no collective timeout, or an error swallowed),
    one that dies with gloo's socket traceback instead of naming the rank, and a status Slurm cannot tell
    from a finished run."""
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        env = {
            **launcher_env(),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY), NO_EVAL]
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("wb") as f:
            procs.append(
                subprocess.Popen(
                    [*cmd, *_overrides(sample_shards, tmp_path)],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    survivor, victim = procs
    run_dir = tmp_path / "lost"
    try:
        wait_for("the step-2 checkpoint", lambda: _latest(run_dir) == "step_00000002", survivor, logs[0], 400)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        rc = finish(survivor, logs[0], STOP_WITHIN_S)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = logs[0].read_text()
    assert rc == exit_status.RANK_LOST, out[-4000:]
    assert "pretrain: stopped: rank 1 was lost (its process ended or stopped answering" in out, out[-4000:]
    # The pointer may have moved past step 2 before the kill landed; the message names the one it holds.
    assert f"Launching the same command again resumes from checkpoint {_latest(run_dir)}" in out
    assert "Traceback" not in out


@pytest.mark.timeout(600)
def test_deepspeed_launcher_stops_when_rank0_is_killed(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 0 (the rendezvous store's host) SIGKILLed under the deepspeed launcher: the launcher must end,
    non-zero, and the survivor's message must name rank 0."""
    log = tmp_path / "ds.log"
    run_dir = tmp_path / "lost"
    proc = launch_without_eval(_overrides(sample_shards, tmp_path), log, nproc=2)
    wait_for("the step-2 checkpoint", lambda: _latest(run_dir) == "step_00000002", proc, log, 400)
    os.kill(rank_process(proc, 0), signal.SIGKILL)
    rc = finish(proc, log, STOP_WITHIN_S)
    out = log.read_text()
    assert rc != 0, out[-4000:]
    assert "exits with return code = -9" in out, out[-4000:]
    assert "pretrain: stopped: rank 0 was lost" in out, out[-4000:]
