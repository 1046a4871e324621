"""Throughput of ``python -m data_prep.shard`` against a naive baseline, in one run on the same real volumes.

The baseline is what a script without pcrl would do, in one process: read each file with SimpleITK,
resample it to the target spacing with linear interpolation (``sitk.Resample``), ``np.save`` it. It does
no reorientation, intensity policy, validation, compression, manifest or resume bookkeeping, so it is a
floor on the work, not an equal. pcrl's prep runs through :func:`data_prep.shard.shard_volumes` with 1 and
2 worker processes (pool start-up included: it is part of every job), in WebDataset and Zarr formats.

    python bench/prep.py                      # 4 crops of each of the five pyradiomics volumes, 1 mm
    python bench/prep.py --copies 1 --repeat 3 --json   # the five volumes as they are, best of 3, JSON

``--copies N`` writes N distinct crops (90 % of each axis, shifted) of every real volume as NRRD, so that
a run has enough volumes for a process pool to pay off, and none is a duplicate of another.

Reports volumes/s and MB/s (MB of source voxels, as decoded from the inputs, per second) and each
variant's ratio to the baseline. Numbers on a shared machine are noisy: compare ratios from one run.

With Zarr it also measures the parent's serial work per volume, which bounds the throughput of any number
of workers: the earlier design (workers send zstd ``.npy`` bytes; the parent decompresses, Blosc-compresses
and writes the array) against the current one (workers send the array's compressed files; the parent
writes bytes), on the same volumes in the same process.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.fetch import fetch_samples, image_names
from data_prep.prepare import output_shape
from data_prep.shard import shard_volumes


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
    import SimpleITK as sitk

    total = 0
    for path in paths:
        img = sitk.ReadImage(str(path))
        total += int(np.prod(img.GetSize())) * sitk.GetArrayViewFromImage(img).dtype.itemsize
    return total / 1e6


def zarr_parent_seconds(records: list, out: Path) -> dict[str, float]:
    """Parent-side seconds per volume: compress in the parent (before) vs write the worker's files (now)."""
    import io

    import zarr
    import zstandard
    from zarr.codecs import BloscCodec

    from data_prep.zarr_writer import CHUNK, ZarrWriter, encode_array
    from pcrl.shards import encode_volume, read_volume

    out.mkdir(parents=True, exist_ok=True)
    writer = ZarrWriter(out)
    before = now = 0.0
    for i, record in enumerate(records):
        volume, meta = read_volume(record)
        image, _ = encode_volume(volume)  # what a worker sent before
        files = encode_array(volume, meta)  # what a worker sends now
        start = time.perf_counter()
        array = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(image)), allow_pickle=False)
        z = zarr.create_array(
            store=str(out / f"before-{i}"), shape=array.shape, dtype=array.dtype,
            chunks=tuple(min(c, n) for c, n in zip(CHUNK, array.shape, strict=True)),
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")], attributes=meta, zarr_format=3,
        )  # fmt: skip
        z[...] = array
        before += time.perf_counter() - start
        start = time.perf_counter()
        writer.add(f"now-{i}", files)
        now += time.perf_counter() - start
    n = max(1, len(records))
    return {"before_s_per_volume": before / n, "now_s_per_volume": now / n, "ratio": before / max(now, 1e-9)}


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="pcrl worker counts to run")
    p.add_argument("--formats", nargs="+", default=["webdataset", "zarr"], choices=["webdataset", "zarr"])
    p.add_argument("--copies", type=int, default=4, help="distinct crops per real volume (1: the volumes)")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest counts")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("PCRL_CACHE", ".cache")) / "samples")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    spacing = tuple(args.spacing)

    samples = fetch_samples(args.cache)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pcrl-bench-prep-") as tmp:
        work = Path(tmp)
        paths = crops([samples[n] for n in image_names(samples)], args.copies, work / "inputs")
        megabytes = source_megabytes(paths)

        def run_naive() -> None:
            shutil.rmtree(work / "naive", ignore_errors=True)
            (work / "naive").mkdir()
            naive(paths, work / "naive", spacing)

        variants = {"naive (SimpleITK + np.save, 1 process)": run_naive}
        for fmt in args.formats:
            for workers in args.workers:

                def run(fmt: str = fmt, workers: int = workers) -> None:
                    shard_volumes(
                        paths, work / "pcrl", spacing=spacing, format=fmt, workers=workers, progress=False,
                        overwrite=True,
                    )  # fmt: skip

                variants[f"pcrl {fmt}, {workers} worker{'s' if workers > 1 else ''}"] = run
        for name, fn in variants.items():
            seconds = timed(fn, args.repeat)
            results[name] = {
                "seconds": seconds,
                "volumes_per_s": len(paths) / seconds,
                "mb_per_s": megabytes / seconds,
            }
        parent = None
        if "zarr" in args.formats:
            from pcrl.shards import read_manifest

            parent = zarr_parent_seconds(read_manifest(work / "pcrl", "all")[:4], work / "parent")
    base = next(iter(results.values()))
    for r in results.values():
        r["ratio_to_naive"] = r["volumes_per_s"] / base["volumes_per_s"]
    report = {
        "volumes": len(paths),
        "source_mb": round(megabytes, 1),
        "spacing": list(spacing),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "results": results,
        "zarr_parent": parent,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{len(paths)} real volumes, {megabytes:.0f} MB of source voxels → {list(spacing)} mm, {os.cpu_count()} CPUs"
    )
    print(f"{'variant':44s} {'s':>7s} {'vol/s':>7s} {'MB/s':>7s} {'× naive':>8s}")
    for name, r in results.items():
        print(
            f"{name:44s} {r['seconds']:7.2f} {r['volumes_per_s']:7.3f} {r['mb_per_s']:7.1f} "
            f"{r['ratio_to_naive']:8.2f}"
        )
    if parent:
        print(
            f"zarr, parent's serial work per volume: {parent['before_s_per_volume']:.3f} s compressing in the "
            f"parent (before) vs {parent['now_s_per_volume']:.3f} s writing the worker's files (now): "
            f"{parent['ratio']:.1f}x less"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
