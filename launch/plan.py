"""Estimate a pretraining run before paying for it: shard storage, ingest CPU time, GPU-hours, wall time and
checkpoint sizes.

    python launch/plan.py --shards /data/shards --config configs/pretrain/base.yaml --gpus 8 --device h100
    python launch/plan.py --inputs /data/ct --sample 50 --config configs/pretrain/base.yaml train.max_steps=20000 \\
        --gpus 8 --device h100 --json
    python launch/plan.py --inputs /data/ct --config configs/pretrain/cpu.yaml --gpus 1 --calibrate

The data is a prepared shard folder (``--shards``: counts, shapes and compressed bytes from its manifest) or
raw inputs not yet prepared (``--inputs``: the headers of ``--sample`` files, extrapolated to every volume
file found). The training is the config and ``key.sub=value`` overrides exactly as ``launch/pretrain.py``
takes them, on ``--gpus`` devices of a known kind (``--device``) or of this machine (``--calibrate``: a
short ``bench/train_step.py`` and a short ``data_prep.shard`` of two sample volumes). Every rate used is
listed with where and when it was measured.

Exit status: 0 done, 2 bad config, command line or input (named in the message), 1 the calibration failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl import exit_status
from pcrl.config import ConfigError, PretrainConfig, load_config
from pcrl.engine import resolve_auto
from pcrl.plan import DEVICES, DataSummary, PlanError, Rate, estimate, summarize_headers, summarize_records

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        description="Estimate storage, ingest time, GPU-hours and checkpoint sizes of a pretraining run. "
        "Overrides are key.sub=value pairs after the options, as for launch/pretrain.py.",
        epilog="example: python launch/plan.py --shards /data/shards --config configs/pretrain/base.yaml "
        "--gpus 8 --device h100",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", help="a shard folder (or pattern) made by python -m data_prep.shard")
    data.add_argument("--inputs", nargs="+", type=Path, help="raw volume files or folders, not yet prepared")
    parser.add_argument(
        "--sample", type=int, default=20, help="--inputs: headers read, spread over the files"
    )
    parser.add_argument(
        "--modality", choices=["ct", "mr"], default="ct", help="--inputs: the modality of the volumes (ct)"
    )
    parser.add_argument(
        "--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"),
        help="--inputs: target spacing in mm, as data_prep.shard --spacing (1 1 1)",
    )  # fmt: skip
    parser.add_argument(
        "--volumes", type=int, help="plan for this many volumes like the ones given (scales counts and sizes)"
    )
    parser.add_argument("--config", required=True, help="YAML config (a diff against pcrl's defaults)")
    parser.add_argument("--gpus", type=int, default=1, help="devices the run trains on (1)")
    parser.add_argument("--device", help=f"a known device: {', '.join(sorted(DEVICES))}")
    parser.add_argument(
        "--calibrate", action="store_true",
        help="measure this machine instead of a known device (about a minute on two cores at tiny sizes)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    if args.inputs:
        # --inputs takes several paths, so overrides written right after it land there: give them back.
        moved = [p for p in args.inputs if re.match(r"[A-Za-z_][\w.]*=", str(p)) and not p.exists()]
        args.inputs = [p for p in args.inputs if p not in moved]
        args.overrides = [str(p) for p in moved] + args.overrides
        if not args.inputs:
            parser.error("--inputs: no path given (only key.sub=value overrides)")
    return args


def _error(message: str) -> int:
    print(f"plan: error: {message}", file=sys.stderr)
    return exit_status.USAGE


def header_shape(path: Path, spacing: list[float]) -> tuple[int, ...]:
    """The shape of the volume in ``path`` after resampling to ``spacing``, from its header alone.

    Raises:
        ValueError: the header cannot be read or is not a 3D volume.
    """
    import SimpleITK as sitk

    from data_prep.prepare import output_shape

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(str(e).strip().splitlines()[-1]) from None
    size = [n for n in reader.GetSize()]
    spacing_in = list(reader.GetSpacing())
    if len(size) == 4 and size[3] == 1:
        size, spacing_in = size[:3], spacing_in[:3]
    if len(size) != 3:
        raise ValueError(f"{len(size)}D image, not a 3D volume")
    return tuple(output_shape(size, spacing_in, spacing))


def summarize_inputs(inputs: list[Path], sample: int, modality: str, spacing: list[float]) -> DataSummary:
    """Volume files under ``inputs``, with the headers of ``sample`` of them, evenly spread, extrapolated.

    Raises:
        PlanError: no volume file found, DICOM files found, or no readable header in the sample.
        FileNotFoundError: an input does not exist.
    """
    from data_prep.dicom import is_dicom
    from data_prep.discover import list_files
    from data_prep.readers import volume_suffix

    origin = "--inputs " + " ".join(str(p) for p in inputs)
    files = list_files(inputs)
    volumes = [f.path for f in files if volume_suffix(f.path) is not None]
    dicom = [f.path for f in files if volume_suffix(f.path) is None and is_dicom(f.path)]
    if dicom:
        raise PlanError(
            f"{origin}: {len(dicom)} DICOM files (e.g. {dicom[0]}); a series' size needs every header of "
            "it, which this estimate does not read: shard a sample of the series with python -m "
            "data_prep.shard and plan from it with --shards, then scale by the number of series"
        )
    if not volumes:
        raise PlanError(
            f"{origin}: no volume files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) found "
            f"({len(files)} other files); point --inputs at the folders that hold the volumes"
        )
    if sample < 1:
        raise PlanError(f"--sample: must be at least 1, got {sample}")
    k = min(sample, len(volumes))
    picked = [volumes[i * len(volumes) // k] for i in range(k)]
    shapes: list[tuple[tuple[int, ...], str]] = []
    bad: list[str] = []
    for path in picked:
        try:
            shapes.append((header_shape(path, spacing), modality))
        except ValueError as e:
            bad.append(f"{path}: {e}")
    if not shapes:
        raise PlanError(f"{origin}: no sampled header could be read; first: {bad[0]}")
    return summarize_headers(shapes, len(volumes), len(bad), origin, spacing)


_VARIANT = {
    ("fp32", False): "fp32",
    ("fp32", True): "fp32-cl",
    ("bf16", False): "bf16",
    ("bf16", True): "bf16-cl",
}


def calibrate_training(cfg: PretrainConfig) -> Rate:
    """Samples/s of one training step of ``cfg``'s model and views on this machine: ``bench/train_step.py``
    at micro-batch 2, one warm-up and two timed steps.

    Raises:
        PlanError: the config's precision has no ``bench/train_step.py`` variant on CPU (fp16).
        RuntimeError: the bench failed (its last output lines in the message).
    """
    variant = _VARIANT.get((cfg.engine.precision, cfg.engine.channels_last))
    if variant is None:
        raise PlanError(
            f"--calibrate: engine.precision={cfg.engine.precision} is not measured by bench/train_step.py; "
            "calibrate with engine.precision=fp32 or bf16"
        )
    command = [
        sys.executable, str(ROOT / "bench" / "train_step.py"), "--device", "cpu", "--batch", "2",
        "--steps", "2", "--warmup", "1", "--base-channels", str(cfg.model.base_channels),
        "--global-size", *map(str, cfg.views.global_size), "--local-size", *map(str, cfg.views.local_size),
        "--locals", str(cfg.views.num_locals), "--variants", variant, "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"bench/train_step.py failed (status {done.returncode}):\n{tail}")
    report = json.loads(done.stdout)
    rate = report["results"][variant]["samples_per_s"]
    return Rate(
        rate, "samples/s", time.strftime("%Y-%m-%d"),
        f"bench/train_step.py --variants {variant} at micro-batch 2, width {cfg.model.base_channels}, on "
        f"{report['device']} (this machine, the step alone: the loader's share is not counted)",
    )  # fmt: skip


def calibrate_ingest() -> tuple[Rate, dict[str, Rate]]:
    """CPU time of ``data_prep.shard`` per output megavoxel and the compression per modality, from sharding
    one CT and one MR sample volume (``data_prep.fetch``'s pyradiomics cases, cached) with one worker."""
    import numpy as np

    from data_prep.fetch import fetch_samples
    from data_prep.shard import shard_volumes
    from pcrl.shards import read_manifest

    cache = Path(os.environ.get("PCRL_CACHE", ROOT / ".cache")) / "samples"
    samples = fetch_samples(cache)
    inputs = [samples["brain1"], samples["lung1"]]
    today = time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="pcrl-plan-") as tmp:
        start = time.process_time()
        shard_volumes(inputs, Path(tmp), workers=1, progress=False, overwrite=True)
        cpu_s = time.process_time() - start
        records = read_manifest(tmp, split="all")
    voxels = sum(int(np.prod(r.shape)) for r in records)
    where = f"data_prep.shard of {', '.join(p.name for p in inputs)} with one worker, this machine"
    ingest = Rate(cpu_s / (voxels / 1e6), "core-seconds per output Mvoxel", today, where)
    compression: dict[str, Rate] = {}
    for modality in sorted({r.modality for r in records}):
        raw = sum(
            int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize for r in records if r.modality == modality
        )
        stored = sum(r.size for r in records if r.modality == modality)
        compression[modality] = Rate(stored / raw, "compressed/raw bytes", today, where)
    return ingest, compression


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def table(plan: dict[str, Any]) -> str:
    """The estimate as a short table, then its assumptions."""
    d = plan["data"]
    vols = ", ".join(f"{n:,} {m.upper()}" for m, n in sorted(d["volumes"].items()))
    if d["files_found"] is not None:
        vols += f" (extrapolated from {d['sampled']} headers of {d['files_found']:,} files)"
    if d.get("scaled_from"):
        vols += f", scaled by --volumes from {d['scaled_from']:,}"
    ck = plan["checkpoint_bytes"]
    rows = [
        ("data", f"{d['origin']}: {vols}"),
        ("shard storage", f"{_bytes(plan['storage_bytes']['total'])}"),
        (
            "ingest",
            f"{_hours(plan['ingest_core_hours'])} core-hours (data_prep.shard"
            + (
                "; already done for --shards)"
                if d["files_found"] is None and not d.get("scaled_from")
                else ")"
            ),
        ),
        ("training", f"{plan['train_samples']:,} samples ({plan['samples_per_step']} per step)"),
        (
            "throughput",
            f"{plan['train_samples_per_s_per_device']:,.1f} samples/s per device ({plan['device']})",
        ),
        ("GPU-hours", f"{_hours(plan['train_gpu_hours'])} on {plan['gpus']} device(s)"),
        ("wall time", f"{_hours(plan['train_wall_hours'])} h"),
        ("checkpoints", f"{_bytes(ck['one'])} each, {_bytes(ck['kept'])} for the {ck['kept_count']} kept"),
    ]
    lines = [f"| {'estimate':<14} | value |", f"|{'-' * 16}|-------|"]
    lines += [f"| {k:<14} | {v} |" for k, v in rows]
    lines += ["", "assumptions:"]
    lines += [
        f"- {a['what']}: {a['value']:g} {a['unit']} ({a['measured']}; {a['where']})"
        for a in plan["assumptions"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return _error(str(e))
    if args.gpus < 1:
        return _error(f"--gpus: must be at least 1, got {args.gpus}")
    if args.calibrate == (args.device is not None):
        return _error(
            "give either --device NAME (known: "
            + ", ".join(sorted(DEVICES))
            + ") or --calibrate (this machine)"
        )
    device = None
    if args.device is not None:
        device = DEVICES.get(args.device.lower())
        if device is None:
            return _error(f"--device {args.device}: unknown device; known: {', '.join(sorted(DEVICES))}")
    try:
        if args.shards:
            from pcrl.shards import read_manifest

            data = summarize_records(read_manifest(args.shards, split="all"), f"--shards {args.shards}")
        else:
            data = summarize_inputs(args.inputs, args.sample, args.modality, args.spacing)
    except (PlanError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    except ModuleNotFoundError as e:
        return _error(f"--inputs needs the data_prep readers ({e.name} is missing): pip install -e '.[prep]'")
    if args.volumes is not None:
        if args.volumes < 1:
            return _error(f"--volumes: must be at least 1, got {args.volumes}")
        data = data.scaled(args.volumes / data.total_volumes)
    # The known devices are GPUs; --calibrate measures this machine.
    cfg = resolve_auto(cfg, cuda=True if device is not None else None)
    extra: dict[str, Any] = {}
    if args.calibrate:
        try:
            extra["device_rate"] = calibrate_training(cfg)
            extra["ingest"], extra["compression"] = calibrate_ingest()
        except PlanError as e:
            return _error(str(e))
        except ModuleNotFoundError as e:
            return _error(
                f"--calibrate needs data_prep's readers ({e.name} is missing): pip install -e '.[prep]'"
            )
        except RuntimeError as e:
            print(f"plan: calibration failed: {e}", file=sys.stderr)
            return exit_status.FAILED
    try:
        plan = estimate(data, cfg, args.gpus, device=device, **extra)
    except (PlanError, ConfigError) as e:
        return _error(str(e))
    print(json.dumps(plan, indent=2) if args.json else table(plan))
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
