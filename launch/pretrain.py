"""Pretrain an encoder with PCRLv2.

    deepspeed launch/pretrain.py --config configs/pretrain/base.yaml data.shards=SHARDS [key.sub=value ...]
    deepspeed --num_gpus 2 launch/pretrain.py --config ...     # several processes (GPUs, or CPU with gloo)
    python launch/pretrain.py --config ...                      # one process, no launcher

Launching again with the same run.output_dir/run.name continues that run from its latest checkpoint,
exactly: a run killed at any step and launched again ends as if it had never stopped.

SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption) to any training process makes
every rank save a checkpoint at the next step boundary and exit with status 75; launching the same command
again continues from there (launch/slurm/pretrain.sbatch requeues the job on 75). Under the ``deepspeed``
launcher, signal the training processes themselves or the whole process group, not the launcher: its
``deepspeed`` process dies of a signal and leaves the training running, and its per-node process passes
SIGTERM on (then exits 1, whatever the training's status) but dies of SIGUSR1 and reports 0.

Exit status: 0 done, 2 bad config or command line, 3 non-finite loss, 4 too many unreadable volumes
(data.bad_volumes, data.max_bad_fraction), 5 a checkpoint could not be written (full disk; the previous one
is intact), 75 preempted (checkpoint saved, relaunch to continue), 76 another rank died or stopped answering
(message names it; relaunch to continue from the last checkpoint). Under the ``deepspeed`` launcher the
launcher's own status is the dead rank's (e.g. 247 after a SIGKILL), and it stops the other ranks itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Spin-waiting OpenMP threads collapse throughput on shared CPU hosts; must be set before torch starts its
# thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl import exit_status
from pcrl.config import ConfigError, PretrainConfig, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="PCRLv2 pretraining (DeepSpeed). Overrides are key.sub=value pairs after the options.",
        epilog="example: deepspeed launch/pretrain.py --config configs/pretrain/tiny.yaml train.max_steps=20",
    )
    parser.add_argument("--config", required=True, help="YAML config (a diff against pcrl's defaults)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter lines to copy)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def summary(cfg: PretrainConfig, metrics: dict[str, float]) -> str:
    """What a user needs at the end of a run: where it is, how it ended, and how to look at it."""
    losses = ", ".join(
        f"{k.removeprefix('loss/')} {v:.4f}" for k, v in metrics.items() if k.startswith("loss/")
    )
    lines = ["", f"run folder:   {_short(cfg.run_dir)}", f"final losses: {losses}"]
    images = sorted((cfg.run_dir / "images").glob("recon_step_*.png"))
    if images:
        lines.append(f"pictures:     {_short(images[-1])} (reconstruction panels, also in MLflow)")
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or f"sqlite:///{_short(cfg.run_dir / 'mlflow.db')}"
        # The interpreter of this run (a venv's, unresolved, so its mlflow is the one that gets started).
        exe = Path(sys.executable)
        python = str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else "python"
        command = f"{python} -m mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri {shlex.quote(uri)}"
        if not cfg.tracking.uri and Path("Makefile").is_file():
            lines.append(f"MLflow UI:    make ui RUN={shlex.quote(_short(cfg.run_dir))}")
            lines.append(f"              or {command}")
        else:
            lines.append(f"MLflow UI:    {command}")
        lines.append('              then open http://127.0.0.1:5000 ("Model training" at the top left)')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return exit_status.USAGE
    if not cfg.data.shards:
        print(
            "pretrain: error: data.shards: no shards given; add data.shards=PATH (a folder made by "
            "python -m data_prep.shard)",
            file=sys.stderr,
        )
        return exit_status.USAGE

    from pcrl.checkpoint import CheckpointWriteError
    from pcrl.data import BadDataError
    from pcrl.engine import NonFiniteLossError, Preempted, RankLost, configure_logging, train

    configure_logging()
    try:
        metrics = train(cfg)
    except ConfigError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return exit_status.USAGE
    except NonFiniteLossError as e:
        print(f"pretrain: stopped: {e}", file=sys.stderr)
        return exit_status.NONFINITE
    except BadDataError as e:
        print(f"pretrain: stopped: {BadDataError.message(e)}", file=sys.stderr)
        return exit_status.BAD_DATA
    except CheckpointWriteError as e:
        print(f"pretrain: stopped: {e}", file=sys.stderr)
        return exit_status.CHECKPOINT_WRITE
    except RankLost as e:
        print(f"pretrain: stopped: {e}", file=sys.stderr)
        return exit_status.RANK_LOST
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"pretrain: preempted: {e}; launch the same command again to continue", file=sys.stderr)
        return exit_status.PREEMPTED
    finally:
        import gc

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # The run's frames (and its loader, whose workers ignore SIGTERM so that a preemption signal to the
        # process group cannot kill them) may sit in reference cycles after an error. Free them now, so the
        # loader shuts its workers down itself: at exit, multiprocessing would SIGTERM them and wait forever.
        gc.collect()

    if os.environ.get("RANK", "0") == "0":
        print(summary(cfg, metrics))
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
