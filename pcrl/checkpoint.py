"""Checkpoints in the run folder: ``checkpoints/step_00001000/`` tags written by DeepSpeed on every rank,
the resolved config beside them, and a ``latest`` pointer written last and atomically by rank 0.

The client state holds plain data only (numbers, strings, lists, dicts and tensors), so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pcrl import distributed
from pcrl.config import PretrainConfig, save_config

__all__ = ["checkpoint_dir", "checkpoint_tag", "latest_tag", "load_latest", "save_checkpoint"]

logger = logging.getLogger(__name__)


def checkpoint_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def checkpoint_tag(step: int) -> str:
    """``step_00001000``: zero-padded so tags sort by step."""
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(engine: Any, cfg: PretrainConfig, step: int, client_state: dict[str, Any]) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` on every rank, then move the ``latest`` pointer.

    Must be called by all ranks (each saves its own optimizer/ZeRO partitions).

    Returns:
        The tag folder.
    """
    ckpt_dir = checkpoint_dir(cfg.run_dir)
    tag = checkpoint_tag(step)
    # DeepSpeed's own 'latest' file is written non-atomically and before every rank is done: write ours.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    distributed.barrier()
    if distributed.is_main():
        save_config(cfg, ckpt_dir / tag / "config.yaml")
        _write_atomic(ckpt_dir / "latest", tag)
        logger.info("saved checkpoint %s", ckpt_dir / tag)
    distributed.barrier()
    return ckpt_dir / tag


def latest_tag(run_dir: Path) -> str | None:
    """The tag named by ``checkpoints/latest``, or None for a fresh run folder."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(
            f"{pointer} names checkpoint {tag!r}, but {checkpoint_dir(run_dir) / tag} does not exist; "
            "restore the folder or delete the pointer to start over"
        )
    return tag


def load_latest(engine: Any, run_dir: Path) -> dict[str, Any] | None:
    """Load the latest checkpoint of ``run_dir`` into ``engine``; returns its client state (None if none)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir(run_dir) / tag}")
    return client_state
