"""launch/slurm/pretrain.sbatch on a real Slurm cluster started by the tests (tests/slurm_cluster.py: munged,
slurmctld and two slurmd "nodes" on this machine). The project's own sbatch script is submitted with tiny
settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import REPO, TINY, read_records
from slurm_cluster import SlurmCluster, require_slurm, wait_job

pytestmark = pytest.mark.integration

SBATCH = REPO / "launch/slurm/pretrain.sbatch"


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


def test_slurm_two_nodes_train_as_one_world(slurm: SlurmCluster, sample_shards: Path, tmp_path: Path) -> None:
    """sbatch on 2 nodes, one CPU task each: the tasks get ranks 0 and 1 of a world of 2 on n1 and n2 from
    SLURM_* alone, train together (both ranks' states in the checkpoint) and the job completes."""
    job, proc = _submit(
        slurm, tmp_path, "two", [f"data.shards={sample_shards}", "train.max_steps=2", "train.log_every=1"]
    )
    log = tmp_path / "two.out"
    assert wait_job(slurm, job, proc, log) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "pcrl: rank 0 of 2 on node n1 (local rank 0)" in out
    assert "pcrl: rank 1 of 2 on node n2 (local rank 0)" in out
    assert "2 process(es)" in out
    assert [r["step"] for r in read_records(tmp_path / "two")] == [1, 2]
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
    while not (run_dir / "metrics.jsonl").is_file() or 4 not in [r["step"] for r in read_records(run_dir)]:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    assert wait_job(slurm, job, proc, log) == 0, log.read_text()[-4000:]

    out = log.read_text()
    assert "pcrl: stop signal" in out and "pcrl: checkpoint saved; requeueing job" in out
    saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert 4 <= saved < steps
    assert f"pcrl: job {job} restart 1 on" in out
    assert f"resuming {run_dir} from step {saved}" in out
    assert [r["step"] for r in read_records(run_dir)] == list(range(2, steps + 1, 2))
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{steps:08d}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(2, steps + 1, 2))
    assert json.loads((run_dir / f"checkpoints/step_{steps:08d}/manifest.json").read_text())["files"]


def _task_pid(slurm: SlurmCluster, job: str, rank: int) -> int | None:
    """The training process of task ``rank`` of ``job`` on this cluster: launch/pretrain.py started by
    slurmstepd (the task's ``bash -c`` execs it), not its data-loader workers (same command and environment,
    but their parent is the training process) nor srun. None while it has not started."""
    want = {f"SLURM_CONF={slurm.conf}", f"SLURM_JOB_ID={job}", f"SLURM_PROCID={rank}", "SLURM_STEP_ID=0"}
    for proc in Path("/proc").iterdir():
        try:
            if b"launch/pretrain.py" not in (proc / "cmdline").read_bytes():
                continue
            if not want <= set((proc / "environ").read_bytes().decode(errors="replace").split("\0")):
                continue
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if (Path("/proc") / ppid / "comm").read_text().strip() == "slurmstepd":
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue  # not ours, or it ended while being read
    return None


def test_slurm_lost_rank_requeues_and_resumes(
    slurm: SlurmCluster, sample_shards: Path, tmp_path: Path
) -> None:
    """Rank 1's training process SIGKILLed once a checkpoint exists (as the out-of-memory killer would): the
    survivor names rank 1 and stops (76), srun ends with the killed task's 137, the script counts a lost-rank
    restart in the job's Comment and requeues, and the requeued job resumes from the checkpoint and completes
    at train.max_steps with every step recorded once, in metrics.jsonl and in MLflow."""
    # Enough steps after the first checkpoint that rank 1 is still training when the kill lands.
    steps = 16
    overrides = [
        f"data.shards={sample_shards}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "eval.every=0",
        # A SIGKILLed peer closes its sockets, so the survivor notices at once; this only bounds a hang.
        "engine.dist_timeout_s=60",
    ]
    job, proc = _submit(slurm, tmp_path, "lost", overrides)
    run_dir, log = tmp_path / "lost", tmp_path / "lost.out"
    pointer = run_dir / "checkpoints/latest"
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        if pointer.is_file():
            victim = _task_pid(slurm, job, 1)
        time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    assert wait_job(slurm, job, proc, log) == 0, log.read_text()[-4000:]

    out = log.read_text()
    assert "pretrain: stopped: rank 1 was lost" in out, out[-4000:]
    assert f"pcrl: a rank was lost (status 137); requeueing job {job} (lost-rank restart 1)" in out, out[
        -4000:
    ]
    assert f"pcrl: job {job} restart 1 on" in out
    resumed = int(out.split(f"resuming {run_dir} from step ")[1].split()[0])
    assert 2 <= resumed < steps and resumed % 2 == 0
    show = slurm.run(["scontrol", "show", "job", job]).stdout
    assert "Restarts=1" in show.split() and "Comment=pcrl-lost-1" in show.split(), show
    assert [r["step"] for r in read_records(run_dir)] == list(range(1, steps + 1))
    assert pointer.read_text() == f"step_{steps:08d}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(1, steps + 1))


def test_slurm_harness_stops_its_daemons(tmp_path: Path) -> None:
    """A second cluster started and stopped here leaves none of its processes behind (the harness must not
    leak daemons into CI machines or developers' sessions)."""
    require_slurm()
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
