"""MLflow outages, for real: a run logs to an ``mlflow server`` on 127.0.0.1 that is not up when the run
starts, comes up, is stopped in the middle of the run and restarted, and is down again when the run ends.
Training must go on throughout, warn once per outage, keep every record in ``metrics.jsonl``, deliver every
record to one MLflow run without duplicates when the server is back, and ``python -m pcrl.tracking sync``
must deliver the rest afterwards, idempotently."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from runs import REPO, finish, launch_without_eval, launcher_env, wait_for

from pcrl import exit_status

pytestmark = pytest.mark.integration


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _history(uri: str, run_id: str, key: str = "loss/total") -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def _run_id(run_dir: Path, uri: str) -> str | None:
    path = run_dir / "mlflow_run.json"
    return json.loads(path.read_text())["runs"].get(uri, {}).get("run_id") if path.is_file() else None


def _sync(run_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pcrl.tracking", "sync", str(run_dir)]
    return subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)


def test_tracking_outage_loses_nothing_and_duplicates_nothing(
    sample_shards: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """Pins: an unreachable server that stops or stalls training, a warning per failed call, records dropped
    while the server is away, records sent twice after it returns, a run created twice, and a run that ended
    during an outage never reaching MLflow."""
    server, run_dir, log = mlflow_server, tmp_path / "outage", tmp_path / "outage.log"
    overrides = [
        f"data.shards={sample_shards}",
        f"run.output_dir={tmp_path}",
        "run.name=outage",
        "train.max_steps=100000",  # ended by a preemption signal once every phase has been seen
        "train.log_every=1",
        "train.checkpoint_every=0",
        "tracking.image_every=0",
        f"tracking.uri={server.uri}",
        "tracking.retry_s=1",
    ]
    proc = launch_without_eval(overrides, log)
    try:
        # 1. Unreachable at the start: training goes on.
        wait_for("3 logged steps with the server down", lambda: len(_steps(run_dir)) >= 3, proc, log)
        assert _run_id(run_dir, server.uri) is None
        # 2. The server comes up: the run is created and everything logged so far arrives.
        server.start()
        wait_for("the MLflow run", lambda: _run_id(run_dir, server.uri) is not None, proc, log)
        run_id = _run_id(run_dir, server.uri)
        assert run_id is not None
        wait_for(
            "the first records in MLflow", lambda: _history(server.uri, run_id)[:3] == [1, 2, 3], proc, log
        )
        # 3. Gone in the middle of the run, then back.
        server.stop()
        down_at = _steps(run_dir)[-1]
        wait_for("3 more steps with the server down", lambda: _steps(run_dir)[-1] >= down_at + 3, proc, log)
        server.start()
        back_at = _steps(run_dir)[-1]
        wait_for(
            "the records of the outage in MLflow", lambda: back_at in _history(server.uri, run_id), proc, log
        )
        # 4. Down again when the run ends (a preemption signal ends it with status KILLED).
        server.stop()
        down_at = _steps(run_dir)[-1]
        wait_for("2 more steps with the server down", lambda: _steps(run_dir)[-1] >= down_at + 2, proc, log)
        os.killpg(proc.pid, signal.SIGUSR1)
        assert finish(proc, log) == exit_status.PREEMPTED, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    out = log.read_text()
    steps = _steps(run_dir)
    assert steps == list(range(1, steps[-1] + 1)), "metrics.jsonl must hold every step once"
    # One warning per outage (start, middle, end), not one per failed call.
    assert out.count("training goes on, every record stays in") == 3, out[-4000:]
    assert out.count(f"MLflow at {server.uri} is reachable again") == 2
    assert f"MLflow at {server.uri} is still unreachable at the end of the run" in out
    assert "python -m pcrl.tracking sync" in out

    # 5. Afterwards: sync delivers the rest and the final status; a second sync sends nothing.
    server.start()
    first = _sync(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"MLflow run {run_id} at {server.uri} is up to date" in first.stdout
    assert "(0 metric values sent)" not in first.stdout
    again = _sync(run_dir)
    assert again.returncode == 0 and "(0 metric values sent)" in again.stdout, again.stdout + again.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])  # one run, never a second one
    assert run.info.run_id == run_id and run.info.status == "KILLED"
    assert run.data.params["train.log_every"] == "1"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/total", "optim/lr", "perf/samples_per_s"):
        assert _history(server.uri, run_id, key) == steps, key
    assert [m.value for m in client.get_metric_history(run_id, "loss/total")] == [
        r["loss/total"] for r in records
    ]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}


def test_tracking_keeps_sending_metrics_when_files_cannot_be_uploaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An artifact store that refuses the run folder's files (here: its location lies under a regular file)
    costs one warning naming the folder; the run and its metrics keep going to MLflow. Pins: the tracker
    taking a failed upload for an outage, so that it stops sending metrics and, when the server really goes
    away right after a reconnection, never says it was reachable again nor warns of the new outage."""
    from mlflow.tracking import MlflowClient

    from pcrl.config import PretrainConfig, save_config
    from pcrl.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    MlflowClient(tracking_uri=uri).create_experiment("pcrl", artifact_location=str(blocker / "artifacts"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(PretrainConfig(), run_dir / "config.yaml")
    tracker = Tracker(run_dir, uri, "pcrl", retry_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="pcrl.tracking"):
        run_id = tracker.start("run", {"optim.lr": 0.01})
        tracker.log_metrics({"loss/total": 1.0}, step=1)
        tracker.log_metrics({"loss/total": 0.5}, step=2)
        tracker.finish()
    warnings = [r.getMessage() for r in caplog.records if r.name == "pcrl.tracking"]
    assert len(warnings) == 1 and warnings[0].startswith(f"could not upload the files of {run_dir}"), warnings
    assert run_id is not None and _history(uri, run_id) == [1, 2]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"


def test_tracking_sync_names_an_unreachable_server(tmp_path: Path) -> None:
    """The sync command against a server that is not there fails with status 1 and names the URI (no
    traceback), and changes nothing in the run folder."""
    from pcrl.config import PretrainConfig, save_config
    from pcrl.distributed import free_port

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    save_config(PretrainConfig(), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 0.0, "loss/total": 1.0}) + "\n")
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "pcrl.tracking", "sync", str(run_dir), "--uri", uri]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"could not reach MLflow at {uri}" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_sweep_closes_a_trial_with_the_records_its_own_mlflow_calls_lost(tmp_path: Path) -> None:
    """The sweep driver closes a trial's run from the trial's run folder: a trial that never reached MLflow
    gets one run holding every record of its ``metrics.jsonl`` (and its full config as params), a trial whose
    last records did not arrive gets them in its own run, and both are nested under the parent. Pins: the
    driver creating an empty run beside the trial's records, or a second run for a trial that had one."""
    from mlflow.tracking import MlflowClient

    from pcrl.config import PretrainConfig, save_config
    from pcrl.tracking import SweepTracker, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = SweepTracker(uri, "pcrl")
    parent = sweep.start("sweep", {"space.optim.lr": "[0.01, 0.003]"})
    records = [{"step": s, "time": 1.0e9 + s, "loss/total": 1.0 / s, "val/psnr": 10.0 + s} for s in (1, 2)]

    lost, late = tmp_path / "trials" / "lost", tmp_path / "trials" / "late"
    for run_dir in (lost, late):
        run_dir.mkdir(parents=True)
        cfg = PretrainConfig()
        cfg.run.name, cfg.tracking.uri = run_dir.name, uri
        save_config(cfg, run_dir / "config.yaml")
    # 'lost' recorded both steps while MLflow was unreachable; 'late' sent step 1 and lost step 2.
    (lost / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tracker = Tracker(late, uri, "pcrl")
    own_run = tracker.start("late", {"optim.lr": 0.003})
    tracker.log_metrics({k: v for k, v in records[0].items() if k not in ("step", "time")}, step=1)
    with (late / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(records[1]) + "\n")

    for _ in range(2):  # idempotent: a second close sends nothing twice
        for run_dir, lr in ((lost, 0.01), (late, 0.003)):
            tags = {"pcrl.outcome": "finished"}
            sweep.close_trial(run_dir.name, parent, {"optim.lr": lr}, "FINISHED", tags, run_dir=run_dir)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pcrl").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == ["late", "lost"] and len(runs) == 3  # the parent and one run per trial
    assert children["late"].info.run_id == own_run == _run_id(late, uri)
    assert children["lost"].info.run_id == _run_id(lost, uri)
    for name, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["pcrl.outcome"] == "finished", name
        for key in ("loss/total", "val/psnr"):
            assert sorted(_history(uri, run.info.run_id, key)) == [1, 2], (name, key)
    assert children["lost"].data.params["train.log_every"] == str(PretrainConfig().train.log_every)


def test_sweep_warns_of_a_finished_trial_without_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A trial Ray reports finished whose run folder holds no ``metrics.jsonl`` (the driver looks in another
    folder than the trial wrote to, or cannot see it) is named in a warning; a failed one is not (it may have
    failed before its first step)."""
    from pcrl.tracking import SweepTracker

    sweep = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "pcrl")
    parent = sweep.start("sweep", {})
    empty = tmp_path / "trials" / "t1"
    empty.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="pcrl.tracking"):
        sweep.close_trial("t0", parent, {}, "FAILED", {}, run_dir=empty)
        assert not [r for r in caplog.records if r.name == "pcrl.tracking"]
        sweep.close_trial("t1", parent, {}, "FINISHED", {}, run_dir=empty)
    assert [r.getMessage() for r in caplog.records if r.name == "pcrl.tracking"] == [
        f"trial t1 finished but {empty} holds no metrics.jsonl; its MLflow run may lack its records "
        "(is the sweep folder on a filesystem the driver sees?)"
    ]
