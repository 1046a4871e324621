"""Process helpers of the tests that start services: stop a process group by PID, wait for an HTTP health
check."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a process started with start_new_session=True and everything it started (its group): SIGTERM,
    then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace_s)
        except ProcessLookupError:
            pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Wait until ``url`` answers 200; fail with the end of ``log`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
