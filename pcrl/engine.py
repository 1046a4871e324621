"""The training loop: DeepSpeed owns backward, step, accumulation, clipping and loss scaling.

``train(cfg)`` builds everything in a fixed order (distributed → data → model + objective → DeepSpeed →
resume → tracking) and then runs ``train_step`` until ``train.max_steps``. Before training, rank 0 writes
``config.yaml`` and ``data_provenance.json`` (:mod:`pcrl.provenance`: the sources, licences and counts of the
volumes it trains on) into the run folder. A reader can follow it from
the first line to ``engine.step()`` in this file.

Between log steps the loop never waits for the device: the loss terms are summed on the device and read
at log steps, and the one host read of a step is the non-finite check of its loss, just before the update
(after backward is queued).

Resuming is exact: a checkpoint holds, besides DeepSpeed's model and optimizer state, every rank's RNGs,
its objective generator, its loader position and its partial log window, so a run killed at any step and
launched again ends bitwise identical to an uninterrupted one (fp32 on CPU). SIGTERM and SIGUSR1 (what
Slurm sends before a time limit or a preemption) make every rank save at the next step boundary and stop
with :class:`Preempted`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcrl import distributed
from pcrl.checkpoint import (
    ResumeState,
    checkpoint_dir,
    checkpoint_step,
    find_resume_tag,
    resume_training,
    save_training_state,
)
from pcrl.config import ConfigError, PretrainConfig, flatten_config, save_config
from pcrl.io import read_jsonl
from pcrl.metrics import MetricWindow, SampleKeyLog, flops_per_sample, loss_scale_metrics
from pcrl.objective import LOSS_TERMS, beta_schedule, build_task
from pcrl.optim import build_optimizer, lr_schedule
from pcrl.progress import ConsoleProgress
from pcrl.provenance import DATA_PROVENANCE, write_data_provenance
from pcrl.tracking import Tracker

__all__ = [
    "FiniteGuard",
    "NonFiniteLossError",
    "Preempted",
    "RankLost",
    "StopSignals",
    "compile_model",
    "compiled_graphs",
    "configure_logging",
    "cpu_has_bf16",
    "resolve_auto",
    "train",
    "train_step",
]

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, float], int], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer update of that step."""


