"""Samples/s of the PCRLv2 views (2 global + 6 local per sample), per core, on the same volumes in one run.

Two questions, answered separately because the reference and pcrl split the work differently:

(i) **Rendering**, from the same pre-drawn geometry for every variant (boxes, and for pcrl every other
    random choice, drawn up front by pcrl's sampler and not timed). This is what the reference's per-sample
    ``__getitem__`` does (docs/method.md §1.7: it only applies the torchio transforms to crop pairs cut
    OFFLINE by ``crop_pair``), so it is the like-for-like comparison of renderers:

    (a) ``torchio``: the reference recipe, one sample at a time: crop each box and resize it (trilinear),
        then 8 torchio pipelines (T_s then T_g for each global view, T_s then T_l for each local) — the baseline;
    (b) ``torch_cpu``: pcrl's torch renderer on the CPU: cut the regions per sample, render the batch at once;
    (c) ``dali_cpu``: the same draws rendered by DALI in CPU mode; and with CUDA,
    (d) ``torch_gpu`` and (e) ``dali_gpu``, from batches already cut and collated in pinned memory (the
    loader workers' share, ``sampler_ms.cut`` per sample on one CPU core), so their rate is the GPU's own.

(ii) **End to end with pcrl's online geometry sampling**: pcrl draws new boxes for every sample (the reference
    drew 16 pairs per CT once, offline, at 0.41 s per pair). The sampler's own cost per sample is measured
    on its own — ``sampler_ms.new_volume`` when every sample comes from a new volume
    (``views.pairs_per_volume: 1``, the default: the tissue filter's integral image is built each time) and
    ``sampler_ms.same_volume`` for further pairs of a volume already scored — and
    ``end_to_end_samples_per_s = 1 / (sampler + 1 / render rate)`` (one thread does both, one after the other;
    for a GPU variant ``1 / (sampler + cut + 1 / render rate)``: one CPU core drawing and cutting for the GPU,
    as one loader worker does, and waiting for it — a lower bound, since workers and GPU overlap).

CPU variants run on one thread (torch.set_num_threads(1); SimpleITK's global thread count 1 for torchio; one
DALI thread) and are measured in CPU time of this process (all its threads), so the ratios are per core and
time spent waiting for a core on a shared machine does not count; wall-clock rates are reported as well. The
load average is printed before and after: repeat the run and compare ratios from the same run only.

    python bench/views.py [--shards .cache/demo/shards] [--samples 16] [--batch 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl.config import ViewsConfig
from pcrl.shards import read_manifest, read_volume, threshold_to_unit, to_unit_range
from pcrl.views import DALISpatial, PCRLv2Views, ViewPlan, collate_draws, dali_available

VARIANTS = ("torchio", "torch_cpu", "dali_cpu", "torch_gpu", "dali_gpu")


def load_volumes(shards: str) -> list[tuple[torch.Tensor, float | None]]:
    """Every volume of the shards in [0, 1] with its tissue threshold (None for MRI)."""
    out = []
    for record in read_manifest(shards, "all"):
        array, _ = read_volume(record)
        volume = to_unit_range(array, record.modality, (-1000.0, 1000.0))
        out.append((volume, threshold_to_unit(-150.0, record.modality, (-1000.0, 1000.0))))
    return out


def torchio_renderer(cfg: ViewsConfig) -> Callable[[torch.Tensor, ViewPlan], dict]:
    """The reference's per-sample rendering (docs/method.md §1.7) of a plan's boxes with torchio."""
    import SimpleITK as sitk
    import torchio as tio

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    spatial = tio.Compose([tio.RandomFlip(axes=(0,)), tio.RandomAffine()])
    global_intensity = tio.Compose(
        [
            tio.RandomBlur(),
            tio.RandomNoise(),
            tio.RandomGamma(),
            tio.RandomSwap(patch_size=cfg.swap_patch),
            tio.ZNormalization(),
        ]
    )
    local_intensity = tio.Compose(
        [tio.RandomBlur(), tio.RandomNoise(), tio.RandomGamma(), tio.ZNormalization()]
    )

    def crop(volume: torch.Tensor, box, size) -> torch.Tensor:
        x = volume[box.slices][None, None]
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]

    def render(volume: torch.Tensor, plan: ViewPlan) -> dict:
        views, targets = [], []
        for box in plan.global_boxes:
            s = spatial(crop(volume, box, cfg.global_size))
            targets.append(s.clone())
            views.append(global_intensity(s))
        local_views = [local_intensity(spatial(crop(volume, b, cfg.local_size))) for b in plan.local_boxes]
        return {"global_views": views, "global_targets": targets, "local_views": local_views}

    return render


def rate(fn: Callable[[int], int], n: int, sync: bool = False, warmup: int = 1) -> tuple[float, float]:
    """Samples per second of wall time and per second of this process's CPU time (all its threads) of
    ``fn(i)`` (which returns the samples it did) over at least ``n`` samples, after ``warmup`` calls.

    On a shared machine the wall time counts the time spent waiting for a core; the CPU time does not, so
    the per-core ratios come from it.
    """
    # DALI builds its pipeline, CUDA initialises and loads kernels, the allocator grows
    for i in range(warmup):
        fn(i)
    if sync:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    done, i = 0, 1
    while done < n:
        done += fn(i)
        i += 1
    if sync:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0), done / (time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=".cache/demo/shards")
    p.add_argument("--samples", type=int, default=16, help="samples timed per CPU variant")
    p.add_argument("--gpu-samples", type=int, default=512, help="samples timed per GPU variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of: {' '.join(VARIANTS)}")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    cfg = ViewsConfig()
    volumes = load_volumes(args.shards)
    if not volumes:
        raise SystemExit(f"no volumes in {args.shards}: run make demo first, or pass --shards")
    b = args.batch
    views = PCRLv2Views(cfg)

    # Plans (every random choice) for the samples a CPU variant times, drawn once (GPU variants cycle through
    # them); sample i reads volume i mod V, so each plan comes from a new volume and builds its tissue integral.
    wanted = args.variants or list(VARIANTS)
    n_plans = b * (args.samples // b + 3)
    volume_of = [volumes[i % len(volumes)] for i in range(n_plans)]
    plans: list[ViewPlan] = []
    c0 = time.process_time()
    for i, (volume, threshold) in enumerate(volume_of):
        plans.append(views.plan(volume, i, threshold))
    new_volume_s = (time.process_time() - c0) / n_plans
    same_volume_s = _same_volume_seconds(views, volume_of[: len(volumes)], n_plans)
    c0 = time.process_time()
    for j in range(n_plans):
        views.cut(volume_of[j][0], plans[j])
    cut_s = (time.process_time() - c0) / n_plans

    torchio = torchio_renderer(cfg) if "torchio" in wanted else None

    def run_torchio(i: int) -> int:
        torchio(volume_of[i % n_plans][0], plans[i % n_plans])
        return 1

    def batch_of(i: int, pack: bool) -> dict:
        at = [j % n_plans for j in range(i * b, i * b + b)]
        draws = [views.cut(volume_of[j][0], plans[j]) for j in at]
        return collate_draws(draws, pack=pack)

    def run_torch(i: int) -> int:
        views.render(batch_of(i, False), "cpu")
        return b

    # A GPU variant renders batches the loader workers cut and collated (pinned, as the loader hands them
    # over): the cut is CPU work of the workers, timed on its own below, not of the GPU.
    gpu_batches: list[dict] = []
    if torch.cuda.is_available() and any(n.endswith("_gpu") for n in wanted):
        gpu_batches = [_pin(batch_of(i, True)) for i in range(n_plans // b)]

    def run_torch_gpu(i: int) -> int:
        views.render(gpu_batches[i % len(gpu_batches)], "cuda")
        return b

    dali = {}

    def run_dali(i: int, device_id: int | None = None) -> int:
        if device_id not in dali:
            spatial = DALISpatial(device_id=device_id, max_batch_size=b, num_threads=1)
            dali[device_id] = PCRLv2Views(cfg, spatial)
        # as the loader feeds it: the list of float32 crops on a CPU, the packed pinned batch on a GPU
        dali[device_id].render(batch_of(i, False) if device_id is None else gpu_batches[i % len(gpu_batches)])
        return b

    variants = {
        "torchio": lambda: rate(run_torchio, args.samples),
        "torch_cpu": lambda: rate(run_torch, args.samples),
        "dali_cpu": lambda: rate(run_dali, args.samples),
    }
    if torch.cuda.is_available():
        # Warm up on every pre-cut batch twice and time thousands of samples: a freshly started GPU's first
        # short run is several times slower than the later ones (docs/benchmarks.md).
        warm = 2 * len(gpu_batches)
        variants["torch_gpu"] = lambda: rate(run_torch_gpu, args.gpu_samples, sync=True, warmup=warm)
        variants["dali_gpu"] = lambda: rate(
            lambda i: run_dali(i, 0), args.gpu_samples, sync=True, warmup=warm
        )
    if not dali_available():
        for name in [n for n in wanted if n.startswith("dali")]:
            print(
                f"{name:10s} skipped: NVIDIA DALI is not installed (pip install 'pcrl[dali]')",
                file=sys.stderr,
            )
            variants.pop(name, None)
    results = {}
    for name in wanted:
        if name in variants:
            wall, cpu = variants[name]()
            # per core: CPU time on the CPU; a GPU variant's wall time is its cost (its CPU only launches)
            render = wall if name.endswith("_gpu") else cpu
            results[name] = {
                "render_samples_per_s": render,
                "render_samples_per_wall_s": wall,
                # a GPU variant's worker also cuts the regions (a CPU variant's rate includes its cut)
                "end_to_end_samples_per_s": 1.0
                / (new_volume_s + (cut_s if name.endswith("_gpu") else 0.0) + 1.0 / render),
            }
            print(
                f"{name:10s} {render:8.2f} samples/s rendering ({wall:.2f} per wall second)", file=sys.stderr
            )
    base = results.get("torchio")
    if base:
        for r in results.values():
            r["render_x_torchio"] = r["render_samples_per_s"] / base["render_samples_per_s"]
            r["end_to_end_x_torchio"] = r["end_to_end_samples_per_s"] / base["end_to_end_samples_per_s"]
    report = {
        "batch": b,
        "volumes": len(volumes),
        "threads": 1,
        "sampler_ms": {
            "new_volume": new_volume_s * 1e3,
            "same_volume": same_volume_s * 1e3,
            "cut": cut_s * 1e3,
        },
        "results": results,
        "loadavg": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"load average {report['loadavg']['before']:.2f} before, {report['loadavg']['after']:.2f} after; "
        f"{len(volumes)} volumes, batch {b}, one thread"
    )
    print(
        f"pcrl sampler (geometry + tissue filter): {new_volume_s * 1e3:.1f} ms/sample from a new volume, "
        f"{same_volume_s * 1e3:.2f} ms from the same volume again"
    )
    print("samples per CPU second of one thread (GPU variants: per wall second)")
    print(f"{'':10s} {'rendering (same geometry)':>33s}   {'end to end (with sampler)':>33s}")
    for name, r in results.items():
        print(
            f"{name:10s} {r['render_samples_per_s']:10.2f} samples/s {r.get('render_x_torchio', float('nan')):6.2f}x torchio"
            f"   {r['end_to_end_samples_per_s']:10.2f} samples/s {r.get('end_to_end_x_torchio', float('nan')):6.2f}x torchio"
        )


def _pin(batch: dict) -> dict:
    """The batch with its tensors in pinned memory, as a loader with ``pin_memory`` hands it over."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _same_volume_seconds(
    views: PCRLv2Views, volumes: list[tuple[torch.Tensor, float | None]], seed0: int
) -> float:
    """CPU seconds per plan of a further pair from a volume just planned (the tissue integral is cached)."""
    total = 0.0
    for i, (volume, threshold) in enumerate(volumes):
        views.plan(volume, seed0 + 2 * i, threshold)  # builds (or finds) this volume's integral
        c0 = time.process_time()
        views.plan(volume, seed0 + 2 * i + 1, threshold)
        total += time.process_time() - c0
    return total / len(volumes)


if __name__ == "__main__":
    main()
