"""launch/slurm/tune.sbatch on the real local Slurm cluster (tests/slurm_cluster.py): a Ray head on n1, a Ray
worker on n2, the sweep driver on the head, every trial a real DeepSpeed pretraining run tracked in MLflow.

Both "nodes" are this machine at 127.0.0.1, so the two Ray nodes share an address: Ray tells them apart by
their ports (chosen free per node) and their temp folders (the script gives each node its own), and a
driver on this host attaches to the head. That is what a real two-node allocation exercises too, less the
network between the nodes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from runs import REPO
from slurm_cluster import SlurmCluster, wait_job
from sweeps import check_two_trial_runs, sweep_yaml

from pcrl.config import load_config
from pcrl.distributed import free_port

pytestmark = pytest.mark.integration


def _marked(mark: str) -> dict[int, str]:
    """PID → command line of every live process whose environment carries ``PCRL_TEST_MARK=mark`` (what
    the job's processes inherit from sbatch, Ray's own included)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"PCRL_TEST_MARK={mark}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def _parent(pid: int) -> int:
    """The parent PID of ``pid`` (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state": the fields can hold spaces


def test_tune_sbatch_two_nodes(slurm: SlurmCluster, sample_shards: Path, tmp_path: Path) -> None:
    """sbatch tune.sbatch on n1 and n2: one Ray node per Slurm node (two raylets seen while it runs), both
    trials finish, best.yaml is written, MLflow holds the parent run and both child runs, and once the job
    has ended no process it started (Ray's included) is left."""
    config = tmp_path / "sweep.json"
    sweep_yaml(config, sample_shards, tmp_path / "out")
    sweep = json.loads(config.read_text())
    sweep["space"] = {"optim.lr": {"type": "grid", "values": ["0.01", "0.003"]}}
    sweep["max_concurrent"] = 0  # one trial per node at once: each Ray node offers one CPU
    sweep["scheduler"] = {"name": "fifo"}
    sweep["overrides"] = [o for o in sweep["overrides"] if not o.startswith("train.max_steps")]
    sweep["overrides"].append("train.max_steps=2")
    config.write_text(json.dumps(sweep))
    store = tmp_path / "mlflow.db"

    mark = uuid.uuid4().hex
    # Ray's temp folders hold Unix sockets (a path limit of 107 bytes): a short folder of its own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="pcrl-", dir="/tmp"))
    env = {
        **slurm.env,
        "PYTHON": sys.executable,
        "OMP_WAIT_POLICY": "PASSIVE",
        "RAY_PORT": str(free_port()),
        "TMPDIR": str(ray_tmp),
        "PCRL_TEST_MARK": mark,
        # A raylet waits a few seconds for its dashboard agent (a Python process) and aborts past that; on
        # a loaded two-core test machine the agent's start alone can take longer.
        "RAY_agent_register_timeout_ms": "120000",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    log = tmp_path / "tune.out"
    cmd = [
        "sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
        "--time=10", "--partition=pcrl", f"--output={log}", str(REPO / "launch/slurm/tune.sbatch"),
        "--config", str(config), f"tracking.uri=sqlite:///{store}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        job = proc.stdout.readline().strip()
        assert job.isdigit(), (job, proc.stderr.read() if proc.stderr else "")
        raylets: set[int] = set()
        while proc.poll() is None:
            marked = _marked(mark)
            is_raylet = {pid: "/raylet" in cmd.split(" ", 1)[0] for pid, cmd in marked.items()}
            # A raylet's child between fork and exec still shows the raylet's command line: not a raylet.
            raylets |= {
                pid for pid, yes in is_raylet.items() if yes and not is_raylet.get(_parent(pid), False)
            }
            time.sleep(1)
        assert wait_job(slurm, job, proc, log) == 0, log.read_text()[-6000:]
        out = log.read_text()
        assert "pcrl tune: 2 Ray node(s) up" in out, out[-6000:]
        assert len(raylets) == 2, (raylets, out[-6000:])  # the head's and the worker's

        # Every process of the job has ended with it (a short grace for Ray's last workers to exit).
        deadline = time.monotonic() + 30
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(1)
        assert _marked(mark) == {}, out[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    sweep_dir = tmp_path / "out" / "tiny"
    best = load_config(sweep_dir / "best.yaml")
    assert best.optim.lr in (0.01, 0.003) and best.train.max_steps == 2
    assert len(list((sweep_dir / "trials").glob("*/checkpoints/step_00000002"))) == 2
    check_two_trial_runs(f"sqlite:///{store}", out)