class Preempted(RuntimeError):
    """A preemption signal reached some rank; every rank saved a checkpoint at ``step`` and stopped."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name} received; saved a checkpoint at step {step} and stopped")
        self.step = step
        self.signal_name = signal_name


class RankLost(RuntimeError):
    """Another rank died or stopped answering, so a collective failed; this rank stops too.

    Attributes:
        ranks: the ranks that did not answer the roll call (empty when it could not tell).
    """

    def __init__(self, ranks: list[int], cause: BaseException, run_dir: Path) -> None:
        who = f"rank {', '.join(map(str, ranks))}" if ranks else "another rank"
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        # gloo wraps the useful part in its source location and advice ("... GLHF!").
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail).split(". This is typically")[0]
        pointer = checkpoint_dir(run_dir) / "latest"
        try:
            resume = f"resumes from checkpoint {pointer.read_text().strip()}"
        except OSError:
            resume = "starts over (no checkpoint was saved yet)"
        super().__init__(
            f"{who} was lost (its process ended or stopped answering: {detail[:300]}); this rank stops too. "
            f"Launching the same command again {resume}; the lost rank's own output says why it ended"
        )
        self.ranks = ranks


class StopSignals:
    """SIGTERM and SIGUSR1 only set a flag; the loop acts on it at the next step boundary, where every rank
    can agree and save (a rank that stopped alone would leave the others hanging in a collective)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Signal handlers belong to the main thread; a run driven from another thread (a Ray Tune trial)
        # leaves preemption to its driver.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class FiniteGuard:
    """Whether the losses of the current optimizer step are finite on every rank, and whether a stop signal
    reached any rank, decided together once per step, just before the update.

    ``add`` sums a micro-batch's loss on the device (no host sync); the sum is non-finite as soon as one loss
    is. ``check`` reduces it over ranks, with each rank's stop flag beside it, and reads both: the one host
    sync and the one collective of a training step. It comes after backward has been queued, so a GPU keeps
    working while the host waits, and before ``engine.step()`` applies the update.

    Args:
        device: where the losses are.
        stop_requested: whether this rank has received a stop signal (read at each ``check``).
    """

    def __init__(self, device: torch.device, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self._total = torch.zeros(1, device=device)
        self._stop_requested = stop_requested
        self.checked_step = -1
        """The last step ``check`` decided (-1: none yet)."""
        self.stop = False
        """Whether a stop signal had reached any rank at that step's check."""

    def add(self, loss: torch.Tensor) -> None:
        """Add a micro-batch's loss (0-dim)."""
        self._total += loss.detach().float()

    def check(self, step: int) -> None:
        """Raise if any micro-batch of this step, on any rank, had a non-finite loss; record whether any rank
        was asked to stop (:attr:`stop`); then start a new step.

        Raises:
            NonFiniteLossError: naming ``step + 1``, before the optimizer update.
        """
        flag = torch.tensor([1.0 if self._stop_requested() else 0.0]).to(
            self._total.device, non_blocking=True
        )
        total, stops = distributed.reduce_to_host(torch.cat([self._total, flag]))
        self._total.zero_()
        self.checked_step, self.stop = step, stops > 0
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"the loss became non-finite ({total}) at step {step + 1}; stopping before the optimizer "
                "update. Lower optim.lr, use engine.precision=fp32, check the input volumes, or allow a few "
                "skipped steps with train.max_nonfinite_skips"
            )

    def stop_at(self, step: int) -> bool:
        """Whether any rank was asked to stop by ``step``'s check; a collective of its own where that step had
        no check (its last micro-batch was skipped as non-finite)."""
        if self.checked_step == step:
            return self.stop
        return distributed.any_rank(self._stop_requested())


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile ``model``'s forward in place with ``torch.compile`` (static shapes; ``backend`` inductor, or
    ``eager`` to check the graphs without generating code).

    In place (``nn.Module.compile``), so the state-dict keys, the checkpoints and the exported encoder do not
    change. Only the U-Net: the objective, with its random scale draws, stays eager. The model's forward
    depends on the input shape and its ``local`` flag alone, so a run compiles one graph per kind of forward
    (view 1, view 2 and the local views: three with ``objective.restore_views=[1]``, two when both global
    views are restored), at the first step, whatever scales the objective draws.
    """
    model.compile(backend=backend, dynamic=False)


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far (dynamo's ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_runtime(cfg: PretrainConfig, world: int) -> None:
    """Refuse settings that cannot work on this machine before any work starts."""
    if cfg.model.norm == "sync_batch" and world > 1 and not torch.cuda.is_available():
        raise ConfigError(
            "model.norm: sync_batch needs GPUs (torch's SyncBatchNorm does not run on CPU); "
            "use model.norm=batch for CPU runs"
        )
    if cfg.engine.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("engine.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    if cfg.engine.precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        # Without AVX512-BF16/AMX, torch runs bf16 3D convolutions on a reference kernel, tens of times
        # slower than fp32 (docs/benchmarks.md): legal, but almost never what the user wants.
        logger.warning(
            "engine.precision=bf16 on a CPU without bf16 instructions (avx512_bf16/amx_bf16): convolutions "
            "fall back to a slow kernel; engine.precision=fp32 is much faster here"
        )
    if cfg.views.backend == "dali":
        from pcrl.views.dali import require_dali

        require_dali()


def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (Linux /proc/cpuinfo; assumed elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_auto(cfg: PretrainConfig, cuda: bool | None = None) -> PretrainConfig:
    """``cfg`` with ``engine.precision=auto`` replaced by the precision that runs fastest here (logged).

    bf16 on a GPU, and on a CPU with bf16 instructions, where oneDNN's bf16 convolutions beat fp32
    (docs/benchmarks.md); fp32 on other CPUs, where bf16 3D convolutions fall back to a slow kernel.

    Args:
        cfg: the configuration; returned as it is when its precision is not ``auto``.
        cuda: plan for a GPU (True) or a CPU (False); default: this machine.
    """
    if cfg.engine.precision != "auto":
        return cfg
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        precision, why = "bf16", "a GPU"
    elif cpu_has_bf16():
        precision, why = "bf16", "a CPU with bf16 instructions"
    else:
        precision, why = "fp32", "a CPU without bf16 instructions"
    if distributed.is_main():
        logger.info("engine.precision=auto: %s on %s", precision, why)
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision=precision))


def _last_record(path: Path) -> dict[str, float]:
    """The metrics of the last line of ``metrics.jsonl`` (for a relaunch that had nothing left to do)."""
    records, _ = read_jsonl(path)
    record = records[-1] if records else {}
    return {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, int | float)}


def _infinite(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def train(cfg: PretrainConfig, reporter: Reporter | None = None) -> dict[str, float]:
    """Pretrain with PCRLv2 under DeepSpeed until ``cfg.train.max_steps``; returns the last logged metrics.

    Launching again on the same run folder continues from its latest checkpoint. While it runs, SIGTERM
    and SIGUSR1 (in the main thread) request a checkpoint and a stop at the next step boundary.

    Args:
        cfg: the resolved configuration.
        reporter: optional ``reporter(metrics, step)`` called at every log step (Ray Tune uses it).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (names the step).
        ConfigError: a setting cannot work here (checked before any work starts).
        Preempted: a preemption signal arrived; the checkpoint of the step it names is saved.
        RankLost: another rank died or stopped answering (within ``engine.dist_timeout_s``).
    """
    cfg = resolve_auto(cfg)
    stop = StopSignals()
    stop.install()
    try:
        return _train(cfg, reporter, stop)
    except RuntimeError as e:
        # A collective that failed because a peer died: say which rank, instead of gloo's socket error.
        if not distributed.peer_failure(e):
            raise
        raise RankLost(distributed.lost_ranks(), e, cfg.run_dir) from e
    finally:
        stop.restore()
        distributed.release_shm_workspace()


def _train(cfg: PretrainConfig, reporter: Reporter | None, stop: StopSignals) -> dict[str, float]:
    import deepspeed

    from pcrl.evaluate import Evaluation

    # -- distributed, and the checkpoint to resume from (verified by rank 0, the same tag on every rank) --
    distributed.init_distributed(cfg.engine.dist_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    _check_runtime(cfg, world)
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed.local_rank())
    _seed_everything(cfg.run.seed + rank)
    run_dir, max_steps, accum = cfg.run_dir, cfg.train.max_steps, cfg.train.grad_accum_steps
    resume_tag = find_resume_tag(run_dir)
    start_step = 0 if resume_tag is None else checkpoint_step(resume_tag)

    # -- data: checked before the run folder exists, so a wrong path leaves nothing behind ---------------
    loader = _build_loader(cfg, rank, world, start_step * accum)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # Sources, licences and counts of what this run trains on, for the export's encoder.json and card.
        write_data_provenance(run_dir, loader.dataset.records, cfg)
    distributed.barrier()

    # -- model + objective + optimizer under DeepSpeed -----------------------------------------------------
    task = build_task(cfg, world)
    ds_config = distributed.deepspeed_config(cfg, world)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=task, optimizer=build_optimizer(task.parameters(), cfg.optim), config=ds_config
    )
    if cfg.engine.channels_last:
        # After initialize: DeepSpeed's parameter broadcast views weights as bytes and needs them dense.
        # .to() swaps each parameter's data in place, so the optimizer keeps the same parameters.
        engine.module.to(memory_format=torch.channels_last_3d)
    if cfg.engine.compile:
        # After the layout change: the compiled graphs are specialised to the parameters' strides.
        compile_model(engine.module.model)

    # -- resume: RNGs, the objective's scale draws, loader position, counters, log window ------------------
    # The scale draws of the objective follow their own seeded stream, identical on every launch.
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + rank)
    state = ResumeState()
    if resume_tag is not None:
        state = resume_training(engine, run_dir, resume_tag, generator)
        _check_resume(cfg, loader, state, resume_tag)
    window = MetricWindow(LOSS_TERMS, accum, state.window, device=engine.device)
    guard = FiniteGuard(engine.device, lambda: stop.received is not None)
    keys = (
        SampleKeyLog(run_dir, rank, state.step if resume_tag else None) if cfg.tracking.sample_keys else None
    )

    # -- tracking and evaluation ---------------------------------------------------------------------------
    # Rank 0 reads and renders the panel's and the evaluators' fixed views now, before an MLflow run exists
    # to be left open; every rank builds the evaluation, as every rank calls it at an evaluation step.
    work_left = start_step < max_steps
    panel = evaluation = None
    if work_left and distributed.is_main() and cfg.tracking.image_every:
        from pcrl.figures import ReconstructionPanel

        panel = ReconstructionPanel.from_config(cfg, engine.device)
    if work_left:
        evaluation = Evaluation.from_config(cfg, engine.device)
    tracker = Tracker(
        run_dir,
        cfg.tracking.uri,
        cfg.tracking.experiment,
        enabled=cfg.tracking.enabled,
        main=distributed.is_main(),
        retry_s=cfg.tracking.retry_s,
    )
    tracker.start(cfg.run.name, flatten_config(cfg), run_id=state.run_id)
    if distributed.is_main():
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / DATA_PROVENANCE)
    console = ConsoleProgress(max_steps, start_step, enabled=distributed.is_main())
    flops = flops_per_sample(cfg)
    _log_start(cfg, task, world, ds_config["train_batch_size"], flops)

    # -- train ---------------------------------------------------------------------------------------------
    batches = _infinite(loader)
    last_metrics: dict[str, float] = {}
    status = "FAILED"
    try:
        while state.step < max_steps:
            step = state.step
            lr = lr_schedule(step, max_steps, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            beta = beta_schedule(step, max_steps, cfg.objective.beta_schedule)
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                window.wait_s += time.perf_counter() - t0
                if keys is not None:
                    keys.write(step + 1, batch["keys"])
                terms = _guarded_step(
                    engine, batch, beta, generator, step, state, cfg.train.max_nonfinite_skips, guard
                )
                if terms is not None:
                    window.add(terms)
            state.step = step = step + 1
            window.steps += 1
            console.update(step)

            evaluate = evaluation is not None and evaluation.due(step)
            # An evaluation step is also a log step: the tracker records each step once, in one record.
            if step % cfg.train.log_every == 0 or step == max_steps or evaluate:
                # The means first: reading them waits for the device, so the window's time is all done work.
                losses = window.loss_means()
                perf = window.throughput(ds_config["train_batch_size"], flops, world)
                metrics = {**losses, "optim/lr": lr, "schedule/beta": beta, **perf}
                if cfg.engine.compile:
                    metrics["compile/graphs"] = float(compiled_graphs())
                if cfg.train.max_nonfinite_skips:
                    metrics["train/nonfinite_skips"] = float(state.nonfinite_skips)
                if cfg.engine.precision == "fp16":
                    metrics.update(loss_scale_metrics(engine))
                if evaluate:
                    # After the window's timing, so evaluation does not count against throughput.
                    metrics.update(evaluation.run(engine.module.model))
                if distributed.is_main():
                    tracker.log_metrics(metrics, step)
                    console.log(step, metrics)
                if reporter is not None:
                    reporter(metrics, step)
                last_metrics = metrics
                window.reset()

            if panel is not None and (step % cfg.tracking.image_every == 0 or step == max_steps):
                # Rank 0 alone, no collective inside: the other ranks go on and wait at the next step.
                image = panel.save(engine.module.model, step, run_dir / "images")
                if image is not None:
                    tracker.log_artifact(image, "images")

            # Decided with the step's non-finite check (one collective per step), so a signal that reached one
            # rank stops them all together, at the same step.
            preempted = step < max_steps and guard.stop_at(step - 1)
            every = cfg.train.checkpoint_every
            if preempted or step == max_steps or (every and step % every == 0):
                state.run_id = tracker.run_id
                state.window = window.state_dict()
                state.data = loader.dataset.loader_state(step * accum, cfg.data.num_workers)
                save_training_state(engine, cfg, state, generator)
            if preempted:
                raise Preempted(step, stop.received or "a signal on another rank")
        status = "FINISHED"
        if not last_metrics:
            last_metrics = _last_record(run_dir / "metrics.jsonl")
    except (KeyboardInterrupt, Preempted):
        status = "KILLED"
        raise
    finally:
        if keys is not None:
            keys.close()
        console.close()
        tracker.finish(status)
    return last_metrics


def _build_loader(cfg: PretrainConfig, rank: int, world: int, start_batches: int) -> Any:
    """The view renderer and this rank's loader. Views render where the model computes: on the GPU (torch or
    DALI) or, without one, in the CPU loader workers."""
    from pcrl.data import build_loader
    from pcrl.views import build_renderer

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    views = build_renderer(cfg.views, device or "cpu", cfg.train.micro_batch_size)
    try:
        return build_loader(
            cfg, views, rank=rank, world_size=world, start_batches=start_batches, device=device
        )
    except (FileNotFoundError, ValueError) as e:
        # A wrong path or too few volumes is a user mistake, reported before the run folder exists.
        raise ConfigError(f"data.shards={cfg.data.shards}: {e}") from None


def _check_resume(cfg: PretrainConfig, loader: Any, state: ResumeState, tag: str) -> None:
    """Refuse a resume whose loader position this launch cannot continue (another worker count), and say
    where the run stands."""
    try:
        loader.dataset.check_loader_state(state.data, cfg.data.num_workers)
    except ValueError as e:
        raise ConfigError(f"cannot resume {cfg.run_dir} from {tag}: {e}") from None
    if distributed.is_main():
        logger.info("resuming %s from step %d", cfg.run_dir, state.step)
        if state.step >= cfg.train.max_steps:
            logger.info(
                "the run is already at train.max_steps=%d; raise it to train further", cfg.train.max_steps
            )


def _log_start(cfg: PretrainConfig, task: torch.nn.Module, world: int, batch: int, flops: float) -> None:
    if distributed.is_main():
        n_params = sum(p.numel() for p in task.model.parameters())
        logger.info(
            "run %s: %d process(es), %s, channels-last %s, compile %s, %.2f M parameters, "
            "micro-batch %d × accum %d × %d ranks = %d samples/step, %.3g GFLOP per sample (forward + backward)",
            cfg.run_dir,
            world,
            cfg.engine.precision,
            "on" if cfg.engine.channels_last else "off",
            "on" if cfg.engine.compile else "off",
            n_params / 1e6,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            world,
            batch,
            flops / 1e9,
        )


def _guarded_step(
    engine: Any,
    batch: dict[str, Any],
    beta: float,
    generator: torch.Generator,
    step: int,
    state: ResumeState,
    max_skips: int,
    guard: FiniteGuard,
) -> torch.Tensor | None:
    """:func:`train_step` under the ``train.max_nonfinite_skips`` policy: a non-finite loss skips its
    micro-batch (None) while skips remain, and stops the run naming the count once they are spent."""
    try:
        terms = train_step(
            engine, batch, beta, generator, step, guard, skip_nonfinite=state.nonfinite_skips < max_skips
        )
    except NonFiniteLossError as e:
        if not max_skips:
            raise
        raise NonFiniteLossError(
            f"{e} (after {state.nonfinite_skips} skipped, train.max_nonfinite_skips={max_skips})"
        ) from None
    if terms is None:
        state.nonfinite_skips += 1
        logger.warning(
            "the loss is non-finite at step %d; skipped that micro-batch (no gradient from it) "
            "(%d of train.max_nonfinite_skips=%d)",
            step + 1,
            state.nonfinite_skips,
            max_skips,
        )
    return terms


def train_step(
    engine: Any,
    batch: dict[str, Any],
    beta: float,
    generator: torch.Generator,
    step: int,
    guard: FiniteGuard,
    skip_nonfinite: bool = False,
) -> torch.Tensor | None:
    """One micro-batch: forward, backward, step (DeepSpeed applies the update at the accumulation boundary).

    Returns the loss terms, in :data:`pcrl.objective.LOSS_TERMS` order, as one float32 tensor on the engine's
    device, without waiting for it. The non-finite check is ``guard``'s, once per optimizer step at the
    boundary, before the update.

    With ``skip_nonfinite``, each micro-batch is checked on its own (one host sync per micro-batch) and a
    non-finite one returns None instead: it adds no gradient and the buffers its forward changed (BatchNorm
    statistics) are put back.

    Raises:
        NonFiniteLossError: a loss of this optimizer step was NaN/inf on some rank (and ``skip_nonfinite``
            is false), before the optimizer update.
    """
    device = engine.device
    # A copy of the buffers (a few numbers per BatchNorm channel), only while skips are allowed.
    saved = [b.detach().clone() for b in engine.module.buffers()] if skip_nonfinite else []
    out = engine(
        batch["global_views"].to(device, non_blocking=True),
        batch["global_targets"].to(device, non_blocking=True),
        batch["local_views"].to(device, non_blocking=True),
        beta=beta,
        generator=generator,
    )
    loss = out["loss"]
    terms = torch.stack([out[k].detach().float() for k in LOSS_TERMS])
    if skip_nonfinite:
        # Every rank must agree before backward, or a rank that skips alone leaves the others hanging in the
        # gradient all-reduce: reduce the loss now (a host sync per micro-batch, the price of skipping).
        total = distributed.all_reduce_mean(loss.detach().float())
        if not math.isfinite(total):
            with torch.no_grad():
                for buffer, before in zip(engine.module.buffers(), saved, strict=True):
                    buffer.copy_(before)
            if engine.gradient_accumulation_steps() > 1:
                # Keep DeepSpeed's accumulation boundary in line with ours, through its own backward (which
                # all-reduces the gradients at the boundary): a loss of zero that touches every parameter
                # adds a zero gradient (0 · p has gradient 0 even where p is not finite).
                zero = (
                    torch.stack([p.sum() for p in engine.module.parameters() if p.requires_grad]).sum() * 0.0
                )
                engine.backward(zero)
                engine.step()
            return None
    else:
        guard.add(loss)
    engine.backward(loss)
    if engine.is_gradient_accumulation_boundary():
        # Every rank agrees before the update (a rank that stopped alone would leave the others hanging).
        guard.check(step)
    engine.step()
    return terms


def configure_logging() -> None:
    """One log format for entry points: rank 0 at INFO, other ranks at WARNING (read from the launcher's
    ``RANK`` since the process group does not exist yet)."""
    import os

    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # DeepSpeed's own INFO chatter (config dumps, op builds) drowns the run's lines.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
