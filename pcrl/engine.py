"""The training loop: DeepSpeed owns backward, step, accumulation, clipping and loss scaling.

``train(cfg)`` builds everything in a fixed order (distributed → data → model + objective → DeepSpeed →
resume → tracking) and then runs ``train_step`` until ``train.max_steps``. A reader can follow it from
the first line to ``engine.step()`` in this file.

Resuming is exact: a checkpoint holds, besides DeepSpeed's model and optimizer state, every rank's RNGs,
its objective generator, its loader position and its partial log window, so a run killed at any step and
launched again ends bitwise identical to an uninterrupted one (fp32 on CPU). SIGTERM and SIGUSR1 (what
Slurm sends before a time limit or a preemption) make every rank save at the next step boundary and stop
with :class:`Preempted`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import resource
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
    checkpoint_dir,
    checkpoint_step,
    find_resume_tag,
    load_checkpoint,
    save_checkpoint,
)
from pcrl.config import (
    ConfigError,
    OptimConfig,
    PretrainConfig,
    config_hash,
    config_to_dict,
    flatten_config,
    save_config,
)
from pcrl.io import read_jsonl
from pcrl.progress import ConsoleProgress
from pcrl.tracking import Tracker

__all__ = [
    "NonFiniteLossError",
    "Preempted",
    "RankLost",
    "build_optimizer",
    "configure_logging",
    "cpu_has_bf16",
    "flops_per_sample",
    "lr_schedule",
    "train",
    "train_step",
]

logger = logging.getLogger(__name__)

# The loss terms the objective returns, logged as loss/<name>.
LOSS_TERMS = ("loss", "restore", "multiscale", "global", "local")

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


class _StopSignals:
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


def lr_schedule(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine to
    ``lr·min_lr_ratio`` at ``total_steps``. A pure function of the step, so resuming needs only the step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW, as a torch optimizer handed to DeepSpeed (a DeepSpeed-config
    optimizer would JIT-compile fused CPU kernels for minutes)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


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
        # Without AVX512-BF16/AMX, torch runs bf16 3D convolutions on a reference kernel (measured ~40x
        # slower than fp32 on an AVX2-only EPYC): legal, but almost never what the user wants.
        logger.warning(
            "engine.precision=bf16 on a CPU without bf16 instructions (avx512_bf16/amx_bf16): convolutions "
            "fall back to a slow kernel; engine.precision=fp32 is much faster here"
        )
    if cfg.views.backend == "dali":
        from pcrl.dali import dali_available

        if not dali_available():
            raise ConfigError(
                "views.backend: dali needs NVIDIA DALI: pip install 'pcrl[dali]', or use views.backend=torch"
            )


def cpu_has_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (Linux /proc/cpuinfo; assumed elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _rng_state() -> dict[str, Any]:
    """The global RNGs as plain data (loads with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records after ``last_step`` (written after the checkpoint a run resumes from)."""
    records, dropped = read_jsonl(path)  # a line cut short by a kill ends the valid part
    kept = [r for r in records if r.get("step", math.inf) <= last_step]
    if dropped or len(kept) < len(records):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def flops_per_sample(cfg: PretrainConfig) -> float:
    """FLOPs of one sample's forward and backward through the full objective, counted by torch's
    FlopCounterMode on meta tensors (no memory, no arithmetic). Model FLOPs in the MFU sense: activation
    checkpointing's recomputation is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from pcrl.model import PCRLv2UNet
    from pcrl.objective import PCRLv2Objective, PCRLv2Task

    b = cfg.train.micro_batch_size
    with torch.device("meta"):
        model = PCRLv2UNet(
            in_channels=1, base_channels=cfg.model.base_channels, depth=cfg.model.depth, norm=cfg.model.norm
        )
        task = PCRLv2Task(model, PCRLv2Objective.from_config(cfg.objective), cfg.model.bn_stats)
        global_views = torch.empty(b, 2, 1, *cfg.views.global_size)
        local_views = torch.empty(b, cfg.views.num_locals, 1, *cfg.views.local_size)
    with FlopCounterMode(display=False) as counter:
        out = task(
            global_views, global_views, local_views, beta=1.0, generator=torch.Generator().manual_seed(0)
        )
        out["loss"].backward()
    return counter.get_total_flops() / b


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _last_record(path: Path) -> dict[str, float]:
    """The metrics of the last line of ``metrics.jsonl`` (for a relaunch that had nothing left to do)."""
    records, _ = read_jsonl(path)
    record = records[-1] if records else {}
    return {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, int | float)}


