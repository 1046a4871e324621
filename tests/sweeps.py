"""Sweep helpers the tune tests share: a small sweep file, and the MLflow side of a finished sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runs import REPO


def sweep_yaml(path: Path, shards: Path, out: Path) -> Path:
    """A four-trial loss-weight sweep on the tiny config (6 steps, evaluation every 2), written to ``path``:
    one trial ASHA stops, one whose ``optim.lr=-1`` the pretraining config refuses."""
    overrides = [
        f"data.shards={shards}",
        "train.max_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "optim.warmup_steps=0",
        "eval.every=2",
        "eval.volumes=2",
        "eval.pairs_per_volume=1",
        "tracking.image_every=0",
        "data.num_workers=0",
    ]
    text = {
        "name": "tiny",
        "output_dir": str(out),
        "base": str(REPO / "configs/pretrain/tiny.yaml"),
        "overrides": overrides,
        # In grid order, one trial at a time: a trial far behind the first at a rung is stopped by ASHA,
        # and lr=-1 is refused by the pretraining config inside its trial.
        "space": {"optim.lr": {"type": "grid", "values": ["0.01", "0.5", "-1", "0.003"]}},
        "num_samples": 1,
        "max_concurrent": 1,
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
    }
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def check_two_trial_runs(uri: str, log: str) -> Any:
    """The MLflow side of a finished 2-trial sweep (``optim.lr`` 0.01 and 0.003, ``train.max_steps=2``):
    one parent run, FINISHED with ``best/val/psnr``, and one nested child run per trial, FINISHED, with its
    ``val/psnr`` at step 2. Returns the parent run; ``log`` (the sweep's output) goes with a failure."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pcrl").experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("pcrl.kind") == "sweep"]
    assert parent.info.status == "FINISHED" and "best/val/psnr" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.info.run_name for r in runs)
    assert len(runs) == 3, f"the parent and one run per trial, no other: {names}"
    assert sorted(float(r.data.params["optim.lr"]) for r in children) == [0.003, 0.01]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["pcrl.outcome"] == "finished"
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")]
        assert history == [2], f"{run.info.run_name}: val/psnr at steps {history}\n{log[-6000:]}"
    return parent
