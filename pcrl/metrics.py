"""What the training loop measures: the log window of loss means and throughput, the model's FLOPs per
sample, peak memory, fp16 loss-scale state, and the per-rank record of the samples each step saw."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from pcrl import distributed
from pcrl.config import PretrainConfig
from pcrl.io import read_jsonl

__all__ = [
    "MetricWindow",
    "SampleKeyLog",
    "flops_per_sample",
    "loss_scale_metrics",
    "peak_memory_gib",
]


class MetricWindow:
    """The loss sums, step count and timing since the last log line.

    The sums stay on the device, in float64, until a log step reads them (:meth:`loss_means`), so the steps in
    between never wait for it. They are part of a checkpoint (:meth:`state_dict`, as floats: exact), so a run
    resumed in the middle of a window logs the same means as an uninterrupted one; the timing restarts with
    the process.

    Args:
        terms: the objective's loss-term names (logged as ``loss/<name>``, ``loss`` as ``loss/total``).
        accum: micro-batches per optimizer step.
        state: a :meth:`state_dict` to continue from.
        device: where the sums are kept (the device the loss terms come from).
    """

    def __init__(
        self,
        terms: Sequence[str],
        accum: int,
        state: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.terms = tuple(terms)
        self.accum = accum
        self.device = torch.device(device)
        self.reset()
        if state is not None:
            self.sums = torch.tensor(
                [float(state["sums"][k]) for k in self.terms], dtype=torch.float64, device=self.device
            )
            self.steps = int(state["steps"])
            # Micro-batches whose losses the sums hold (skipped non-finite ones are left out of the means).
            self.micro = int(state.get("micro", self.steps * accum))

    def reset(self) -> None:
        """Start a new window now."""
        self.sums = torch.zeros(len(self.terms), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.micro = 0
        self.wait_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, terms: torch.Tensor) -> None:
        """Count one micro-batch's loss terms: a (len(terms),) tensor in ``terms`` order (not read here)."""
        self.micro += 1
        self.sums += terms.detach().to(torch.float64) / self.accum

    def loss_means(self) -> dict[str, float]:
        """``loss/<term>``: the window's mean per optimizer step, averaged over ranks (a collective: call on
        every rank; it waits for the device). NaN when every micro-batch of the window was skipped."""
        counted = self.micro / self.accum
        means = self.sums / counted if counted else torch.full_like(self.sums, math.nan)
        values = distributed.reduce_to_host(means, mean=True)
        return {f"loss/{'total' if k == 'loss' else k}": v for k, v in zip(self.terms, values, strict=True)}

    def throughput(self, samples_per_step: int, flops_per_sample: float, world: int) -> dict[str, float]:
        """``perf/*`` and ``memory/peak_gib`` over the window's wall time."""
        elapsed = time.perf_counter() - self.t0
        samples_per_s = samples_per_step * self.steps / elapsed
        return {
            "perf/samples_per_s": samples_per_s,
            # Per device, the figure to hold against a device's peak (MFU).
            "perf/tflops_per_device": flops_per_sample * samples_per_s / world / 1e12,
            "perf/data_wait_frac": self.wait_s / elapsed,
            "perf/step_time_s": elapsed / self.steps,
            "memory/peak_gib": peak_memory_gib(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The part a checkpoint keeps: ``steps``, ``micro`` and ``sums``."""
        return {
            "steps": self.steps,
            "micro": self.micro,
            "sums": dict(zip(self.terms, self.sums.tolist(), strict=True)),
        }


class SampleKeyLog:
    """``sample_keys/rank<r>.jsonl``: the volume keys of every micro-batch a rank trained on, one record per
    micro-batch (``{"step", "keys"}``), to audit the data order across resumes (``tracking.sample_keys``).

    Args:
        run_dir: the run folder.
        rank: this process's rank.
        resume_step: the step resumed from; records after it (written after that checkpoint) are dropped.
    """

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None) -> None:
        path = run_dir / "sample_keys" / f"rank{rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        if resume_step is not None and path.exists():
            records, dropped = read_jsonl(path)  # a line cut short by a kill ends the valid part
            kept = [r for r in records if r.get("step", math.inf) <= resume_step]
            if dropped or len(kept) < len(records):
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file: IO[str] = path.open("a")

    def write(self, step: int, keys: Sequence[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")

    def close(self) -> None:
        self._file.close()


def flops_per_sample(cfg: PretrainConfig) -> float:
    """FLOPs of one sample's forward and backward through the full objective, counted by torch's
    FlopCounterMode on meta tensors (no memory, no arithmetic). Model FLOPs in the MFU sense: activation
    checkpointing's recomputation is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from pcrl.objective import build_task

    b = cfg.train.micro_batch_size
    with torch.device("meta"):
        task = build_task(cfg, activation_checkpointing=False)
        global_views = torch.empty(b, 2, 1, *cfg.views.global_size)
        local_views = torch.empty(b, cfg.views.num_locals, 1, *cfg.views.local_size)
    with FlopCounterMode(display=False) as counter:
        out = task(
            global_views, global_views, local_views, beta=1.0, generator=torch.Generator().manual_seed(0)
        )
        out["loss"].backward()
    return counter.get_total_flops() / b


def peak_memory_gib() -> float:
    """Peak device memory allocated (CUDA) or the process's peak resident set (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def loss_scale_metrics(engine: Any) -> dict[str, float]:
    """fp16 only: DeepSpeed's dynamic loss scale and the steps it skipped on overflow, so a run whose scale
    collapses (steps silently skipped) shows it in MLflow."""
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None:
        scale = getattr(opt, "loss_scale", None)
    out = {"optim/skipped_steps": float(getattr(engine, "skipped_steps", 0))}
    if scale is not None:
        out["optim/loss_scale"] = float(scale)
    return out
