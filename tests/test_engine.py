"""The training step's speed contracts, checked by counting rather than timing: ``engine.compile`` compiles a
fixed set of graphs whatever scales the objective draws, and the loop reads the device only where it must
(once per optimizer step for the non-finite check, and at log steps)."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import TINY
from torch.overrides import TorchFunctionMode

from pcrl import distributed, engine
from pcrl.config import load_config
from pcrl.distributed import free_port
from pcrl.engine import compile_model, compiled_graphs, configure_logging, resolve_auto, train
from pcrl.model import PCRLv2UNet
from pcrl.objective import PCRLv2Objective, PCRLv2Task


@pytest.mark.parametrize(
    ("restore_views", "channels_last", "graphs"),
    [((1,), False, 3), ((1, 2), True, 2)],
)
def test_compile_model_compiles_each_forward_once_whatever_the_draws(
    restore_views: tuple[int, ...], channels_last: bool, graphs: int
) -> None:
    """Twelve steps of the full objective with the U-Net compiled as the engine does it. The objective draws a
    new scale each step (eager, from the generator), yet only one graph per kind of forward may exist: view 1,
    view 2 (features only when it is not restored) and the local views. Pins the old failure where the scale
    draws were part of the compiled code and rebuilt its graphs (fp32 + compile ran 0.27× eager). The
    ``eager`` backend checks dynamo's graphs and guards without generating code (the same graphs inductor
    gets), so this stays fast."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = PCRLv2UNet(base_channels=2, depth=3)
    task = PCRLv2Task(model, PCRLv2Objective(restore_views=restore_views))
    if channels_last:
        task.to(memory_format=torch.channels_last_3d)
    compile_model(task.model, backend="eager")
    opt = torch.optim.SGD(task.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    g = torch.Generator().manual_seed(1)
    scales = set()
    for step in range(12):
        global_views = torch.randn((2, 2, 1, 8, 8, 4), generator=g)
        targets = torch.rand((2, 2, 1, 8, 8, 4), generator=g)
        local_views = torch.randn((2, 3, 1, 4, 4, 4), generator=g)
        out = task(global_views, targets, local_views, beta=1.0 - step / 12, generator=generator)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        scales.add(int(out["scale"]))
        assert compiled_graphs() == graphs, f"step {step}: {compiled_graphs()} graphs"
    assert scales == {0, 1}, "the draws did not vary; the test proves nothing"


@pytest.mark.parametrize(
    ("cuda", "cpu_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_resolve_auto_picks_the_fast_precision_and_logs_it(
    cuda: bool,
    cpu_bf16: bool,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``engine.precision=auto`` becomes bf16 on a GPU or a CPU with bf16 instructions and fp32 elsewhere
    (where bf16 3D convolutions run on a slow fallback kernel), says so in the log, and leaves an explicit
    precision alone. Pins an auto that reaches DeepSpeed unresolved or picks bf16 on a CPU that lacks it."""
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: cpu_bf16)
    with caplog.at_level("INFO", logger="pcrl.engine"):
        cfg = resolve_auto(load_config(TINY, ["engine.precision=auto"]), cuda=cuda)
    assert cfg.engine.precision == expected
    assert f"engine.precision=auto: {expected} on " in caplog.text
    explicit = load_config(TINY, ["engine.precision=fp32"])
    assert resolve_auto(explicit, cuda=cuda) is explicit


READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__bool__,
}
"""Tensor methods that copy a value to the host, so wait for the device."""

HOT_PATH = ("pcrl/engine.py", "pcrl/metrics.py", "pcrl/objective.py", "pcrl/model.py")
"""The training loop's modules; a read is counted against the innermost of their functions on the stack
(a read inside ``pcrl.distributed`` or DeepSpeed counts against the loop function that called it)."""


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
                    hot = [f for f in stack if f.filename.endswith(HOT_PATH)]
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
    # The stop-signal vote rides on the non-finite check's all-reduce: no second collective per step.
    votes: list[bool] = []
    monkeypatch.setattr(distributed, "any_rank", lambda flag: votes.append(flag) or bool(flag))
    reads = HostReads()
    with reads:
        metrics = train(cfg)
    assert metrics["loss/total"] == metrics["loss/total"]  # logged and finite
    assert dict(reads.sites) == {"engine.py:check": 6, "metrics.py:loss_means": 2, "metrics.py:state_dict": 1}
    assert votes == []


def test_finite_guard_carries_the_stop_vote() -> None:
    """The guard reads this rank's stop flag at each check and reports it for that step; a step without a
    check (its last micro-batch skipped) falls back to a vote of its own."""
    asked = [False]
    guard = engine.FiniteGuard(torch.device("cpu"), lambda: asked[0])
    guard.add(torch.tensor(1.5))
    guard.check(0)
    assert guard.stop_at(0) is False
    asked[0] = True
    guard.check(1)
    assert guard.stop_at(1) is True and guard.stop_at(2) is True  # step 2: no check, asked directly
    guard.add(torch.tensor(float("nan")))
    with pytest.raises(engine.NonFiniteLossError, match="step 4"):
        guard.check(3)
