"""Samples/s of the PCRLv2 views (2 global + 6 local per sample), per core, on the same volumes in one run:

(a) the reference recipe with torchio, one sample at a time (8 torchio pipelines per sample: T_s then T_g for
    each global view, T_s then T_l for each local; crops resized with trilinear interpolation), the baseline;
(b) pcrl's torch renderer on the CPU, a whole batch at once; (c) DALI in CPU mode; and with CUDA,
(d) the torch renderer on the GPU and (e) DALI on the GPU.

Every variant starts from the same decoded volumes and draws its geometry from pcrl's sampler (the same cost
everywhere). CPU variants run on one thread (torch.set_num_threads(1); SimpleITK's global thread count 1 for
torchio; one DALI thread), so the ratios are per core.

    python bench/views.py [--shards .cache/demo/shards] [--samples 16] [--batch 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl.config import ViewsConfig
from pcrl.data import _threshold_to_unit, read_manifest, read_volume, to_unit_range
from pcrl.views import PCRLv2Views, collate_draws, sample_global_pair, sample_local_boxes


def load_volumes(shards: str) -> list[tuple[torch.Tensor, float | None]]:
    out = []
    for record in read_manifest(shards, "all"):
        array, _ = read_volume(record)
        volume = to_unit_range(array, record.modality, (-1000.0, 1000.0))
        out.append((volume, _threshold_to_unit(-150.0, record.modality, (-1000.0, 1000.0))))
    return out


def torchio_baseline(cfg: ViewsConfig):
    import numpy as np
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

    def sample(volume: torch.Tensor, seed: int, threshold: float | None) -> dict:
        rng = np.random.default_rng(seed)
        b1, b2 = sample_global_pair(volume.shape, cfg, rng, volume, threshold)
        locs = sample_local_boxes(volume.shape, b1, b2, cfg, rng)
        views, targets = [], []
        for box in (b1, b2):
            s = spatial(crop(volume, box, cfg.global_size))
            targets.append(s.clone())
            views.append(global_intensity(s))
        local_views = [local_intensity(spatial(crop(volume, b, cfg.local_size))) for b in locs]
        return {"global_views": views, "global_targets": targets, "local_views": local_views}

    return sample


def timed(fn, n: int, sync: bool = False) -> float:
    fn(0)  # warm-up (DALI builds its pipeline, CUDA initialises)
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    i = 1
    while done < n:
        done += fn(i)
        i += 1
    if sync:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=".cache/demo/shards")
    p.add_argument("--samples", type=int, default=16, help="samples timed per CPU variant")
    p.add_argument("--gpu-samples", type=int, default=512, help="samples timed per GPU variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--variants", nargs="*", default=None, help="subset of: torchio torch_cpu dali_cpu torch_gpu dali_gpu"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = ViewsConfig()
    volumes = load_volumes(args.shards)
    b = args.batch

    def pick(i: int) -> tuple[torch.Tensor, float | None]:
        return volumes[i % len(volumes)]

    views = PCRLv2Views(cfg)
    baseline = torchio_baseline(cfg)

    def run_torchio(i: int) -> int:
        baseline(*(lambda v: (v[0], i, v[1]))(pick(i)))
        return 1

    def batch_of(i: int, stack: bool) -> dict:
        draws = [views.draw(pick(i * b + j)[0], i * b + j, pick(i * b + j)[1]) for j in range(b)]
        return collate_draws(draws, stack_regions=stack)

    def run_torch(i: int, device: str = "cpu") -> int:
        views.render(batch_of(i, device != "cpu"), device)
        return b

    dali = {}

    def run_dali(i: int, device_id: int | None = None) -> int:
        from pcrl.dali import DALIViews

        if device_id not in dali:
            dali[device_id] = DALIViews(cfg, device_id=device_id, max_batch_size=b, num_threads=1)
        dali[device_id].render(batch_of(i, True))
        return b

    variants = {
        "torchio": lambda: timed(run_torchio, args.samples),
        "torch_cpu": lambda: timed(run_torch, args.samples),
        "dali_cpu": lambda: timed(run_dali, args.samples),
    }
    if torch.cuda.is_available():
        variants["torch_gpu"] = lambda: timed(lambda i: run_torch(i, "cuda"), args.gpu_samples, sync=True)
        variants["dali_gpu"] = lambda: timed(lambda i: run_dali(i, 0), args.gpu_samples, sync=True)
    wanted = args.variants or list(variants)
    results = {}
    for name in wanted:
        if name in variants:
            results[name] = {"samples_per_s": variants[name]()}
            print(f"{name:10s} {results[name]['samples_per_s']:8.2f} samples/s", file=sys.stderr)
    base = results.get("torchio", {}).get("samples_per_s")
    if base:
        for r in results.values():
            r["x_torchio"] = r["samples_per_s"] / base
    report = {"batch": b, "volumes": len(volumes), "threads": 1, "results": results}
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in results.items():
            print(
                f"{name:10s} {r['samples_per_s']:8.2f} samples/s  {r.get('x_torchio', float('nan')):5.2f}x torchio"
            )


if __name__ == "__main__":
    main()
