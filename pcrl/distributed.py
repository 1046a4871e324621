"""Process-group helpers that degrade to one process, and the DeepSpeed config derived from ours.

Every helper works without ``torch.distributed`` being initialised (rank 0 of 1), so each component runs
in plain ``pytest``. Nothing else in pcrl reads ``RANK``/``WORLD_SIZE`` from the environment.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pcrl.config import ConfigError, PretrainConfig

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_object",
    "deepspeed_config",
    "free_port",
    "init_distributed",
    "is_main",
    "local_rank",
    "local_world_size",
    "lost_ranks",
    "peer_failure",
    "rank",
    "reduce_to_host",
    "release_shm_workspace",
    "shm_workspace",
    "shm_workspaces",
    "world_size",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def local_rank() -> int:
    """Rank within this node, from the launcher's ``LOCAL_RANK`` (0 when launched by hand)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE`` from torchrun/deepspeed, else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def is_main() -> bool:
    """True on global rank 0: the one process that logs, tracks and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if _initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (the scalar itself in one process)."""
    if not _initialized():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1)
    # gloo and nccl both reduce float64 on CPU/GPU respectively; keep it on the backend's device.
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def reduce_to_host(values: torch.Tensor, mean: bool = False) -> list[float]:
    """The sum (or mean) over ranks of a 1-D tensor, read to the host in one transfer (the values themselves
    in one process). Reduced in float64; the read waits for the device: call it where a sync is due."""
    t = values.detach().to(torch.float64)
    if _initialized():
        # Each backend reduces on its own device: nccl on the GPU, gloo on the CPU.
        t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
        dist.all_reduce(t)
        if mean:
            t = t / dist.get_world_size()
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (the flag itself in one process)."""
    if not _initialized():
        return bool(flag)
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process). Pickles: for small states only."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_failure(error: BaseException) -> bool:
    """True when ``error`` is a collective that failed because another rank died or stopped answering:
    torch's DistError family (nccl, the store) or gloo's RuntimeError ("Connection closed by peer",
    "Timed out waiting ... for recv"), which names its source file under gloo/."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and "gloo/" in str(error) and _initialized()


SHM_DIR = Path("/dev/shm")
"""Where POSIX shared memory objects live on Linux."""


def _shm_prefix() -> str:
    return f"deepspeed_allreduce_buffer_{os.getuid()}_"


def shm_workspace(rank: int, addr: str, port: str | int) -> Path:
    """The shared-memory all-reduce workspace DeepSpeed's CPU backend creates for ``rank`` of the process
    group at ``addr:port`` (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: 67 MB, named by uid, address, port
    and rank)."""
    return SHM_DIR / f"{_shm_prefix()}{addr}_{port}_{rank}"


def shm_workspaces() -> set[Path]:
    """Every DeepSpeed CPU all-reduce workspace of this user in ``/dev/shm`` (live runs' included)."""
    return set(SHM_DIR.glob(f"{_shm_prefix()}*"))


def release_shm_workspace() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce workspace from ``/dev/shm``.

    DeepSpeed never unlinks it, so every CPU run left 67 MB per rank of shared memory (RAM) behind until
    the machine rebooted. The other ranks mapped it when the process group started, so removing the name
    frees nothing they still use: the memory goes once the last of them exits. No-op without one."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        shm_workspace(rank(), addr, port).unlink(missing_ok=True)


def lost_ranks(wait_s: float = 10.0) -> list[int]:
    """After a failed collective: the ranks that do not answer a roll call within ``wait_s``.

    Each surviving rank writes its name into the rendezvous store (MASTER_ADDR:MASTER_PORT, a TCP store
    that rank 0's process hosts under the deepspeed launcher and Slurm), then waits for the others. The
    process group cannot be used for this: its collectives are what failed. When the store itself is gone,
    rank 0 is the one lost (a survivor cannot tell more). Rank 0 stays until ``wait_s`` has passed, so
    the store outlives every survivor's roll call. Returns ``[]`` in one process.
    """
    if not _initialized():
        return []
    me, world = rank(), world_size()
    deadline = time.monotonic() + wait_s
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(1.0, wait_s / 2)),
            wait_for_workers=False,
        )
        store.set(f"pcrl/alive/{me}", "1")
        missing = [r for r in range(world) if r != me]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"pcrl/alive/{r}"])]
            time.sleep(0.2)
        if me == 0:
            time.sleep(max(0.0, deadline - time.monotonic()) + 1.0)
        return missing
    except (RuntimeError, KeyError, ValueError):  # DistError is a RuntimeError
        return [0] if me != 0 else []


def init_distributed(timeout_s: int = 600) -> str:
    """Start the process group through DeepSpeed (nccl on GPUs, gloo on CPU) and return the backend.

    A plain ``python launch/pretrain.py`` sets no RANK/WORLD_SIZE; without them DeepSpeed would try MPI
    discovery, so a one-process environment on a free local port is filled in first.
    """
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not _initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
    return backend


def deepspeed_config(cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config derived from ours, plus an optional expert overlay.

    pcrl's settings (batch sizes, precision, ZeRO stage, clipping) are written once, here. An overlay
    (``engine.deepspeed_overlay``, JSON) may add engine knobs DeepSpeed understands; a key that contradicts
    a pcrl setting is refused with a message naming both.

    Raises:
        ConfigError: the overlay is unreadable or contradicts a derived key.
    """
    precision = cfg.engine.precision
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world,
        "gradient_clipping": cfg.train.grad_clip,
        # bf16 runs as torch autocast over fp32 master weights: BatchNorm keeps fp32 parameters and
        # statistics (a bf16-cast module breaks CPU batch_norm and degrades the running statistics), and
        # convolutions run in bf16 (AMX on CPUs, tensor cores on GPUs).
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        # fp16 is DeepSpeed's classic mode: a half module with dynamic loss scaling; its BatchNorm
        # buffers follow the parameters' dtype, as batch_norm requires.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "data_types": {"buffer_dtype": "fp16"} if precision == "fp16" else {},
        # pcrl passes a torch optimizer; DeepSpeed only needs to be told that ZeRO may wrap it.
        "zero_allow_untested_optimizer": True,
        # pcrl logs itself; keep DeepSpeed's own step printing out of the console.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not cfg.engine.deepspeed_overlay:
        return derived
    path = Path(cfg.engine.deepspeed_overlay)
    try:
        overlay = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"engine.deepspeed_overlay: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.deepspeed_overlay: {path} is not valid JSON: {e}") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"engine.deepspeed_overlay: {path} must hold a JSON object")
    _merge_overlay(derived, overlay, str(path), "")
    return derived


def _merge_overlay(base: dict[str, Any], overlay: dict[str, Any], source: str, prefix: str) -> None:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key in ("optimizer", "scheduler") and not prefix:
            raise ConfigError(
                f"engine.deepspeed_overlay: {source} sets '{key}', but pcrl builds the optimizer and LR "
                "schedule from optim.*; remove it and set optim.* instead"
            )
        if key not in base:
            base[key] = value
        elif isinstance(base[key], dict) and isinstance(value, dict):
            _merge_overlay(base[key], value, source, f"{dotted}.")
        elif base[key] != value:
            raise ConfigError(
                f"engine.deepspeed_overlay: {source} sets {dotted}={value!r} but pcrl's config gives "
                f"{base[key]!r}; change the pcrl key (train.*, engine.*) instead of the overlay"
            )
