"""A real Slurm cluster for the tests: Debian's munged, slurmctld and two slurmd "nodes" (n1, n2) on this
machine, with their own munge key, ports and slurm.conf in a temporary folder (nothing under /etc is
touched). Shared by the tests of the project's sbatch scripts (tests/test_slurm.py, tests/test_tune_slurm.py)
through the ``slurm`` fixture of conftest.py.

Needs root and the Slurm binaries (``apt-get install slurmctld slurmd slurm-client munge``); skipped
without them, unless ``CI`` is set (``.ci/run`` installs them), where their absence is a failure. The
harness stops every daemon it started, by PID.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pcrl.distributed import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")


def why_not() -> str | None:
    """Why the test cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def require_slurm() -> None:
    """Skip the calling test when the cluster cannot start here (fail instead under CI)."""
    reason = why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the Slurm tests, but {reason}; .ci/run installs Slurm first")
        pytest.skip(reason)


class SlurmCluster:
    """munged + slurmctld + two slurmd on 127.0.0.1, configured in ``root``; ``env`` points clients at it."""

    NODES = ("n1", "n2")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("wb")
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.daemons.append((name, proc))

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [(n, p.returncode) for n, p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.root / "log").iterdir())
                )
                raise RuntimeError(
                    f"the test Slurm cluster did not come up ({what}; exited: {dead}):\n{logs}"
                )
            time.sleep(0.2)

    def start(self) -> None:
        root = self.root
        for sub in ("log", "state", "spool"):
            (root / sub).mkdir()
        # munged checks that its key and folders are private.
        root.chmod(0o700)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = root / "munge.sock"
        self._daemon(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}",
             f"--log-file={root / 'log' / 'munged.log'}"],
        )  # fmt: skip
        self._wait("munged socket", sock.exists)
        ctld_port, *node_ports = (free_port() for _ in range(1 + len(self.NODES)))
        # pretrain.sbatch derives MASTER_PORT from the job id: two test clusters on one machine (a developer's
        # and a CI run) both numbering jobs from 1 would give their concurrent jobs the same port.
        first_job = random.randrange(1000, 12000)
        host = socket.gethostname()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 State=UNKNOWN"
            for n, p in zip(self.NODES, node_ports, strict=True)
        )
        self.conf.write_text(
            f"""ClusterName=pcrltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}/%n
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd"}.%n.pid
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd"}.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=30
FirstJobId={first_job}
SchedulerParameters=bf_interval=2,sched_interval=2
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=10
{nodes}
PartitionName=pcrl Nodes={",".join(self.NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait("slurmctld answering", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0)
        for node in self.NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node])

        def idle() -> bool:
            out = self.run(["sinfo", "--noheader", "--format=%T %D"], check=False).stdout.split()
            return out == ["idle", str(len(self.NODES))]

        self._wait("both nodes idle", idle)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons (newest first) by PID."""
        if self.daemons:
            self.run(["scancel", "--partition=pcrl"], check=False)
            deadline = time.monotonic() + 30
            while (
                self.run(["squeue", "--noheader"], check=False).stdout.strip() and time.monotonic() < deadline
            ):
                time.sleep(0.5)
        for _, proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job_state(self, job: str) -> str:
        out = self.run(["scontrol", "show", "job", job], check=False).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")


def wait_job(
    slurm: SlurmCluster, job: str, proc: subprocess.Popen[str], log: Path, timeout: float = 600
) -> int:
    """Wait for the ``sbatch --wait`` of ``job`` to return (through requeues) and check that the job
    COMPLETED; returns sbatch's status. Cancels the job and fails the test after ``timeout`` seconds."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        slurm.run(["scancel", job], check=False)
        proc.wait()
        pytest.fail(
            f"job {job} did not end in {timeout:.0f} s:\n{log.read_text()[-4000:] if log.exists() else ''}"
        )
    # sbatch --wait also returns 0 for a job cancelled before it ran: check the state itself.
    assert slurm.job_state(job) == "COMPLETED", (slurm.job_state(job), log.read_text()[-4000:])
    return rc
