"""Run helpers the tests share: launch ``launch/pretrain.py`` on the tiny config (plain ``python`` or the real
``deepspeed`` launcher), wait for a condition or the end of a run without hanging the suite, and read the run
folder's metric records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pcrl.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"

# No fault case involves the periodic evaluation; rendering its held-out views costs every launch seconds.
NO_EVAL = "eval.every=0"


def launcher_env() -> dict[str, str]:
    """This process's environment for a launched run: CPU DeepSpeed, passive OpenMP waits, unbuffered
    output, and none of the rendezvous variables of an enclosing launcher (each run forms its own world)."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch_pretrain(overrides: list[str], log: Path, nproc: int = 1) -> subprocess.Popen[bytes]:
    """launch/pretrain.py on the tiny config in a new session (its own process group, so the whole tree can be
    signalled or killed at once): plain ``python`` for one process, the ``deepspeed`` launcher for more.
    Output is appended to ``log``."""
    script = [str(REPO / "launch/pretrain.py"), "--config", str(TINY), *overrides]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), *script]
    with log.open("ab") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=launcher_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def launch_without_eval(overrides: list[str], log: Path, nproc: int = 1) -> subprocess.Popen[bytes]:
    """:func:`launch_pretrain` without the periodic evaluation unless ``overrides`` turn it back on."""
    return launch_pretrain([NO_EVAL, *overrides], log, nproc)


def run_deepspeed(nproc: int, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """launch/pretrain.py on the tiny config under the ``deepspeed`` launcher, to the end; output captured."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    cmd += [str(REPO / "launch/pretrain.py"), "--config", str(TINY), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)


def common_overrides(shards: Path, out: Path, name: str, steps: int) -> list[str]:
    """A short run of ``steps`` steps on ``shards`` in ``out/name``, logging every 2 steps, recording the
    sample keys."""
    return [
        f"data.shards={shards}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"train.max_steps={steps}",
        "train.log_every=2",
        "data.num_workers=1",
        "tracking.sample_keys=true",
    ]


def read_records(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(
    what: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    timeout_s: float = 300,
) -> None:
    """Poll ``ready`` until true; fail naming ``what`` if ``proc`` ends first or the time runs out (then its
    process group is killed)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> int:
    """Wait for the run and return its status; kill its group and fail if it does not end in time (a hang)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within {timeout_s} s (a hang):\n{log.read_text()[-4000:]}")


def rank_process(launcher: subprocess.Popen[bytes], rank: int) -> int:
    """The PID of rank ``rank``'s pretrain.py under a ``deepspeed`` launcher process."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        cmdline = child.cmdline()
        if any(a.endswith("pretrain.py") for a in cmdline) and f"--local_rank={rank}" in cmdline:
            return child.pid
    raise AssertionError(f"no rank {rank} process under the launcher")
