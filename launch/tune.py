"""Sweep pretraining hyperparameters (by default the PCRLv2 loss weights and the learning rate) with Ray Tune.

    python launch/tune.py --config configs/tune/loss_weights.yaml data.shards=SHARDS [key=value ...]
    python launch/tune.py --config ... --address auto          # join a running Ray cluster
    python launch/tune.py --config ... --resume                # continue an interrupted sweep

``key=value`` items set the sweep when the key is a sweep key (``num_samples=4``,
``scheduler.grace_period=200``) and every trial's pretraining config otherwise (``train.max_steps=2000``).
Each trial is a pretraining run through the same ``train()`` as launch/pretrain.py, tracked as an MLflow
child run of the sweep's parent run; the best configuration is written to ``<output_dir>/<name>/best.yaml``,
which ``launch/pretrain.py --config`` accepts.

Exit status: 0 done, 2 bad config or command line, 130 interrupted (continue with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl import exit_status
from pcrl.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hyperparameter sweep of PCRLv2 pretraining with Ray Tune (ASHA), tracked in MLflow.",
        epilog="example: python launch/tune.py --config configs/tune/loss_weights.yaml data.shards=shards/",
    )
    parser.add_argument("--config", required=True, help="sweep YAML (configs/tune/*.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (auto, HOST:PORT); default: local"
    )
    parser.add_argument("--resume", action="store_true", help="continue the sweep in its folder")
    parser.add_argument("overrides", nargs="*", help="key=value for the sweep or for every trial")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pcrl.engine import configure_logging
    from pcrl.sweep import load_sweep, run_sweep

    configure_logging()
    try:
        sweep = load_sweep(args.config, args.overrides)
        result = run_sweep(sweep, address=args.address, resume=args.resume)
    except (ConfigError, FileNotFoundError) as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return exit_status.USAGE
    except KeyboardInterrupt:
        print(f"tune: interrupted; continue with: {' '.join(sys.argv)} --resume", file=sys.stderr)
        return exit_status.INTERRUPTED
    outcomes = ", ".join(f"{t} {o}" for t, o in sorted(result.trials.items()))
    print(f"\ntrials:      {outcomes}")
    print(f"best:        {result.best_value:.4g} with {result.best_params}")
    print(f"best config: {result.best_config} (python launch/pretrain.py --config {result.best_config})")
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
