"""Export a run's pretrained encoder for downstream use.

    python launch/export.py RUN_DIR [--step N] [--output DIR]

Writes ``encoder.safetensors`` (the encoder's tensors, float32), ``encoder.json`` (architecture,
preprocessing, training step, config hash, sha256 of the weights, data provenance) and ``MODEL_CARD.md`` (the
same for a reader, with the run's evaluation results) into RUN_DIR (or DIR), from the latest verified
checkpoint or the one of step N. Load them with ``pcrl.load_encoder(RUN_DIR)``.

Exit status: 0 done, 2 no usable checkpoint or a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a pretrained encoder (safetensors + JSON + MODEL_CARD.md)."
    )
    parser.add_argument("run_dir", type=Path, help="the run folder (with checkpoints/)")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the latest good one)"
    )
    parser.add_argument("--output", type=Path, default=None, help="folder to write into (default: RUN_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from pcrl.config import ConfigError
    from pcrl.export import export_encoder, read_encoder_meta
    from pcrl.model_card import MODEL_CARD

    try:
        weights, meta_path = export_encoder(args.run_dir, args.step, args.output)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return exit_status.USAGE
    meta = read_encoder_meta(meta_path)
    arch, training, provenance = meta["architecture"], meta["training"], meta["provenance"]
    print(f"encoder:  {weights}")
    print(f"metadata: {meta_path}")
    print(f"card:     {meta_path.with_name(MODEL_CARD)}")
    print(
        f"          step {training['step']}, widths {arch['stage_channels']}, norm {arch['norm']}, "
        f"config {training['config_hash']}"
    )
    if provenance["status"] == "recorded":
        print(f"data:     {provenance['volumes']} volumes; licences {provenance['per_license']}")
    else:
        print("data:     provenance unknown (the run recorded none)")
    print(f"load it:  pcrl.load_encoder({str(weights.parent)!r})")
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
