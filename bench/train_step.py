"""Step time of the full PCRLv2 objective: fp32 eager (the baseline) against pcrl's fast settings, in one
process on the same inputs. Prints samples/s, achieved TFLOP/s (FLOPs counted by torch), peak memory and
the ratio to the baseline.

    python bench/train_step.py                       # CPU, tiny-ish widths, 2 threads
    python bench/train_step.py --device cuda --batch 16 --base-channels 32 --global-size 64 64 32 --json

Without ``--variants`` a CPU run compares the settings that can win on this CPU: the bf16 ones where it
has bf16 instructions (AVX512-BF16/AMX: oneDNN's fast bf16 convolutions want channels-last), else fp32
with channels-last and torch.compile (bf16 then runs on a slow reference kernel, tens of times slower).

``compile`` variants compile the U-Net alone, as ``engine.compile`` does (``PCRLv2UNet.compile``, static
shapes): the objective and its random scale draws stay eager, so the graphs do not depend on the draws.
Every variant is built (and compiled) first, then timed in ``--repeats`` rounds that alternate the
variants, so a shared machine's load changes hit them alike; each figure is the mean over the rounds, with
its standard deviation.

The optimizer step (SGD, as the paper) is included; the views are fixed random tensors, so this measures
the model + objective + update, not the data path (bench/views.py covers that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
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
    "fp32-cl-compile": (None, True, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16-cl": (torch.bfloat16, True, False),
    "bf16-compile": (torch.bfloat16, False, True),
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


def prepare_variant(name: str, args: argparse.Namespace, device: torch.device) -> Callable[[], torch.Tensor]:
    """Build the variant's task and optimizer and warm it up (compiling, for compile variants); returns its
    training step, which returns the loss without a host sync."""
    dtype, channels_last, compile_ = VARIANTS[name]
    task, opt = build(args, device, channels_last)
    if compile_:
        task.model.compile(dynamic=False)
    batch = make_batch(args, device)
    gen = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = task(**batch, beta=0.5, generator=gen)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    for _ in range(args.warmup):
        step()
    return step


def time_steps(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step over ``steps`` steps, and the last loss."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final = float(loss)  # one host sync at the end, not per step
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, final


def run_variants(
    names: list[str], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    """Time every variant in ``args.repeats`` alternating rounds of ``args.steps`` steps."""
    cuda = device.type == "cuda"
    # Dynamo keeps the graphs of every model instance on the one forward code object and, past its
    # recompile limit (8), silently runs the rest eager: each compiled variant adds three graphs.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(names))
    steps = {}
    for name in names:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        steps[name] = prepare_variant(name, args, device)
        print(f"{name}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in names}
    finals: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in names:
            dt, finals[name] = time_steps(steps[name], args.steps, device)
            times[name].append(dt)
            print(f"{name}: {dt:.3f} s/step", file=sys.stderr, flush=True)
    results = {}
    for name in names:
        rates = [args.batch / dt for dt in times[name]]
        res = {
            "step_s": statistics.fmean(times[name]),
            "samples_per_s": statistics.fmean(rates),
            "samples_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "repeats": len(rates),
            "step_s_rounds": times[name],
            "final_loss": finals[name],
        }
        if cuda:
            # Over every variant built so far: the variants share the process.
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        results[name] = res
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternating timed rounds of --steps steps")
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
            args.variants = ["fp32", "bf16", "bf16-cl", "bf16-compile", "bf16-cl-compile"]
        else:
            args.variants = ["fp32", "fp32-cl", "fp32-compile", "fp32-cl-compile"]

    flops = count_flops(args, device)
    results = run_variants(args.variants, args, device)
    for name in args.variants:
        results[name]["tflops"] = flops * results[name]["samples_per_s"] / 1e12
        if args.peak_tflops:
            results[name]["mfu"] = results[name]["tflops"] / args.peak_tflops
    # The speed-up is paired by round (baseline and variant timed back to back), then averaged.
    base = results[args.variants[0]]["step_s_rounds"]
    for r in results.values():
        ratios = [b / t for b, t in zip(base, r["step_s_rounds"], strict=True)]
        r["speedup_vs_" + args.variants[0]] = statistics.fmean(ratios)
        r["speedup_sd"] = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
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
            f"  {name:16s} {r['step_s'] * 1e3:9.1f} ms/step  {r['samples_per_s']:8.2f} ± "
            f"{r['samples_per_s_sd']:.2f} samples/s  "
            f"{r['tflops']:7.3f} TFLOP/s  peak {mem:5.2f} GiB  "
            f"x{r['speedup_vs_' + args.variants[0]]:.2f} ± {r['speedup_sd']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
