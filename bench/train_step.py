"""Step time of the full PCRLv2 objective: fp32 eager (the baseline) against pcrl's fast settings, in one
process on the same inputs. Prints samples/s, achieved TFLOP/s (FLOPs counted by torch), peak memory and
the ratio to the baseline.

    python bench/train_step.py                       # CPU, tiny-ish widths, 2 threads
    python bench/train_step.py --device cuda --batch 16 --base-channels 32 --global-size 64 64 32 --json

Without ``--variants`` a CPU run compares the settings that can win on this CPU: the bf16 ones where it
has bf16 instructions (AVX512-BF16/AMX: oneDNN's fast bf16 convolutions want channels-last), else fp32
with channels-last and torch.compile (bf16 then runs on a slow reference kernel, tens of times slower).

The optimizer step (SGD, as the paper) is included; the views are fixed random tensors, so this measures
the model + objective + update, not the data path (bench/views.py covers that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcrl.engine import cpu_has_bf16
from pcrl.model import PCRLv2UNet
from pcrl.objective import PCRLv2Objective, PCRLv2Task

VARIANTS = {
    # name: (autocast dtype or None, channels_last_3d, torch.compile)
    "fp32": (None, False, False),
    "fp32-cl": (None, True, False),
    "fp32-compile": (None, False, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16-cl": (torch.bfloat16, True, False),
    "bf16-cl-compile": (torch.bfloat16, True, True),
}


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, n_loc = args.batch, args.locals
    gs, ls = tuple(args.global_size), tuple(args.local_size)
    return {
        "global_views": torch.randn((b, 2, 1, *gs), generator=g).to(device),
        "global_targets": torch.rand((b, 2, 1, *gs), generator=g).to(device),
        "local_views": torch.randn((b, n_loc, 1, *ls), generator=g).to(device),
    }


def build(
    args: argparse.Namespace, device: torch.device, channels_last: bool
) -> tuple[PCRLv2Task, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = PCRLv2UNet(base_channels=args.base_channels, depth=4, norm="batch")
    task = PCRLv2Task(model, PCRLv2Objective(restore_views=(1,))).to(device)
    if channels_last:
        task = task.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(task.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return task, opt


def count_flops(args: argparse.Namespace, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    task, _ = build(args, device, channels_last=False)
    batch = make_batch(args, device)
    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        out = task(**batch, beta=1.0, generator=gen)
        out["loss"].backward()
    return counter.get_total_flops() / args.batch


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    dtype, channels_last, compile_ = VARIANTS[name]
    task, opt = build(args, device, channels_last)
    step_fn = torch.compile(task) if compile_ else task
    batch = make_batch(args, device)
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = step_fn(**batch, beta=0.5, generator=gen)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    final = float(loss)  # one host sync at the end, not per step
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    res = {"step_s": dt, "samples_per_s": args.batch / dt, "final_loss": final}
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--global-size", type=int, nargs=3, default=[64, 64, 32])
    p.add_argument("--local-size", type=int, nargs=3, default=[16, 16, 16])
    p.add_argument("--locals", type=int, default=6)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="the first is the baseline")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak, to report MFU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.variants is None:
        if device.type == "cuda" or cpu_has_bf16():
            args.variants = ["fp32", "bf16", "bf16-cl", "bf16-cl-compile"]
        else:
            args.variants = ["fp32", "fp32-cl", "fp32-compile"]

    flops = count_flops(args, device)
    results = {}
    for name in args.variants:
        results[name] = run_variant(name, args, device)
        results[name]["tflops"] = flops * results[name]["samples_per_s"] / 1e12
        if args.peak_tflops:
            results[name]["mfu"] = results[name]["tflops"] / args.peak_tflops
    base = results[args.variants[0]]["samples_per_s"]
    for r in results.values():
        r["speedup_vs_" + args.variants[0]] = r["samples_per_s"] / base
    report = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch": args.batch,
        "base_channels": args.base_channels,
        "global_size": args.global_size,
        "local_size": args.local_size,
        "gflop_per_sample": flops / 1e9,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['device']}, torch {torch.__version__}, batch {args.batch}, width {args.base_channels}, "
        f"global {args.global_size}, local {args.local_size}: {flops / 1e9:.1f} GFLOP per sample (fwd+bwd)"
    )
    for name, r in results.items():
        mem = r.get("peak_mem_gib", r.get("peak_rss_gib", 0.0))
        print(
            f"  {name:16s} {r['step_s'] * 1e3:9.1f} ms/step  {r['samples_per_s']:8.2f} samples/s  "
            f"{r['tflops']:7.3f} TFLOP/s  peak {mem:5.2f} GiB  x{r['speedup_vs_' + args.variants[0]]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
