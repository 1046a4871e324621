"""The console progress line of a training run: one readable line per log step (progress, losses, speed,
ETA), and a live bar when stderr is a terminal."""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from collections.abc import Mapping

__all__ = ["ConsoleProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725`` → ``'1:02:05'``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=int(seconds)))


class ConsoleProgress:
    """One readable line per log step (with progress and ETA), plus a live bar when stderr is a terminal.

    The line carries the progress itself, so logs captured by Slurm or CI (no terminal) stay readable.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total = total_steps
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._s0 = start_step
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def update(self, step: int) -> None:
        self._bar.n = step
        self._bar.refresh()

    def eta(self, step: int) -> float:
        done = step - self._s0
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        pct = 100.0 * step / self.total
        parts = [f"step {step}/{self.total} ({pct:.0f}%)"]
        loss_keys = [k for k in metrics if k.startswith("loss/")]
        parts.append(" ".join(f"{k.removeprefix('loss/')} {metrics[k]:.4f}" for k in loss_keys))
        if "optim/lr" in metrics:
            parts.append(f"lr {metrics['optim/lr']:.2e}")
        if "schedule/beta" in metrics:
            parts.append(f"β {metrics['schedule/beta']:.3f}")
        # Evaluation steps only: the held-out restoration quality (what sweeps optimise) and the probe.
        if "val/psnr" in metrics:
            parts.append(f"val psnr {metrics['val/psnr']:.2f} dB")
        if "probe/accuracy" in metrics:
            parts.append(f"probe acc {metrics['probe/accuracy']:.3f}")
        if "perf/samples_per_s" in metrics:
            parts.append(f"{metrics['perf/samples_per_s']:.2f} samples/s")
        if "perf/tflops_per_device" in metrics:
            parts.append(f"{metrics['perf/tflops_per_device']:.3g} TFLOP/s per device")
        if "perf/data_wait_frac" in metrics:
            parts.append(f"data wait {100 * metrics['perf/data_wait_frac']:.0f}%")
        if "memory/peak_gib" in metrics:
            parts.append(f"peak {metrics['memory/peak_gib']:.2f} GiB")
        parts.append(f"eta {format_duration(self.eta(step))}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._bar.write(self.line(step, metrics), file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
