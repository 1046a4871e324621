"""Fault-injection helpers: a real MLflow server that a test stops and restarts, and a launched run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from test_pretrain import launch_pretrain


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server not yet started; whatever the test leaves running is stopped after it."""
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


# No fault case involves the periodic evaluation; rendering its held-out views costs every launch seconds.
NO_EVAL = "eval.every=0"


def launch(overrides: list[str], log: Path, nproc: int = 1) -> subprocess.Popen[bytes]:
    """:func:`test_pretrain.launch_pretrain` without the periodic evaluation unless ``overrides`` turn it
    back on."""
    return launch_pretrain([NO_EVAL, *overrides], log, nproc)


def wait_for(
    what: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    timeout_s: float = 300,
) -> None:
    """Poll ``ready`` until true; fail naming ``what`` if ``proc`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> int:
    """Wait for the run; kill its group and fail if it does not end in time (a hang)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within {timeout_s} s (a hang):\n{log.read_text()[-4000:]}")
