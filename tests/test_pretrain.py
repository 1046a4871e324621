"""End to end: the real ``deepspeed`` launcher runs launch/pretrain.py on real sharded CT/MRI volumes,
on CPU with gloo, as one and as two processes, logging to a real MLflow store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO, TINY, common_overrides, launcher_env, read_records, run_deepspeed

from pcrl.distributed import shm_workspaces

TERMS = ("loss/total", "loss/restore", "loss/multiscale", "loss/global", "loss/local")

pytestmark = pytest.mark.integration


def test_pretrain_one_process_logs_checkpoints_and_resumes(sample_shards: Path, tmp_path: Path) -> None:
    """One process: finite losses for every term in metrics.jsonl and MLflow, config saved, a checkpoint
    at the end; a second launch on the same run folder continues the same run instead of starting over."""
    proc = run_deepspeed(1, common_overrides(sample_shards, tmp_path, "one", 4))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "one"
    records = read_records(run_dir)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        for k in TERMS:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert r["perf/samples_per_s"] > 0 and 0.0 <= r["perf/data_wait_frac"] <= 1.0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000004"
    assert (run_dir / "checkpoints/step_00000004/config.yaml").is_file()
    out = proc.stdout + proc.stderr
    assert "step 4/4" in out and "eta" in out
    assert "run folder:" in proc.stdout and "-m mlflow ui" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "pcrl"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.weights.global"] == "1.0"
    assert run.data.params["views.global_size"] == "[32, 32, 16]"
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == [2, 4]
    assert {
        "optim/lr",
        "schedule/beta",
        "perf/samples_per_s",
        "perf/tflops_per_device",
        "perf/data_wait_frac",
        "memory/peak_gib",
    } <= set(run.data.metrics)
    assert run.data.metrics["perf/tflops_per_device"] > 0
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # Launch again, longer: it continues from step 4 into the same MLflow run.
    proc = run_deepspeed(1, common_overrides(sample_shards, tmp_path, "one", 6))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "from step 4" in proc.stderr
    assert [r["step"] for r in read_records(run_dir)] == [2, 4, 6]
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [2, 4, 6]


def test_flops_per_sample_counts_the_real_step_without_running_it() -> None:
    """The FLOP figure behind perf/tflops_per_device, counted on meta tensors, equals what torch counts for a
    real forward and backward of the same objective on CPU (a wrong shape or a missed term would skew every
    reported TFLOP/s and MFU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pcrl.config import load_config
    from pcrl.metrics import flops_per_sample
    from pcrl.model import PCRLv2UNet
    from pcrl.objective import PCRLv2Objective, PCRLv2Task

    cfg = load_config(TINY, ["train.micro_batch_size=3", "objective.restore_views=[1, 2]"])
    b, v = cfg.train.micro_batch_size, cfg.views
    model = PCRLv2UNet(base_channels=cfg.model.base_channels, depth=cfg.model.depth, norm=cfg.model.norm)
    task = PCRLv2Task(model, PCRLv2Objective.from_config(cfg.objective))
    views = torch.rand(b, 2, 1, *v.global_size)
    with FlopCounterMode(display=False) as counter:
        out = task(views, views, torch.rand(b, v.num_locals, 1, *v.local_size), beta=1.0,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        out["loss"].backward()
    assert flops_per_sample(cfg) == counter.get_total_flops() / b > 1e9


def test_pretrain_two_processes_see_disjoint_volumes(sample_shards: Path, tmp_path: Path) -> None:
    """Two gloo ranks under the deepspeed launcher: both train, finite losses, and at every step the two
    ranks consume different volumes (a broken split would silently train on duplicates)."""
    # channels-last weights go through DeepSpeed's gradient all-reduce here too (they broke its
    # parameter broadcast when converted before deepspeed.initialize), and the decoder stages are
    # recomputed in backward (activation checkpointing) under the engine.
    overrides = [*common_overrides(sample_shards, tmp_path, "two", 4), "engine.channels_last=true"]
    before = shm_workspaces()
    proc = run_deepspeed(2, [*overrides, "model.activation_checkpointing=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce workspaces (67 MB of RAM per rank) do not outlive the run.
    assert shm_workspaces() == before
    run_dir = tmp_path / "two"
    for r in read_records(run_dir):
        assert all(math.isfinite(r[k]) for k in TERMS)
    keys = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run_dir / f"sample_keys/rank{rank}.jsonl").read_text().splitlines()]
        keys[rank] = {x["step"]: x["keys"] for x in lines}
        assert sorted(keys[rank]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert keys[0][step] and keys[1][step]
        assert not set(keys[0][step]) & set(keys[1][step]), (step, keys[0][step], keys[1][step])
    assert (run_dir / "checkpoints/step_00000004").is_dir()


def test_pretrain_nonfinite_loss_stops_naming_the_step(sample_shards: Path, tmp_path: Path) -> None:
    """A diverging run must stop with the step number and exit status 3, not keep training on NaNs."""
    overrides = [
        *common_overrides(sample_shards, tmp_path, "nan", 6),
        "optim.lr=1e30",
        "optim.warmup_steps=0",
    ]
    proc = run_deepspeed(1, overrides)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "non-finite" in err and "at step" in err, err[-3000:]
    assert not (tmp_path / "nan/checkpoints/latest").exists()


def test_pretrain_cli_rejects_bad_config_fast(tmp_path: Path) -> None:
    """A typo on the command line is reported with the key, exit status 2, before any heavy start-up."""
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY), "train.max_step=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.max_step" in proc.stderr and "max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY)],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "data.shards" in proc.stderr
    # A shard path that does not exist is reported as such, with no traceback and no run folder left behind.
    missing = tmp_path / "no-such-shards"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/pretrain.py"),
            "--config",
            str(TINY),
            f"data.shards={missing}",
            f"run.output_dir={tmp_path}",
            "run.name=bad",
        ],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.shards={missing}" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_pretrain_bf16_zero_accumulation_clipping_adamw(sample_shards: Path, tmp_path: Path) -> None:
    """The derived DeepSpeed config must be one DeepSpeed accepts and trains with on CPU: bf16, ZeRO stage 2,
    gradient accumulation, clipping and AdamW together (plain ``python``, no launcher: one process)."""
    overrides = [
        # One optimizer step of two micro-batches: bf16 convolutions at this tiny width are slow on CPU.
        *common_overrides(sample_shards, tmp_path, "bf16", 1),
        "engine.precision=bf16",
        "engine.zero_stage=2",
        "train.grad_accum_steps=2",
        "train.grad_clip=1.0",
        "optim.name=adamw",
        "optim.lr=1e-4",
        "train.log_every=1",
    ]
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_records(tmp_path / "bf16")
    assert [r["step"] for r in records] == [1]
    assert all(math.isfinite(r[k]) for r in records for k in TERMS)
    # Two micro-batches of two samples make the optimizer step.
    keys = [json.loads(x) for x in (tmp_path / "bf16/sample_keys/rank0.jsonl").read_text().splitlines()]
    assert [k["step"] for k in keys] == [1, 1] and all(len(k["keys"]) == 2 for k in keys)
    assert (tmp_path / "bf16/checkpoints/step_00000001").is_dir()
