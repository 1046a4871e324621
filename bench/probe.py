"""Does pretraining help? PCRLv2 against random initialisation and a restoration-only ablation, on the AAL task.

    python bench/probe.py [--config configs/pretrain/cpu.yaml] [--seeds 0 1 2] [--random-inits 5]
                          [--steps N] [--set KEY=VALUE ...] [--out .cache/probe-bench] [--bn-stats-check]
                          [--prepare-only] [--json]

What it runs (every stage is kept under ``--out`` and skipped when already done, so an interrupted bench
resumes where it stopped, and a pretraining run resumes from its last checkpoint):

1. **Data**: the pretraining set of ``python -m data_prep.fetch --set pretrain`` (never Colin27, which the
   AAL task evaluates on), sharded once; the Colin27 + AAL cases (``data_prep.labelled --task aal``).
2. **Pretraining**, one run per seed and arm, with the online probe and the health monitors on:
   ``pcrlv2`` (the full objective) and ``restore_only`` (``objective.weights.global=0`` and ``local=0``:
   pixel restoration alone, Models Genesis-like). Both arms of a seed start from the same weights and see
   the same data order. With ``--bn-stats-check``, one more run of the first seed with ``model.bn_stats=all``
   (the reference's running statistics): its weights must equal the ``pcrlv2`` run's, and only its
   eval-mode probe can differ.
3. **Scores** of every pretrained encoder and of ``--random-inits`` random initialisations (seeds 0, 1, ...):
   the linear probe (frozen features, eval mode with the statistics the encoder ships with, leave-one-
   hemisphere-out AUC) and fine-tuning with 10 % of the labels (``configs/finetune/aal_classification.yaml``).
4. **Report**: mean ± sd per arm; the pretrained arm against random initialisation (difference of means with
   a Welch 95 % interval; the target is a gain of at least twice the random initialisations' sd) and against
   the ablation (paired by seed, 95 % t interval); the learning curve (online probe AUC against pretraining
   steps; step 0 is the random initialisations) as ``learning_curve.png``; ``results.json``; and an MLflow
   run (``--out``/``summary/mlflow.db``) with the scores, the curve and the picture.

Choose the recipe's settings with training signals only (losses, validation PSNR, the health monitors): the
probe's hemispheres are its test split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {
    "pcrlv2": [],
    "restore_only": ["objective.weights.global=0", "objective.weights.local=0"],
}
# Fetched for pretraining but not used here: a 2 mm crop of 33×41×25 voxels, smaller after resampling than
# the recipe's view sampling needs (borders plus the largest global crop).
TOO_SMALL = ("nibabel_anatomical",)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data(out: Path) -> tuple[Path, Path]:
    """The pretraining shards and the labelled AAL cases (made once)."""
    from data_prep.fetch import fetch_pretraining, fetch_samples
    from data_prep.labelled import prepare_aal
    from data_prep.shard import shard_volumes

    shards, cases = out / "shards", out / "labelled"
    if not (shards / "manifest.jsonl").is_file():
        images = {k: v for k, v in fetch_pretraining().items() if k not in TOO_SMALL}
        _log(f"sharding {len(images)} pretraining volumes: {', '.join(sorted(images))}")
        shard_volumes(
            sorted(images.values()),
            shards,
            splits={"train": 1.0},
            shard_size_mb=64,
            workers=2,
            progress=False,
            overwrite=True,
        )
    if not (cases / "aal.json").is_file():
        prepare_aal(fetch_samples(sources=["colin27"]), cases)
    return shards, cases


def _pretrain(
    config: Path, name: str, seed: int, overrides: list[str], out: Path, shards: Path, cases: Path
) -> Path:
    """One pretraining run (resumed if it was interrupted) and its encoder export."""
    from pcrl.export import export_encoder

    run = out / "runs" / name
    if (run / "encoder.json").is_file():
        return run
    _log(f"pretraining {name} (log: {run}.log)")
    cmd = [
        sys.executable,
        str(REPO / "launch/pretrain.py"),
        "--config",
        str(config),
        f"data.shards={shards}",
        f"run.output_dir={out / 'runs'}",
        f"run.name={name}",
        f"run.seed={seed}",
        f"probe.cases={cases}",
        "probe.task=aal",
        *overrides,
    ]
    import torch

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run}.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"pretraining {name} failed with status {proc.returncode}; see {run}.log")
    export_encoder(run)
    return run


def _curve(run: Path) -> dict[int, float]:
    """Online probe AUC by step, from the run's metrics.jsonl."""
    from pcrl.io import read_jsonl

    records, _ = read_jsonl(run / "metrics.jsonl")
    return {int(r["step"]): float(r["probe/auc"]) for r in records if "probe/auc" in r}


