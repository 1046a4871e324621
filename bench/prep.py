"""Throughput of ``python -m data_prep.shard`` against a naive baseline, in one run on the same real volumes,
with where the time goes.

The baseline is what a script without pcrl would do, in one process: read each file with SimpleITK,
resample it to the target spacing with linear interpolation (``sitk.Resample``, on every core), ``np.save``
it. It does no reorientation, intensity policy, validation, compression, checksums, fsync, manifest or
resume bookkeeping, so it is a floor on the work, not an equal. pcrl's prep runs as ``python -m
data_prep.shard`` with 1 worker (in its own process) and 2 worker processes, in WebDataset and Zarr formats.
Every variant is a program of its own, as a user runs it (interpreter start, imports and the start of the
workers included), writing into a new folder.

    python bench/prep.py                      # 20 crops of each of the five pyradiomics volumes (100), 1 mm
    python bench/prep.py --copies 4 --json    # 20 volumes, the report as JSON

``--copies N`` writes N distinct crops (90 % of each axis, shifted) of every real volume as NRRD, so that a
run has enough volumes for the job's fixed costs (starting the workers, the QA sheet) not to hide the
per-volume ones; none is a duplicate of another.

For every pcrl variant it prints, from the job's own ``summary.json`` timings (:mod:`data_prep.timing`):

- volumes/s and the ratio to the baseline, all in (``x naive``) and without the job's fixed costs
  (``x naive, per volume``: wall time less start, pool start, QA sheet and finish, which a job pays once);
- per volume, the CPU milliseconds of each stage where it is prepared (read, reorient, resample, intensity,
  encode, compress) and of the parent's own stages (write, fsync, bookkeeping), and the parent's CPU per
  volume (all its threads: unpickling, writing, fsync calls, the pool's bookkeeping): its serial share;
- from those, the worker count at which one parent saturates: worker CPU per volume / parent CPU per volume.

Then, for sizing a cluster: MB/s per worker (one process, one thread) on the largest real CT here, and the
compression of the stored volumes (CT int16, MRI float16) at levels 1 and 3 in both formats.

Numbers on a shared machine are noisy: compare ratios from one run, on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.fetch import fetch_samples, image_names
from data_prep.prepare import output_shape
from data_prep.timing import JOB_STAGES, PARENT_STAGES, VOLUME_STAGES
from pcrl.shards import SUMMARY_NAME


def naive(paths: list[Path], out: Path, spacing: tuple[float, float, float]) -> None:
    """The baseline: SimpleITK read → linear resample → ``np.save``, one volume after another."""
    import SimpleITK as sitk

    for i, path in enumerate(paths):
        img = sitk.ReadImage(str(path))
        size = output_shape(img.GetSize(), img.GetSpacing(), spacing)
        resampled = sitk.Resample(
            img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing, img.GetDirection(), 0.0,
            img.GetPixelID(),
        )  # fmt: skip
        np.save(out / f"{i:05d}.npy", sitk.GetArrayViewFromImage(resampled))


def crops(paths: list[Path], copies: int, out: Path) -> list[Path]:
    """``copies`` distinct real sub-volumes of every input (the inputs themselves when ``copies`` is 1)."""
    import SimpleITK as sitk

    if copies <= 1:
        return list(paths)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for path in paths:
        img = sitk.ReadImage(str(path))
        size = [max(1, int(n * 0.9)) for n in img.GetSize()]
        for c in range(copies):
            start = [(n - m) * c // max(1, copies - 1) for n, m in zip(img.GetSize(), size, strict=True)]
            target = out / f"{path.name.split('.')[0]}_{c}.nrrd"
            sitk.WriteImage(sitk.RegionOfInterest(img, size, start), str(target), useCompression=True)
            made.append(target)
    return made


def source_megabytes(paths: list[Path]) -> float:
    """MB of source voxels, as decoded from the inputs."""
    import SimpleITK as sitk

    total = 0
    for path in paths:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        itemsize = np.dtype(
            sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype
        ).itemsize
        total += int(np.prod(reader.GetSize())) * itemsize
    return total / 1e6


def breakdown(timings: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Per-volume milliseconds by stage, the parent's serial share and the fixed costs of one job."""
    n = max(1, timings["prepared"])
    stages = {k: 1e3 * timings["volumes"].get(k, 0.0) / n for k in VOLUME_STAGES}
    parent = {k: 1e3 * timings["parent"].get(k, 0.0) / n for k in PARENT_STAGES if k != "wait"}
    worker_ms = sum(stages.values())
    # With workers: everything the parent process did, all its threads; in one process: its own stages.
    parent_ms = 1e3 * timings["parent_cpu"] / n if timings["workers"] > 1 else sum(parent.values())
    fixed = {k: timings["job"].get(k, 0.0) for k in JOB_STAGES}
    fixed["other"] = max(0.0, seconds - sum(fixed.values()) - timings["loop"])  # imports, pool stop, summary
    return {
        "worker_ms_per_volume": stages,
        "worker_ms_per_volume_total": worker_ms,
        "parent_ms_per_volume": parent,
        "parent_serial_ms_per_volume": parent_ms,
        "parent_saturates_at_workers": worker_ms / parent_ms if parent_ms > 0 else None,
        "fixed_s": fixed,
        "fixed_s_total": sum(fixed.values()),
    }


