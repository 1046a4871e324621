"""The training step's speed contracts, checked by counting rather than timing: the loop reads the device only
where it must (once per optimizer step for the non-finite check, and at log steps)."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import TINY
from torch.overrides import TorchFunctionMode

from pcrl.config import load_config
from pcrl.distributed import free_port
from pcrl.engine import configure_logging, train

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__bool__,
}
"""Tensor methods that copy a value to the host, so wait for the device."""

HOT_PATH = ("pcrl/engine.py", "pcrl/metrics.py", "pcrl/objective.py", "pcrl/model.py", "pcrl/distributed.py")


class HostReads(TorchFunctionMode):
    """Counts host reads of computed values, by the innermost function of the training loop's modules that
    made them (``file:function``).

    Integer CPU tensors are not counted: they are the objective's scale draws, from a CPU generator, which
    never wait for a device. Reads made while saving a checkpoint are not counted: a checkpoint step syncs by
    nature.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in READS:
            t = args[0]
            if t.is_floating_point() or t.dtype == torch.bool or t.device.type != "cpu":
                stack = traceback.extract_stack()
                if not any("pcrl/checkpoint.py" in f.filename for f in stack):
                    hot = [
                        f
                        for f in stack
                        if f.filename.endswith(HOT_PATH) and "distributed.py" not in f.filename
                    ]
                    site = f"{Path(hot[-1].filename).name}:{hot[-1].name}" if hot else "elsewhere"
                    self.sites[site] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.integration
def test_train_reads_the_device_once_per_step_and_at_log_steps(
    sample_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine, in this process, six optimizer steps of two micro-batches, logging every third step,
    under a tracer of host reads. The only reads allowed: the non-finite check, once per optimizer step
    (before the update, after backward is queued), the loss means at the two log steps, and the window's
    sums for the checkpoint at the end. Pins a
    ``float(loss)``, ``.item()`` or ``bool(tensor)`` coming back into the step (in our code or in DeepSpeed's
    step under our settings): each makes a GPU wait for the host every micro-batch."""
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = load_config(
        TINY,
        [
            f"data.shards={sample_shards}",
            f"run.output_dir={tmp_path}",
            "run.name=reads",
            "train.max_steps=6",
            "train.grad_accum_steps=2",
            "train.log_every=3",
            "train.checkpoint_every=0",
            "train.grad_clip=1.0",
            "data.num_workers=1",  # the views render in the worker process, outside the tracer
            "eval.every=0",
            "tracking.image_every=0",
            "tracking.enabled=false",
        ],
    )
    configure_logging()
    reads = HostReads()
    with reads:
        metrics = train(cfg)
    assert metrics["loss/total"] == metrics["loss/total"]  # logged and finite
    assert dict(reads.sites) == {"engine.py:check": 6, "metrics.py:loss_means": 2, "metrics.py:state_dict": 1}
