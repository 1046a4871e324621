"""``python -m pcrl.tracking sync RUN_DIR [--uri URI] [--experiment NAME]``: send what the MLflow run of a run
folder lacks (metrics, config, reconstruction panels, a final status left by an outage). Idempotent.

Exit status: 0 up to date, 1 MLflow unreachable (run it again later), 2 not a run folder or a bad
``config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pcrl import exit_status
from pcrl.config import ConfigError
from pcrl.tracking import sync_run_folder

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pcrl.tracking sync RUN_DIR [--uri URI]``: send a run folder's records to MLflow."""
    parser = argparse.ArgumentParser(
        prog="python -m pcrl.tracking",
        description="Send what an MLflow run lacks from its run folder (after an outage). Idempotent.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="bring the MLflow run of RUN_DIR up to date with its metrics.jsonl")
    sync.add_argument("run_dir", type=Path, help="the run folder (holds config.yaml and metrics.jsonl)")
    sync.add_argument("--uri", default=None, help="MLflow tracking URI (default: the run's tracking.uri)")
    sync.add_argument("--experiment", default=None, help="experiment name (default: the run's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    run_dir: Path = args.run_dir
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"pcrl.tracking: error: {run_dir} has no metrics.jsonl; give a run folder", file=sys.stderr)
        return exit_status.USAGE
    try:
        tracker, sent = sync_run_folder(run_dir, args.uri, args.experiment)
    except (ConfigError, FileNotFoundError) as e:
        print(f"pcrl.tracking: error: {run_dir / 'config.yaml'}: {e}", file=sys.stderr)
        return exit_status.USAGE
    except RuntimeError as e:
        print(
            f"pcrl.tracking: error: {e}; is the server up? (a re-run sends only what is missing)",
            file=sys.stderr,
        )
        return exit_status.FAILED
    print(
        f"{run_dir}: MLflow run {tracker.run_id} at {tracker.uri} is up to date ({sent} metric values sent)"
    )
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