def _loss_scale_metrics(engine: Any) -> dict[str, float]:
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
    stop = _StopSignals()
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


def _train(cfg: PretrainConfig, reporter: Reporter | None, stop: _StopSignals) -> dict[str, float]:
    import deepspeed

    from pcrl.data import build_loader
    from pcrl.evaluate import Evaluation
    from pcrl.model import PCRLv2UNet
    from pcrl.objective import PCRLv2Objective, PCRLv2Task, beta_schedule
    from pcrl.views import build_renderer

    # -- init distributed ------------------------------------------------------------------------
    distributed.init_distributed(cfg.engine.dist_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    _check_runtime(cfg, world)
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed.local_rank())
    _seed_everything(cfg.run.seed + rank)

    # -- find the checkpoint to resume from (verified by rank 0, the same tag on every rank) ----------
    run_dir = cfg.run_dir
    resume_tag = find_resume_tag(run_dir)
    start_step = 0 if resume_tag is None else checkpoint_step(resume_tag)

    # -- build data ------------------------------------------------------------------------------
    # Views render where the model computes: on the GPU (torch or DALI) or in the CPU loader workers.
    render_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    views = build_renderer(cfg.views, render_device or "cpu", cfg.train.micro_batch_size)
    try:
        loader = build_loader(
            cfg,
            views,
            rank=rank,
            world_size=world,
            start_batches=start_step * cfg.train.grad_accum_steps,
            device=render_device,
        )
    except (FileNotFoundError, ValueError) as e:
        # A wrong path or too few volumes is a user mistake, reported before the run folder exists.
        raise ConfigError(f"data.shards={cfg.data.shards}: {e}") from None
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier()

    # -- build model + objective -----------------------------------------------------------------
    model = PCRLv2UNet(
        in_channels=1, base_channels=cfg.model.base_channels, depth=cfg.model.depth, norm=cfg.model.norm
    )
    if cfg.model.norm == "sync_batch" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.activation_checkpointing:
        model.enable_activation_checkpointing()
    task = PCRLv2Task(model, PCRLv2Objective.from_config(cfg.objective), cfg.model.bn_stats)
    optimizer = build_optimizer(task.parameters(), cfg.optim)

    # -- deepspeed.initialize --------------------------------------------------------------------
    ds_config = distributed.deepspeed_config(cfg, world)
    engine, optimizer, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    if cfg.engine.channels_last:
        # After initialize: DeepSpeed's parameter broadcast views weights as bytes and needs them dense.
        # .to() swaps each parameter's data in place, so the optimizer keeps the same parameters.
        engine.module.to(memory_format=torch.channels_last_3d)

    # -- resume ----------------------------------------------------------------------------------
    # The scale draws of the objective follow their own seeded stream, identical on every launch.
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + rank)
    run_id = None
    window: dict[str, Any] = {"steps": 0, "sums": dict.fromkeys(LOSS_TERMS, 0.0)}
    nonfinite_skips = 0
    if resume_tag is not None:
        shared, own = load_checkpoint(engine, run_dir, resume_tag)
        assert int(shared["step"]) == start_step, (shared["step"], resume_tag)
        try:
            loader.dataset.check_loader_state(own["data"], cfg.data.num_workers)
        except ValueError as e:
            raise ConfigError(f"cannot resume {run_dir} from {resume_tag}: {e}") from None
        run_id = shared.get("mlflow_run_id")
        nonfinite_skips = int(shared.get("nonfinite_skips", 0))
        generator.set_state(own["generator"])
        _set_rng_state(own["rng"])
        window = own["window"]
        if cfg.tracking.sample_keys:
            _trim_jsonl(run_dir / "sample_keys" / f"rank{rank}.jsonl", start_step)
        if distributed.is_main():
            logger.info("resuming %s from step %d", run_dir, start_step)
            if start_step >= cfg.train.max_steps:
                logger.info(
                    "the run is already at train.max_steps=%d; raise it to train further", cfg.train.max_steps
                )

    # -- tracking --------------------------------------------------------------------------------
    # Rank 0 reads and renders the panel's fixed views now, before an MLflow run exists to be left open.
    panel = None
    if distributed.is_main() and cfg.tracking.image_every and start_step < cfg.train.max_steps:
        from pcrl.figures import ReconstructionPanel

        panel = ReconstructionPanel.from_config(cfg, engine.device)
    # Every rank builds it (rank 0 renders the held-out views); at an evaluation step every rank calls it.
    evaluation = Evaluation([], 0, cfg.train.max_steps)
    if start_step < cfg.train.max_steps:
        evaluation = Evaluation.from_config(cfg, engine.device)
    tracker = Tracker(
        run_dir,
        cfg.tracking.uri,
        cfg.tracking.experiment,
        enabled=cfg.tracking.enabled,
        main=distributed.is_main(),
        retry_s=cfg.tracking.retry_s,
    )
    tracker.start(cfg.run.name, flatten_config(cfg), run_id=run_id)
    if distributed.is_main():
        tracker.log_artifact(run_dir / "config.yaml")
    console = ConsoleProgress(cfg.train.max_steps, start_step, enabled=distributed.is_main())
    flops = flops_per_sample(cfg)
    if distributed.is_main():
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "run %s: %d process(es), %s, %.2f M parameters, micro-batch %d × accum %d × %d ranks = %d samples/step, "
            "%.3g GFLOP per sample (forward + backward)",
            run_dir,
            world,
            cfg.engine.precision,
            n_params / 1e6,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            world,
            ds_config["train_batch_size"],
            flops / 1e9,
        )

    # -- train -----------------------------------------------------------------------------------
    batches = _infinite(loader)
    keys_file = None
    if cfg.tracking.sample_keys:
        (run_dir / "sample_keys").mkdir(exist_ok=True)
        keys_file = (run_dir / "sample_keys" / f"rank{rank}.jsonl").open("a")
    samples_per_step = ds_config["train_batch_size"]
    # A resumed run carries on the log window its checkpoint was taken in, so the logged means are exact.
    sums = dict(window["sums"])
    # Micro-batches whose losses the window's sums hold (skipped non-finite ones are left out of the means).
    accum = cfg.train.grad_accum_steps
    window_micro = int(window.get("micro", window["steps"] * accum))
    window_steps, window_wait, window_t0 = int(window["steps"]), 0.0, time.perf_counter()
    last_metrics: dict[str, float] = {}
    status = "FAILED"
    step = start_step
    try:
        while step < cfg.train.max_steps:
            lr = lr_schedule(step, cfg.train.max_steps, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            beta = beta_schedule(step, cfg.train.max_steps, cfg.objective.beta_schedule)
            for _ in range(cfg.train.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(batches)
                window_wait += time.perf_counter() - t0
                if keys_file is not None:
                    keys_file.write(json.dumps({"step": step + 1, "keys": list(batch["keys"])}) + "\n")
                skip = nonfinite_skips < cfg.train.max_nonfinite_skips
                try:
                    terms = train_step(engine, batch, beta, generator, step, skip_nonfinite=skip)
                except NonFiniteLossError as e:
                    if not cfg.train.max_nonfinite_skips:
                        raise
                    raise NonFiniteLossError(
                        f"{e} (after {nonfinite_skips} skipped, train.max_nonfinite_skips="
                        f"{cfg.train.max_nonfinite_skips})"
                    ) from None
                if terms is None:
                    nonfinite_skips += 1
                    logger.warning(
                        "the loss is non-finite at step %d; skipped that micro-batch (no gradient from it) "
                        "(%d of train.max_nonfinite_skips=%d)",
                        step + 1,
                        nonfinite_skips,
                        cfg.train.max_nonfinite_skips,
                    )
                    continue
                window_micro += 1
                for k in LOSS_TERMS:
                    sums[k] += terms[k] / accum
            step += 1
            window_steps += 1
            console.update(step)

            evaluate = evaluation.due(step)
            # An evaluation step is also a log step: the tracker records each step once, in one record.
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or evaluate:
                elapsed = time.perf_counter() - window_t0
                counted = window_micro / accum
                metrics = {
                    f"loss/{'total' if k == 'loss' else k}": distributed.all_reduce_mean(
                        v / counted if counted else math.nan
                    )
                    for k, v in sums.items()
                }
                samples_per_s = samples_per_step * window_steps / elapsed
                metrics.update(
                    {
                        "optim/lr": lr,
                        "schedule/beta": beta,
                        "perf/samples_per_s": samples_per_s,
                        # Per device, the figure to hold against a device's peak (MFU).
                        "perf/tflops_per_device": flops * samples_per_s / world / 1e12,
                        "perf/data_wait_frac": window_wait / elapsed,
                        "perf/step_time_s": elapsed / window_steps,
                        "memory/peak_gib": _peak_memory_gib(),
                    }
                )
                if cfg.train.max_nonfinite_skips:
                    metrics["train/nonfinite_skips"] = float(nonfinite_skips)
                if cfg.engine.precision == "fp16":
                    metrics.update(_loss_scale_metrics(engine))
                if evaluate:
                    # After the window's timing, so evaluation does not count against throughput.
                    metrics.update(evaluation.run(engine.module.model))
                if distributed.is_main():
                    tracker.log_metrics(metrics, step)
                    console.log(step, metrics)
                if reporter is not None:
                    reporter(metrics, step)
                last_metrics = metrics
                sums = dict.fromkeys(LOSS_TERMS, 0.0)
                window_steps, window_micro, window_wait, window_t0 = 0, 0, 0.0, time.perf_counter()

            if panel is not None and (step % cfg.tracking.image_every == 0 or step == cfg.train.max_steps):
                # Rank 0 alone, no collective inside: the other ranks go on and wait at the next step.
                image = panel.save(engine.module.model, step, run_dir / "images")
                if image is not None:
                    tracker.log_artifact(image, "images")

            # One small all-reduce per step, so a signal that reached one rank stops them all together.
            preempted = step < cfg.train.max_steps and distributed.any_rank(stop.received is not None)
            if (
                preempted
                or step == cfg.train.max_steps
                or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            ):
                shared = {
                    "step": step,
                    # Rank 0's (the state DeepSpeed saves); set late when MLflow was down at the start.
                    "mlflow_run_id": tracker.run_id,
                    "nonfinite_skips": nonfinite_skips,
                    "config_hash": config_hash(cfg),
                    "config": config_to_dict(cfg),
                }
                own = {
                    "rng": _rng_state(),
                    "generator": generator.get_state(),
                    "data": loader.dataset.loader_state(
                        step * cfg.train.grad_accum_steps, cfg.data.num_workers
                    ),
                    "window": {"steps": window_steps, "micro": window_micro, "sums": dict(sums)},
                }
                save_checkpoint(engine, cfg, step, shared, own)
            if preempted:
                raise Preempted(step, stop.received or "a signal on another rank")
        status = "FINISHED"
        if not last_metrics:
            last_metrics = _last_record(run_dir / "metrics.jsonl")
    except (KeyboardInterrupt, Preempted):
        status = "KILLED"
        raise
    finally:
        if keys_file is not None:
            keys_file.close()
        console.close()
        tracker.finish(status)
    return last_metrics


def train_step(
    engine: Any,
    batch: dict[str, Any],
    beta: float,
    generator: torch.Generator,
    step: int,
    skip_nonfinite: bool = False,
) -> dict[str, float] | None:
    """One micro-batch: forward, non-finite check on every rank, backward, step (DeepSpeed applies the
    update at the accumulation boundary). Returns the loss terms as floats.

    With ``skip_nonfinite``, a non-finite loss returns None instead: no backward, so the micro-batch adds no
    gradient, and the buffers its forward changed (BatchNorm running statistics, now NaN) are put back.
    When accumulating, DeepSpeed still gets a backward of zero and its step, so its accumulation boundary
    (and gradient all-reduce) stays in line with ours and the step's other micro-batches update; with one
    micro-batch per step nothing is called, so the step changes nothing in the model.

    Raises:
        NonFiniteLossError: the loss is NaN/inf on any rank (and ``skip_nonfinite`` is false), before the
            optimizer update.
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
    # Every rank must agree before backward, or a rank that stops alone leaves the others hanging in the
    # gradient all-reduce: reduce the loss once (one scalar, a host sync we need anyway for the check).
    total = distributed.all_reduce_mean(loss.detach().float())
    if not math.isfinite(total) and skip_nonfinite:
        with torch.no_grad():
            for buffer, before in zip(engine.module.buffers(), saved, strict=True):
                buffer.copy_(before)
        if engine.gradient_accumulation_steps() > 1:
            # Keep DeepSpeed's accumulation boundary in line with ours, through its own backward (which
            # all-reduces the gradients at the boundary): a loss of zero that touches every parameter adds
            # a zero gradient (0 · p has gradient 0 even where p is not finite).
            zero = torch.stack([p.sum() for p in engine.module.parameters() if p.requires_grad]).sum() * 0.0
            engine.backward(zero)
            engine.step()
        return None
    if not math.isfinite(total):
        raise NonFiniteLossError(
            f"the loss became non-finite ({total}) at step {step + 1}; stopping before the optimizer update. "
            "Lower optim.lr, use engine.precision=fp32, check the input volumes, or allow a few skipped "
            "steps with train.max_nonfinite_skips"
        )
    engine.backward(loss)
    engine.step()
    return {k: float(out[k].detach()) for k in LOSS_TERMS}


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
