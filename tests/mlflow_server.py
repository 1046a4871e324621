"""A real ``mlflow server`` for tests: on 127.0.0.1, sqlite store and artifacts in its own folder, started and
stopped by PID (the faults tests stop and restart it; the sweep tests keep one for a module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from processes import stop_group, wait_http

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
        wait_http(f"{self.uri}/health", self.proc, self.log, timeout_s)

    def stop(self) -> None:
        """SIGTERM to the server's process group (uvicorn and its worker), SIGKILL if it lingers."""
        if self.proc is not None:
            stop_group(self.proc, grace_s=30)
        self.proc = None
