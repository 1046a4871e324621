"""What pretraining buys, measured by the linear probe: a short pretraining on the real sample volumes, then
the probe for the pretrained encoder and for a randomly initialised one (same patches, same seeds, same run).

    python bench/probe.py [--task auto|aal|lesion] [--steps 60] [--per-class 16] [--json]

Needs the sample volumes (``python -m data_prep.fetch``; sharded here into a temporary folder) and the
labelled cases (made here with ``data_prep.labelled`` if missing). ``--task aal`` probes AAL lobes of
Colin27 patches, one hemisphere against the other (fetched with ``apt-get download mricron-data`` if missing;
Colin27 is not in the pretraining data); ``--task lesion`` lesion against background patches of the
pyradiomics cases, which are the pretraining volumes themselves; ``auto`` (default) is ``aal`` when its data
is in the labelled folder. Prints both scores and the gain (pretrained − random); ``--json`` prints one JSON
object instead. A few volumes and a tiny model: the numbers say whether the pipeline transfers at all, not
that pretraining helps in general — report whatever sign.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="pretraining steps (tiny config)")
    p.add_argument("--per-class", type=int, default=16, help="lesion and background patches per case")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe patches, solver and random encoder")
    p.add_argument("--task", choices=("auto", "aal", "lesion"), default="auto", help="the probe's task")
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 16), help="probe patch size (x, y, z)")
    p.add_argument("--export", type=Path, default=None, help="also keep the pretrained encoder's export here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import torch

    from data_prep.fetch import fetch_samples, image_names
    from data_prep.labelled import default_output, prepare_aal, prepare_labelled
    from data_prep.shard import shard_volumes
    from pcrl import load_encoder
    from pcrl.export import export_encoder
    from pcrl.model import PCRLv2Encoder
    from pcrl.probe import LinearProbe, probe_patches
    from pcrl.tasks import probe_task

    samples = fetch_samples()
    cases = default_output()
    prepare_labelled(samples, cases)
    if args.task == "aal":
        prepare_aal(fetch_samples(sources=["colin27"]), cases)
    task = probe_task(cases, args.task)
    with tempfile.TemporaryDirectory(prefix="pcrl-probe-") as tmp:
        shards = Path(tmp) / "shards"
        shard_volumes([samples[n] for n in image_names(samples)], shards, shard_size_mb=64, workers=1,
                      progress=False, overwrite=True)  # fmt: skip
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE")
        cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/tiny.yaml"),
               f"data.shards={shards}", f"run.output_dir={tmp}", "run.name=probe", f"train.max_steps={args.steps}",
               "tracking.enabled=false", "tracking.image_every=0", "eval.every=0", f"run.seed={args.seed}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        export_encoder(Path(tmp) / "probe")
        pretrained = load_encoder(Path(tmp) / "probe")
        if args.export is not None:  # for launch/finetune.py encoder=DIR against scratch
            export_encoder(Path(tmp) / "probe", output=args.export)

    patches = probe_patches(str(cases), (-1000.0, 1000.0), args.patch, args.per_class, args.seed, task=task)
    probe = LinearProbe(patches, seed=args.seed)
    torch.manual_seed(args.seed)
    random_init = PCRLv2Encoder(1, pretrained.base_channels, pretrained.depth, "batch").eval()
    scores = {"pretrained": probe(pretrained), "random": probe(random_init)}
    result = {
        "task": task,
        "steps": args.steps,
        "patches": len(patches),
        "classes": int(torch.unique(patches.labels).numel()),
        "cases": int(torch.unique(patches.cases).numel()),
        **{f"{name}/{k.removeprefix('probe/')}": v for name, s in scores.items() for k, v in s.items()},
        "gain/auc": scores["pretrained"]["probe/auc"] - scores["random"]["probe/auc"],
        "gain/accuracy": scores["pretrained"]["probe/accuracy"] - scores["random"]["probe/accuracy"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        split = "one hemisphere against the other" if task == "aal" else "leave-one-case-out"
        print(
            f"linear probe ({task}), {result['patches']} patches, {result['classes']} classes, "
            f"{result['cases']} cases, {split}"
        )
        for name in ("pretrained", "random"):
            print(f"  {name:10s} AUC {result[f'{name}/auc']:.3f}  accuracy {result[f'{name}/accuracy']:.3f}")
        print(f"  gain       AUC {result['gain/auc']:+.3f}  accuracy {result['gain/accuracy']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
