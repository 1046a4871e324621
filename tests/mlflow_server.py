"""A real ``mlflow server`` for tests: on 127.0.0.1, sqlite store and artifacts in its own folder, started and
stopped by PID (the faults tests stop and restart it; the sweep tests keep one for a module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pcrl.distributed import free_port


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store in ``folder``; started and stopped by PID, on the
    same port each time (a restart is the same server coming back)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.folder / "artifacts")]
        # Without this MLflow 3 starts job runners that outlive the server.
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with self.log.open("ab") as f:
            # Its own folder as the working directory: MLflow may create files (mlruns/) in the cwd.
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(
            f"mlflow server did not answer in {timeout_s} s:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group (uvicorn and its worker), SIGKILL if it lingers."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
