"""Fine-tune a pretrained encoder on a labelled task and compare it with training from scratch.

    python launch/finetune.py --config configs/finetune/lesion_segmentation.yaml encoder=runs/NAME
    python launch/finetune.py --config configs/finetune/lesion_classification.yaml encoder=none
    python launch/finetune.py --config ... encoder=PATH train.label_fractions=[1.0,0.1] train.seeds=[0,1,2,3]

``encoder=PATH`` is an export (``python launch/export.py RUN_DIR``): the folder, its ``encoder.safetensors``
or its ``encoder.json``; ``encoder=none`` trains from scratch. With an encoder, the scratch baseline is
trained too (``scratch_baseline=false`` skips it). Results, mean ± std over seeds, go to
``<run.output_dir>/<run.name>/results.json`` and ``results.md`` and to MLflow.

Exit status: 0 done, 2 bad config, encoder or cases.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune an exported encoder (or none) on a labelled task, leave-one-case-out.",
        epilog="example: python launch/finetune.py --config configs/finetune/lesion_classification.yaml "
        "encoder=runs/tiny",
    )
    parser.add_argument(
        "--config", required=True, help="YAML config (a diff against the fine-tuning defaults)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. encoder=runs/tiny train.steps=50"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from pcrl.config import ConfigError
    from pcrl.export import EncoderLoadError
    from pcrl.finetune import finetune, load_finetune_config

    try:
        cfg = load_finetune_config(args.config, args.overrides)
        finetune(cfg)
    except (ConfigError, FileNotFoundError, EncoderLoadError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return exit_status.USAGE
    print((cfg.run_dir / "results.md").read_text())
    print(f"results: {cfg.run_dir / 'results.json'}")
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
