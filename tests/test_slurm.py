"""launch/slurm/pretrain.sbatch on a real Slurm cluster started by the tests: Debian's munged, slurmctld and
two slurmd "nodes" (n1, n2) on this machine, with their own munge key, ports and slurm.conf in a temporary
folder (nothing under /etc is touched). The project's own sbatch script is submitted with tiny settings.

Needs root and the Slurm binaries (``apt-get install slurmctld slurmd slurm-client munge``); skipped
without them, unless ``CI`` is set (``.ci/run`` installs them), where their absence is a failure. The
harness stops every daemon it started, by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_pretrain import REPO, TINY, _records

from pcrl.distributed import free_port

pytestmark = pytest.mark.integration

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
SBATCH = REPO / "launch/slurm/pretrain.sbatch"


def _why_not() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = _why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the Slurm tests, but {reason}; .ci/run installs Slurm first")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(
    slurm: SlurmCluster, out: Path, name: str, overrides: list[str]
) -> tuple[str, subprocess.Popen[str]]:
    """``sbatch --wait`` the project's script on both nodes, CPU only; returns the job id and the waiting
    sbatch (which returns when the job has ended for good, through requeues)."""
    cmd = [
        "sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
        "--cpus-per-task=1", "--time=10", "--partition=pcrl", f"--output={out / name}.out", str(SBATCH),
        "--config", str(TINY), f"run.output_dir={out}", f"run.name={name}", "data.num_workers=1",
        "tracking.image_every=0", *overrides,
    ]  # fmt: skip
    env = {**slurm.env, "PYTHON": sys.executable, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    job = proc.stdout.readline().strip()
    assert job.isdigit(), (job, proc.stderr.read() if proc.stderr else "")
    return job, proc


def _wait_job(slurm: SlurmCluster, job: str, proc: subprocess.Popen[str], log: Path) -> int:
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        slurm.run(["scancel", job], check=False)
        proc.wait()
        pytest.fail(f"job {job} did not end in 600 s:\n{log.read_text()[-4000:] if log.exists() else ''}")
    # sbatch --wait also returns 0 for a job cancelled before it ran: check the state itself.
    assert slurm.job_state(job) == "COMPLETED", (slurm.job_state(job), log.read_text()[-4000:])
    return rc


def test_slurm_two_nodes_train_as_one_world(slurm: SlurmCluster, sample_shards: Path, tmp_path: Path) -> None:
    """sbatch on 2 nodes, one CPU task each: the tasks get ranks 0 and 1 of a world of 2 on n1 and n2 from
    SLURM_* alone, train together (both ranks' states in the checkpoint) and the job completes."""
    job, proc = _submit(
        slurm, tmp_path, "two", [f"data.shards={sample_shards}", "train.max_steps=2", "train.log_every=1"]
    )
    log = tmp_path / "two.out"
    assert _wait_job(slurm, job, proc, log) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "pcrl: rank 0 of 2 on node n1 (local rank 0)" in out
    assert "pcrl: rank 1 of 2 on node n2 (local rank 0)" in out
    assert "2 process(es)" in out
    assert [r["step"] for r in _records(tmp_path / "two")] == [1, 2]
    state = torch.load(
        tmp_path / "two/checkpoints/step_00000002/mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )
    assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]
    assert all(r["data"]["world_size"] == 2 for r in state["ranks"])


def test_slurm_preemption_signal_checkpoints_requeues_and_resumes(
    slurm: SlurmCluster, sample_shards: Path, tmp_path: Path
) -> None:
    """The signal Slurm sends before the time limit (``--signal=B:USR1@...``: USR1 to the batch shell) is
    sent by hand mid-run: the script passes it to both tasks, they save a checkpoint and exit 75, the script
    requeues the job, the requeued job (SLURM_RESTART_COUNT=1) resumes from that checkpoint into the same
    MLflow run and completes at the requested step, with every log step recorded exactly once."""
    steps = 10
    overrides = [
        f"data.shards={sample_shards}",
        f"train.max_steps={steps}",
        "train.log_every=2",
        "train.checkpoint_every=3",
    ]
    job, proc = _submit(slurm, tmp_path, "cycle", overrides)
    run_dir, log = tmp_path / "cycle", tmp_path / "cycle.out"
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").is_file() or 4 not in [r["step"] for r in _records(run_dir)]:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    assert _wait_job(slurm, job, proc, log) == 0, log.read_text()[-4000:]

    out = log.read_text()
    assert "pcrl: stop signal" in out and "pcrl: checkpoint saved; requeueing job" in out
    saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert 4 <= saved < steps
    assert f"pcrl: job {job} restart 1 on" in out
    assert f"resuming {run_dir} from step {saved}" in out
    assert [r["step"] for r in _records(run_dir)] == list(range(2, steps + 1, 2))
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{steps:08d}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(2, steps + 1, 2))
    assert json.loads((run_dir / f"checkpoints/step_{steps:08d}/manifest.json").read_text())["files"]


def test_slurm_harness_stops_its_daemons(tmp_path: Path) -> None:
    """A second cluster started and stopped here leaves none of its processes behind (the harness must not
    leak daemons into CI machines or developers' sessions)."""
    reason = _why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the Slurm tests, but {reason}; .ci/run installs Slurm first")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path)
    try:
        cluster.start()
        pids = [p.pid for _, p in cluster.daemons]
        assert len(pids) == 4
    finally:
        cluster.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
