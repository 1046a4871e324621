"""Loss-weight sweeps end to end: launch/tune.py on a real local Ray, every trial a real DeepSpeed pretraining
run on real CT/MRI shards, tracked in a real MLflow server on 127.0.0.1 that the test starts and stops.

One sweep of four trials carries every check, to stay within a few minutes on two cores: ASHA stops a
trial early, a trial with an invalid value fails without stopping the sweep, the driver is killed (with
its local Ray) after the first trial finished and ``--resume`` completes the sweep without running that
trial again, and MLflow holds one parent run with four child runs (params, metric history, status)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from processes import stop_group
from runs import REPO, launcher_env
from sweeps import check_two_trial_runs, sweep_yaml

from pcrl.config import ConfigError, load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port for the module; stopped by PID after."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


def _tune(config: Path, uri: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**launcher_env(), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        str(REPO / "launch/tune.py"),
        "--config",
        str(config),
        f"tracking.uri={uri}",
        *extra,
    ]
    with log.open("ab") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _finished_trials(trials: Path) -> list[Path]:
    return sorted(p.parent.parent for p in trials.glob("*/checkpoints/step_00000006"))


def test_sweep_asha_failure_kill_resume_and_mlflow(
    sample_shards: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """The whole life of a sweep, checked through its files and the MLflow client."""
    config = sweep_yaml(tmp_path / "sweep.yaml", sample_shards, tmp_path / "out")
    sweep_dir = tmp_path / "out" / "tiny"
    log = tmp_path / "tune.log"

    # 1. Start, and kill the driver's whole process group (its local Ray too) once a trial has finished.
    proc = _tune(config, mlflow_server, log)
    deadline = time.monotonic() + 400
    while not _finished_trials(sweep_dir / "trials"):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(1)
    time.sleep(3)  # let Tune record the trial as done (its experiment state is saved every second)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    (first,) = _finished_trials(sweep_dir / "trials")
    first_records = (first / "metrics.jsonl").read_text()

    # 2. --resume completes the sweep.
    proc = _tune(config, mlflow_server, log, "--resume")
    try:
        assert proc.wait(400) == 0, log.read_text()[-6000:]
    finally:
        stop_group(proc)
    text = log.read_text()
    assert "optim.lr: must be > 0" in text  # the failing trial is reported with its reason
    assert (first / "metrics.jsonl").read_text() == first_records, "a finished trial ran again"

    # 3. best.yaml is a pretraining config that launch/pretrain.py loads.
    best = load_config(sweep_dir / "best.yaml")
    assert best.optim.lr in (0.01, 0.5, 0.003) and best.train.max_steps == 6
    assert best.run.name == "tiny-best" and best.tracking.uri == ""

    # 4. MLflow: one parent run, four nested child runs with params, metric history and status.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("pcrl")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("pcrl.kind") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["space.optim.lr"])["values"] == [0.01, 0.5, -1, 0.003]
    assert parent.data.params["metric"] == "val/psnr" and parent.data.params["mode"] == "max"
    assert "best/val/psnr" in parent.data.metrics
    assert float(parent.data.tags["best.optim.lr"]) == best.optim.lr
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4, [(r.info.run_name, r.data.tags) for r in runs]
    by_lr = {float(r.data.params["optim.lr"]): r for r in children}
    assert set(by_lr) == {0.01, 0.5, -1.0, 0.003}
    failed = by_lr[-1.0]
    assert failed.info.status == "FAILED" and "optim.lr" in failed.data.tags["pcrl.error"]
    outcomes = {lr: r.data.tags["pcrl.outcome"] for lr, r in by_lr.items()}
    assert outcomes[-1.0] == "failed"
    assert "stopped_early" in outcomes.values(), outcomes
    assert "finished" in outcomes.values(), outcomes
    for lr, run in by_lr.items():
        if lr == -1.0:
            continue
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")]
        assert history == sorted(set(history)) and history[0] == 2, (lr, history)  # no step logged twice
        expected_status = "FINISHED" if outcomes[lr] == "finished" else "KILLED"
        assert run.info.status == expected_status, (lr, run.info.status, outcomes[lr])
        if outcomes[lr] == "finished":
            assert history == [2, 4, 6]
        else:
            assert history[-1] < 6


def test_sweep_config_errors_name_the_key(tmp_path: Path) -> None:
    """Typos in the sweep or its search space fail before Ray starts, naming the key."""
    from pcrl.sweep import load_sweep

    path = REPO / "configs/tune/loss_weights.yaml"
    sweep = load_sweep(path, ["data.shards=somewhere", "num_samples=3", "train.max_steps=50"])
    assert sweep.num_samples == 3 and "train.max_steps=50" in sweep.overrides
    assert set(sweep.space) == {
        "objective.weights.restore",
        "objective.weights.multiscale",
        "objective.weights.global",
        "objective.weights.local",
        "optim.lr",
    }
    with pytest.raises(ConfigError, match=r"data\.shards"):
        load_sweep(path)
    with pytest.raises(ConfigError, match=r"space\.objective\.weights\.restor\b.*Did you mean"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(path.read_text().replace("objective.weights.restore:", "objective.weights.restor:"))
        load_sweep(bad, ["data.shards=x"])
    with pytest.raises(ConfigError, match=r"space\.optim\.lr\.low"):
        bad.write_text(path.read_text().replace("low: 1.0e-4", "low: 0"))
        load_sweep(bad, ["data.shards=x"])
    with pytest.raises(ConfigError, match=r"num_sample\b"):
        load_sweep(path, ["data.shards=x", "num_sample=3"])  # goes to the pretraining config: unknown key


def test_trial_run_folder_is_the_trial_id_as_written(tmp_path: Path) -> None:
    """The driver finds a trial's records in trial_dir(); the trial writes them to its config's run folder.
    The two agree for every Ray trial id, one of only digits and an underscore included."""
    from pcrl.sweep import load_sweep, trial_config, trial_dir

    sweep = load_sweep(sweep_yaml(tmp_path / "sweep.json", tmp_path / "shards", tmp_path / "out"))
    for trial in ("28683_00000", "be495_00001", "00000_00002"):
        cfg = trial_config(sweep, {"optim.lr": 0.01}, trial, uri="sqlite:///x.db")
        assert cfg.run_dir == trial_dir(sweep, trial) and cfg.run.name == trial


@pytest.mark.slow
def test_sweep_two_workers_per_trial(sample_shards: Path, tmp_path: Path) -> None:
    """workers_per_trial=2: each trial is a TorchTrainer of two CPU workers training as one DeepSpeed world
    of 2 (both ranks' states in its checkpoint), and Tune still gets the metric from it through Ray Train:
    both trials finish, best.yaml is written, and MLflow holds the parent and both child runs."""
    config = sweep_yaml(tmp_path / "sweep.json", sample_shards, tmp_path / "out")
    sweep = json.loads(config.read_text())
    sweep["space"] = {"optim.lr": {"type": "grid", "values": ["0.01", "0.003"]}}
    sweep["scheduler"] = {"name": "fifo"}
    sweep["workers_per_trial"] = 2
    sweep["max_concurrent"] = 0  # derived: one worker group of 2 CPUs at a time on a 2-CPU machine
    sweep["overrides"] = [o for o in sweep["overrides"] if not o.startswith("train.max_steps")]
    sweep["overrides"].append("train.max_steps=2")
    config.write_text(json.dumps(sweep))
    store, log = tmp_path / "mlflow.db", tmp_path / "tune.log"

    proc = _tune(config, f"sqlite:///{store}", log)
    try:
        assert proc.wait(600) == 0, log.read_text()[-6000:]
    finally:
        stop_group(proc)

    import torch

    sweep_dir = tmp_path / "out" / "tiny"
    checkpoints = sorted((sweep_dir / "trials").glob("*/checkpoints/step_00000002"))
    assert len(checkpoints) == 2, log.read_text()[-4000:]
    for ckpt in checkpoints:
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]
        assert all(r["data"]["world_size"] == 2 for r in state["ranks"])
    assert load_config(sweep_dir / "best.yaml").optim.lr in (0.01, 0.003)
    parent = check_two_trial_runs(f"sqlite:///{store}", log.read_text())
    assert parent.data.params["workers_per_trial"] == "2"