def largest_ct(samples: dict[str, Path], spacing: tuple[float, float, float], level: int) -> dict[str, Any]:
    """One worker's MB/s (source voxel MB per second of preparing) on the largest real CT here, both formats."""
    import SimpleITK as sitk
    import torch

    from data_prep.discover import InputFile
    from data_prep.options import ShardOptions
    from data_prep.prepare import Prepared, prepare_volume

    sizes = {}
    for name in image_names(samples):
        img = sitk.ReadImage(str(samples[name]))
        if sitk.GetArrayViewFromImage(img).min() <= -500:  # CT: air in HU
            sizes[name] = (
                int(np.prod(img.GetSize())) * sitk.GetArrayViewFromImage(img).dtype.itemsize,
                img.GetSize(),
            )
    name = max(sizes, key=lambda k: sizes[k][0])
    mb = sizes[name][0] / 1e6
    path = samples[name]
    item = InputFile(path=path, root=path.parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker process has
    out: dict[str, Any] = {"volume": name, "source_shape": list(sizes[name][1]), "source_mb": round(mb, 1)}
    try:
        for fmt in ("webdataset", "zarr"):
            opts = ShardOptions(spacing=spacing, format=fmt, compression_level=level, progress=False)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                result = prepare_volume(0, item, opts)
                best = min(best, time.perf_counter() - start)
            assert isinstance(result, Prepared), result
            out[fmt] = {"seconds": round(best, 3), "mb_per_s_per_worker": round(mb / best, 1)}
    finally:
        torch.set_num_threads(threads)
    return out


def compression(samples: dict[str, Path], spacing: tuple[float, float, float]) -> dict[str, Any]:
    """Stored bytes (uncompressed int16 CT, float16 MRI) over compressed bytes, per modality and codec level,
    on the real volumes as the sharder stores them."""
    from data_prep.prepare import detect_modality, intensity_policy, resample
    from data_prep.readers import load_volume
    from data_prep.zarr_writer import encode_array
    from pcrl.shards import compress_volume, npy_parts

    raw: dict[str, int] = {}
    packed: dict[str, dict[str, int]] = {}
    for name in image_names(samples):
        volume = load_volume(samples[name])
        if volume.array.dtype.kind not in "iu" and volume.array.dtype.kind != "f":
            continue
        modality, _ = detect_modality(volume, "auto")
        array, _ = resample(volume.array, volume.affine, volume.spacing, spacing)
        stored, _ = intensity_policy(array, modality)
        key = f"{modality} {stored.dtype}"
        head, data = npy_parts(stored)
        raw[key] = raw.get(key, 0) + len(head) + data.nbytes
        for level in (1, 3):
            for fmt, size in (
                ("webdataset", len(compress_volume(stored, level))),
                ("zarr", sum(len(b) for b in encode_array(stored, {}, level).values())),
            ):
                packed.setdefault(key, {}).setdefault(f"{fmt} level {level}", 0)
                packed[key][f"{fmt} level {level}"] += size
    return {
        key: {
            "stored_mb": round(raw[key] / 1e6, 1),
            **{k: round(raw[key] / v, 2) for k, v in packed[key].items()},
        }
        for key in raw
    }


def _program(args: list[str]) -> None:
    """Run ``python ARGS`` from the repository root; its output is shown only when it fails."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    if (
        argv is None and len(sys.argv) > 1 and sys.argv[1] == "--naive"
    ):  # the baseline, in a program of its own
        folder, out = Path(sys.argv[2]), Path(sys.argv[3])
        spacing = (
            tuple(float(v) for v in sys.argv[5:8]) if sys.argv[4:5] == ["--spacing"] else (1.0, 1.0, 1.0)
        )
        naive(sorted(p for p in folder.iterdir() if p.name.endswith(".nrrd")), out, spacing)  # type: ignore[arg-type]
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="pcrl worker counts to run")
    p.add_argument("--formats", nargs="+", default=["webdataset", "zarr"], choices=["webdataset", "zarr"])
    p.add_argument("--copies", type=int, default=20, help="distinct crops per real volume (1: the volumes)")
    p.add_argument(
        "--level", type=int, default=None, help="--compression-level of the pcrl runs (default: pcrl's)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest counts")
    p.add_argument(
        "--no-extras", action="store_true", help="skip the largest-CT rate and the compression table"
    )
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PCRL_CACHE", ".cache")) / "samples")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    spacing = tuple(args.spacing)
    from data_prep.options import DEFAULT_COMPRESSION_LEVEL

    level = DEFAULT_COMPRESSION_LEVEL if args.level is None else args.level

    samples = fetch_samples(args.cache)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pcrl-bench-prep-") as tmp:
        work = Path(tmp)
        paths = crops([samples[n] for n in image_names(samples)], args.copies, work / "inputs")
        megabytes = source_megabytes(paths)

        inputs = work / "inputs"
        if args.copies <= 1:  # the volumes themselves: linked into one folder, the job's input
            inputs.mkdir()
            for path in paths:
                (inputs / path.name).symlink_to(path)

        def run_naive() -> None:
            (work / "naive").mkdir()
            _program([__file__, "--naive", str(inputs), str(work / "naive"), "--spacing", *map(str, spacing)])

        variants: dict[str, Any] = {"naive (SimpleITK + np.save, 1 process)": (run_naive, None)}
        for fmt in args.formats:
            for workers in args.workers:

                def run(fmt: str = fmt, workers: int = workers) -> Any:
                    # A program of its own, as a user runs it: imports and starting the workers included.
                    out = work / "pcrl"
                    _program(["-m", "data_prep.shard", "--input", str(inputs), "--output", str(out), "--format", fmt,
                              "--workers", str(workers), "--compression-level", str(level), "--no-progress",
                              "--overwrite", "--spacing", *map(str, spacing)])  # fmt: skip
                    return json.loads((out / SUMMARY_NAME).read_text())

                variants[f"pcrl {fmt}, {workers} worker{'s' if workers > 1 else ''}"] = (run, (fmt, workers))
        for name, (fn, variant) in variants.items():
            best: tuple[float, Any] = (float("inf"), None)
            for _ in range(args.repeat):
                for folder in (
                    "naive",
                    "pcrl",
                ):  # every run writes into a new folder, removed before the clock
                    shutil.rmtree(work / folder, ignore_errors=True)
                start = time.perf_counter()
                summary = fn()
                best = min(best, (time.perf_counter() - start, summary), key=lambda r: r[0])
            seconds, summary = best
            r: dict[str, Any] = {
                "seconds": seconds,
                "volumes_per_s": len(paths) / seconds,
                "mb_per_s": megabytes / seconds,
            }
            if summary is not None:
                r.update(breakdown(summary["timings"], seconds))
                r["format"], r["workers"] = variant
                r["accepted"], r["stored_mb"] = summary["accepted"], summary["total_bytes"] / 1e6
                r["per_volume_s"] = seconds - r["fixed_s_total"]
            results[name] = r
    base = next(iter(results.values()))
    for r in results.values():
        r["ratio_to_naive"] = r["volumes_per_s"] / base["volumes_per_s"]
        if "per_volume_s" in r:
            r["ratio_to_naive_per_volume"] = base["seconds"] / r["per_volume_s"]
    scaling = {}
    for fmt in args.formats:
        one = [r for r in results.values() if r.get("format") == fmt and r["workers"] == min(args.workers)]
        for r in results.values():
            if one and r.get("format") == fmt and r["workers"] > min(args.workers):
                scaling[f"{fmt} {r['workers']} vs {min(args.workers)} workers"] = {
                    "all_in": one[0]["seconds"] / r["seconds"],
                    "per_volume": one[0]["per_volume_s"] / r["per_volume_s"],
                }
    report: dict[str, Any] = {
        "volumes": len(paths),
        "source_mb": round(megabytes, 1),
        "spacing": list(spacing),
        "compression_level": level,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "results": results,
        "scaling": scaling,
    }
    if not args.no_extras:
        report["largest_ct"] = largest_ct(samples, spacing, level)
        report["compression"] = compression(samples, spacing)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    results = report["results"]
    print(
        f"{report['volumes']} real volumes, {report['source_mb']:.0f} MB of source voxels → {report['spacing']} mm, "
        f"compression level {report['compression_level']}, {report['cpus']} CPUs"
    )
    print(
        f"{'variant':40s} {'s':>6s} {'vol/s':>6s} {'MB/s':>6s} {'x naive':>8s} {'fixed s':>8s} {'x naive, per volume':>20s}"
    )
    for name, r in results.items():
        extra = f"{r['fixed_s_total']:8.2f} {r['ratio_to_naive_per_volume']:20.2f}" if "fixed_s" in r else ""
        print(
            f"{name:40s} {r['seconds']:6.2f} {r['volumes_per_s']:6.2f} {r['mb_per_s']:6.1f} {r['ratio_to_naive']:8.2f} {extra}"
        )
    for name, s in report["scaling"].items():
        print(f"scaling, {name}: {s['all_in']:.2f}x all in, {s['per_volume']:.2f}x per volume")
    print(
        "\nper prepared volume, ms (where it is prepared; parent: its own stages, and its CPU in all threads)"
    )
    head = " ".join(f"{k:>9s}" for k in VOLUME_STAGES)
    print(
        f"{'variant':40s} {head} {'worker':>7s} | {'write':>6s} {'fsync':>6s} {'book':>6s} {'parent':>7s} {'saturates at':>13s}"
    )
    for name, r in results.items():
        if "worker_ms_per_volume" not in r:
            continue
        w, p_ = r["worker_ms_per_volume"], r["parent_ms_per_volume"]
        sat = r["parent_saturates_at_workers"]
        print(
            f"{name:40s} "
            + " ".join(f"{w[k]:9.1f}" for k in VOLUME_STAGES)
            + f" {r['worker_ms_per_volume_total']:7.1f} | "
            f"{p_['write']:6.1f} {p_['fsync']:6.1f} {p_['bookkeeping']:6.1f} {r['parent_serial_ms_per_volume']:7.1f} "
            f"{(f'{sat:.0f} workers' if sat else '-'):>13s}"
        )
    print("\nfixed costs per job, s")
    print(f"{'variant':40s} " + " ".join(f"{k:>10s}" for k in (*JOB_STAGES, "other")))
    for name, r in results.items():
        if "fixed_s" in r:
            print(f"{name:40s} " + " ".join(f"{r['fixed_s'][k]:10.2f}" for k in (*JOB_STAGES, "other")))
    if "largest_ct" in report:
        ct = report["largest_ct"]
        print(
            f"\nlargest real CT ({ct['volume']}, {ct['source_shape']}, {ct['source_mb']} MB int16), one worker: "
            + ", ".join(
                f"{f} {ct[f]['mb_per_s_per_worker']} MB/s ({ct[f]['seconds']} s)"
                for f in ("webdataset", "zarr")
            )
        )
        print("compression, stored bytes / compressed bytes:")
        for key, c in report["compression"].items():
            print(
                f"  {key} ({c['stored_mb']} MB stored): "
                + ", ".join(f"{k} {v}x" for k, v in c.items() if k != "stored_mb")
            )


if __name__ == "__main__":
    sys.exit(main())