def _finetune(
    encoder: str, seeds: list[int], name: str, out: Path, cases: Path, options: list[str]
) -> list[float]:
    """Fine-tuning AUC with 10 % of the labels, one value per seed (cached in the run's results.json);
    ``options`` are overrides of configs/finetune/aal_classification.yaml."""
    from pcrl.finetune import finetune, load_finetune_config

    run = out / "finetune" / name
    if not (run / "results.json").is_file():
        _log(f"fine-tuning {name} with 10 % of the labels")
        cfg = load_finetune_config(
            REPO / "configs/finetune/aal_classification.yaml",
            [
                f"encoder={encoder}",
                "scratch_baseline=false",
                f"task.cases={cases}",
                "train.label_fractions=[0.1]",
                f"train.seeds={seeds}",
                f"run.output_dir={out / 'finetune'}",
                f"run.name={name}",
                "tracking.enabled=false",
                *options,
            ],
        )
        finetune(cfg)
    (row,) = json.loads((run / "results.json").read_text())["rows"]
    return [float(v) for v in row["auc"]["per_seed"]]


def _summary(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": values}


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a − b paired by index, with a 95 % t interval."""
    from scipy import stats

    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"diff": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half)}


def _welch(a: list[float], b: list[float]) -> dict[str, float]:
    """Difference of means a − b with a Welch 95 % interval."""
    from scipy import stats

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else 1.0
    diff, half = float(np.mean(a) - np.mean(b)), stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return {"diff": diff, "low": diff - half, "high": diff + half}


def _plot(curves: dict[str, dict[int, list[float]]], random: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for arm, by_step in curves.items():
        steps = [0, *sorted(by_step)]
        mean = [np.mean(random), *(np.mean(by_step[s]) for s in steps[1:])]
        sd = [
            np.std(random, ddof=1),
            *(np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0 for s in steps[1:]),
        ]
        ax.errorbar(steps, mean, yerr=sd, marker="o", capsize=3, label=arm)
    ax.axhline(np.mean(random), color="grey", ls="--", lw=1, label="random init (mean)")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("AAL linear probe AUC (eval mode)")
    ax.set_title("Online probe during pretraining (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", type=Path, default=REPO / "configs/pretrain/cpu.yaml", help="pretraining recipe"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds (per arm)")
    p.add_argument("--random-inits", type=int, default=5, help="random initialisations (seeds 0, 1, ...)")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps of the recipe")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("PCRL_CACHE", ".cache")) / "probe-bench")
    p.add_argument(
        "--bn-stats-check", action="store_true", help="also pretrain seed 0 with model.bn_stats=all"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every run (repeatable)",
    )
    p.add_argument("--prepare-only", action="store_true", help="make the shards and the AAL cases, then stop")
    p.add_argument("--finetune-steps", type=int, default=50, help="optimizer steps per fine-tuned model")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")
    args = p.parse_args(argv)

    import torch

    from pcrl import load_encoder
    from pcrl.config import load_config
    from pcrl.model import PCRLv2Encoder
    from pcrl.probe import LinearProbe

    out = args.out.resolve()
    shards, cases = _data(out)
    if args.prepare_only:
        return 0
    common = [*([f"train.max_steps={args.steps}"] if args.steps else []), *args.set]
    cfg = load_config(
        args.config, [f"data.shards={shards}", f"probe.cases={cases}", "probe.task=aal", *common]
    )
    # Fine-tuning: the probe's patches, the recipe's architecture for the random initialisations.
    ft = [
        f"model.base_channels={cfg.model.base_channels}",
        f"model.depth={cfg.model.depth}",
        f"task.patch_size={list(cfg.probe.patch_size)}",
        f"train.steps={args.finetune_steps}",
    ]

    runs: dict[str, list[Path]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:  # seed-major: a bench stopped early still has both arms of its first seeds
        for arm, overrides in ARMS.items():
            runs[arm].append(
                _pretrain(args.config, f"{arm}-s{seed}", seed, overrides + common, out, shards, cases)
            )

    probe = LinearProbe.from_config(cfg)
    assert probe is not None
    scores: dict[str, dict[str, list[float]]] = {}
    for arm, arm_runs in runs.items():
        scores[arm] = {
            "probe_auc": [probe(load_encoder(r))["probe/auc"] for r in arm_runs],
            "finetune_auc": [
                v
                for s, r in zip(args.seeds, arm_runs, strict=True)
                for v in _finetune(str(r), [s], f"{arm}-s{s}", out, cases, ft)
            ],
        }
    random_probe = []
    for s in range(args.random_inits):
        torch.manual_seed(s)
        random_probe.append(
            probe(PCRLv2Encoder(1, cfg.model.base_channels, cfg.model.depth).eval())["probe/auc"]
        )
    scores["random"] = {
        "probe_auc": random_probe,
        "finetune_auc": _finetune("none", list(range(args.random_inits)), "random", out, cases, ft),
    }

    results: dict[str, Any] = {
        "config": str(args.config),
        "overrides": common,
        "steps": cfg.train.max_steps,
        "seeds": args.seeds,
        "random_inits": args.random_inits,
        "scores": {arm: {k: _summary(v) for k, v in s.items()} for arm, s in scores.items()},
        "vs_random": {
            arm: {k: _welch(scores[arm][k], scores["random"][k]) for k in scores[arm]} for arm in ARMS
        },
        "vs_restore_only": {
            k: _paired(scores["pcrlv2"][k], scores["restore_only"][k]) for k in scores["pcrlv2"]
        },
    }
    for k in ("probe_auc", "finetune_auc"):
        gain, sd = results["vs_random"]["pcrlv2"][k]["diff"], results["scores"]["random"][k]["sd"]
        results.setdefault("target", {})[k] = {"gain": gain, "twice_random_sd": 2 * sd, "met": gain >= 2 * sd}

    if args.bn_stats_check:
        seed = args.seeds[0]
        check = _pretrain(
            args.config, f"bn_all-s{seed}", seed, ["model.bn_stats=all", *common], out, shards, cases
        )
        a, b = load_encoder(runs["pcrlv2"][0]).state_dict(), load_encoder(check).state_dict()
        weights = [k for k in a if "running" not in k and "num_batches" not in k]
        results["bn_stats"] = {
            "weights_identical": all(torch.equal(a[k], b[k]) for k in weights),
            "probe_auc_global": scores["pcrlv2"]["probe_auc"][0],
            "probe_auc_all": probe(load_encoder(check))["probe/auc"],
        }

    curves = {arm: {} for arm in ARMS}
    for arm, arm_runs in runs.items():
        for r in arm_runs:
            for step, auc in _curve(r).items():
                curves[arm].setdefault(step, []).append(auc)
    results["curve"] = {arm: {str(s): v for s, v in sorted(c.items())} for arm, c in curves.items()}
    summary = out / "summary"
    summary.mkdir(parents=True, exist_ok=True)
    _plot(curves, random_probe, summary / "learning_curve.png")
    (summary / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _track(summary, results, curves, random_probe)

    if args.json:
        print(json.dumps(results))
    else:
        _print(results)
    return 0


def _track(
    summary: Path, results: dict[str, Any], curves: dict[str, dict[int, list[float]]], random: list[float]
) -> None:
    """The comparison as one MLflow run (a sqlite store in the summary folder): scores, curve and picture."""
    from pcrl.tracking import Tracker

    tracker = Tracker(summary, "", "pcrl-probe-bench")
    tracker.start(
        "probe-bench",
        {
            "config": results["config"],
            "steps": results["steps"],
            "seeds": str(results["seeds"]),
            "random_inits": results["random_inits"],
        },
    )
    flat = {
        f"{arm}/{k}/{stat}": v[stat]
        for arm, s in results["scores"].items()
        for k, v in s.items()
        for stat in ("mean", "sd")
    }
    tracker.log_metrics(flat, results["steps"])
    tracker.log_metrics({f"curve/{arm}/probe_auc": float(np.mean(random)) for arm in curves}, 0)
    steps = sorted({s for c in curves.values() for s in c})
    for step in steps:
        tracker.log_metrics(
            {f"curve/{arm}/probe_auc": float(np.mean(c[step])) for arm, c in curves.items() if step in c},
            step,
        )
    tracker.log_artifact(summary / "learning_curve.png")
    tracker.log_artifact(summary / "results.json")
    tracker.finish("FINISHED")


def _print(results: dict[str, Any]) -> None:
    print(
        f"AAL task, {results['steps']} pretraining steps, seeds {results['seeds']}, "
        f"{results['random_inits']} random initialisations"
    )
    print(f"{'':14s} {'linear probe AUC':>20s} {'fine-tune AUC (10 %)':>22s}")
    for arm, s in results["scores"].items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in ("probe_auc", "finetune_auc")]
        print(f"{arm:14s} {cells[0]:>20s} {cells[1]:>22s}")
    for name, cmp in (
        ("pcrlv2 − random", results["vs_random"]["pcrlv2"]),
        ("restore_only − random", results["vs_random"]["restore_only"]),
        ("pcrlv2 − restore_only (paired)", results["vs_restore_only"]),
    ):
        cells = [
            f"{cmp[k]['diff']:+.3f} [{cmp[k]['low']:+.3f}, {cmp[k]['high']:+.3f}]"
            for k in ("probe_auc", "finetune_auc")
        ]
        print(f"{name:30s} {cells[0]:>24s} {cells[1]:>24s}")
    for k, t in results["target"].items():
        print(
            f"target ({k}): gain {t['gain']:+.3f} vs 2·sd(random) {t['twice_random_sd']:.3f}: "
            f"{'met' if t['met'] else 'not met'}"
        )
    if "bn_stats" in results:
        b = results["bn_stats"]
        print(
            f"running statistics: global views {b['probe_auc_global']:.3f}, all forwards {b['probe_auc_all']:.3f} "
            f"(weights identical: {b['weights_identical']})"
        )


if __name__ == "__main__":
    sys.exit(main())
