"""Checkpoints in the run folder, written so that a kill at any moment leaves a resumable run.

One checkpoint is a tag folder ``checkpoints/step_00001000/``: DeepSpeed's files from every rank (the model
states file carries the client state; ZeRO adds an optimizer shard per rank), the resolved ``config.yaml``
and ``manifest.json`` (size and sha256 of every file, written by rank 0 once all ranks have saved). Then
``checkpoints/latest`` names the tag, written atomically: the commit point. Older tags beyond
``train.keep_checkpoints`` are deleted only after that.

Resuming takes the tag ``latest`` names if its files match the manifest, else the newest older tag that
does, with a warning naming the bad one (a disk that filled up, a copy cut short). Nothing is deleted or
rewritten when that happens.

The client state holds plain data only (numbers, strings, lists, dicts and tensors), so it loads with
``torch.load(weights_only=True)``, and so does everything else: DeepSpeed's own loader unpickles anything
(``weights_only=False``), so pcrl hands it a weights-only one, and a checkpoint file holding a pickled object
(code that would run on load) is refused with its name. Its ``ranks`` entry lists every rank's own state (RNGs, data position),
gathered before the save because DeepSpeed writes the client state of rank 0 alone.

The run folder must be on a filesystem every node sees (resuming reads it from all ranks anyway).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcrl import distributed
from pcrl.config import ConfigError, PretrainConfig, config_hash, config_to_dict, save_config
from pcrl.io import file_sha256, write_atomic

__all__ = [
    "CHECKPOINT_MANIFEST",
    "CheckpointWriteError",
    "ResumeState",
    "checkpoint_dir",
    "checkpoint_step",
    "checkpoint_tag",
    "find_resume_tag",
    "load_checkpoint",
    "prune_checkpoints",
    "resume_training",
    "rng_state",
    "save_checkpoint",
    "save_training_state",
    "set_rng_state",
    "verify_checkpoint",
    "write_manifest",
]

logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = "manifest.json"
_TAG = re.compile(r"step_(\d{8,})")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous one is left intact."""


def checkpoint_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def checkpoint_tag(step: int) -> str:
    """``step_00001000``: zero-padded so tags sort by step."""
    return f"step_{step:08d}"


def checkpoint_step(tag: str) -> int | None:
    """The step of a tag name, or None when ``tag`` is not one."""
    m = _TAG.fullmatch(tag)
    return int(m.group(1)) if m else None


def _step(tag: str) -> int:
    step = checkpoint_step(tag)
    assert step is not None, tag
    return step


def _tags(ckpt_dir: Path) -> list[str]:
    """Tag folders in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (p.name for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None), key=_step
    )


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST)


def write_manifest(tag_dir: Path) -> None:
    """Write the tag's manifest: size and sha256 of every file in it (what :func:`verify_checkpoint` checks)."""
    files = {
        str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p, fsync=True)}
        for p in _files(tag_dir)
    }
    write_atomic(tag_dir / CHECKPOINT_MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_checkpoint(tag_dir: Path) -> str | None:
    """Check a tag folder against its manifest: None when complete and intact, else what is wrong."""
    if not tag_dir.is_dir():
        return "the folder does not exist"
    try:
        files = json.loads((tag_dir / CHECKPOINT_MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {CHECKPOINT_MANIFEST} (its save did not finish)"
    except (ValueError, KeyError, TypeError) as e:
        return f"its {CHECKPOINT_MANIFEST} is unreadable ({e})"
    for name, expected in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes instead of {expected['size']} (truncated or overwritten)"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` tags (none when ``keep`` <= 0)."""
    if keep <= 0:
        return
    for tag in _tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        logger.info("deleted old checkpoint %s (train.keep_checkpoints=%d)", ckpt_dir / tag, keep)


def save_checkpoint(
    engine: Any, cfg: PretrainConfig, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]
) -> Path:
    """Save the checkpoint of ``step``: DeepSpeed's files on every rank, then (rank 0) the config, the
    manifest, the ``latest`` pointer, and the deletion of tags beyond ``train.keep_checkpoints``.

    Must be called by all ranks (each saves its own optimizer/ZeRO partitions).

    Args:
        engine: the DeepSpeed engine.
        cfg: the resolved config.
        step: optimizer steps done.
        client_state: what every rank shares (step, MLflow run id, config).
        rank_state: this rank's own state (RNGs, data position); all ranks' are stored under ``"ranks"``.

    Returns:
        The tag folder.
    """
    ckpt_dir = checkpoint_dir(cfg.run_dir)
    tag = checkpoint_tag(step)
    tag_dir = ckpt_dir / tag
    if distributed.is_main() and tag_dir.exists():
        # Left by a run killed while saving this step (``latest`` never named it): no stale file may mix
        # with the new ones or enter the new manifest.
        shutil.rmtree(tag_dir)
    distributed.barrier()
    state = {**client_state, "ranks": distributed.all_gather_object(rank_state)}
    try:
        # DeepSpeed's own 'latest' file is written non-atomically and before every rank is done: write ours.
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
        distributed.barrier()
        if distributed.is_main():
            save_config(cfg, tag_dir / "config.yaml")
            write_manifest(tag_dir)
            write_atomic(ckpt_dir / "latest", tag)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (ENOSPC included) as a plain RuntimeError; a failed collective
        # (a DistError, or gloo's RuntimeError when a peer died) is not a storage fault.
        if distributed.peer_failure(e):
            raise
        # A full disk or an I/O error: `latest` still names the previous checkpoint, which nothing touched.
        # The partial tag goes, to give the space back; a relaunch resumes from the previous one.
        if distributed.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = _previous(ckpt_dir)
        raise CheckpointWriteError(
            f"could not write checkpoint {tag_dir}: {_why(e)}; "
            + (
                f"the previous checkpoint {previous} is intact and a relaunch resumes from it"
                if previous
                else "no earlier checkpoint exists"
            )
            + ". Free space on that filesystem (or set run.output_dir elsewhere) and launch again"
        ) from e
    if distributed.is_main():
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        logger.info("saved checkpoint %s", tag_dir)
    distributed.barrier()
    return tag_dir


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    return str(error).splitlines()[0]


def _previous(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    try:
        return ckpt_dir / pointer.read_text().strip()
    except OSError:
        return None


def _usable_tag(run_dir: Path) -> tuple[str | None, str | None]:
    """(tag to resume from, None) or (None, error message); (None, None) for a fresh run folder."""
    ckpt_dir = checkpoint_dir(run_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None, None
    named = pointer.read_text().strip()
    named_step = checkpoint_step(named)
    candidates = [t for t in reversed(_tags(ckpt_dir)) if named_step is None or _step(t) < named_step]
    bad = []
    if named_step is None:
        logger.warning("%s names %r, which is not a checkpoint tag", pointer, named)
        bad.append(repr(named))
    else:
        candidates.insert(0, named)
    for tag in candidates:
        problem = verify_checkpoint(ckpt_dir / tag)
        if problem is None:
            if bad:
                logger.warning("resuming from the previous complete checkpoint %s", ckpt_dir / tag)
            return tag, None
        logger.warning("checkpoint %s is unusable: %s", ckpt_dir / tag, problem)
        bad.append(tag)
    return None, (
        f"no usable checkpoint in {ckpt_dir} (checked {', '.join(bad)}); restore the folder from a copy, or "
        f"delete {ckpt_dir} to start the run over"
    )


def find_resume_tag(run_dir: Path) -> str | None:
    """The checkpoint tag to resume from, the same on every rank (rank 0 verifies, then broadcasts).

    Returns:
        The tag, or None for a run folder without a ``latest`` pointer (a fresh run).

    Raises:
        RuntimeError: ``latest`` exists but neither it nor any older tag passes :func:`verify_checkpoint`.
    """
    picked = _usable_tag(Path(run_dir)) if distributed.is_main() else None
    tag, error = distributed.broadcast_object(picked)
    if error is not None:
        raise RuntimeError(error)
    return tag


def _plain_deepspeed_classes() -> list[Any]:
    """DeepSpeed classes its own states hold that are plain data (ZeRO's stage number, loss scaler and slice
    mappings): allowed by name, rebuilt from their fields without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` for DeepSpeed's checkpoint engine.

    Raises:
        ConfigError: the file holds a pickled object other than plain data (names the file).
    """
    try:
        with torch.serialization.safe_globals(_plain_deepspeed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice on how to load it anyway; keep only what it refused.
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\n|$)", str(e))
        reason = found.group(1) if found else str(e).strip().splitlines()[0] if str(e) else "unpickling error"
        raise ConfigError(
            f"checkpoint file {path} holds a pickled object, not plain data ({reason[:200]}); pcrl loads "
            "checkpoints weights-only and refused it, since unpickling it could run code. pcrl never writes "
            "such files: restore the checkpoint folder from a trusted copy, or delete that tag folder (a "
            "relaunch then resumes from the newest earlier one)"
        ) from None


def load_checkpoint(engine: Any, run_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``tag`` of ``run_dir`` into ``engine`` on every rank.

    Returns:
        The shared client state and this rank's own entry of it.

    Raises:
        ConfigError: the checkpoint was written by another number of processes, or one of its files holds
            a pickled object (refused before anything in it runs).
        RuntimeError: DeepSpeed could not load it.
    """
    ckpt_dir = checkpoint_dir(run_dir)
    # Every file DeepSpeed reads goes through its checkpoint engine's load: shadow it with a weights-only one.
    engine.checkpoint_engine.load = _load_weights_only
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    ranks = client_state.pop("ranks")
    world = distributed.world_size()
    if len(ranks) != world:
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} was written by {len(ranks)} processes and this launch has {world}; "
            f"relaunch with {len(ranks)} processes, or start a new run (another run.name)"
        )
    return client_state, ranks[distributed.rank()]


def rng_state() -> dict[str, Any]:
    """The global RNGs (Python, NumPy, torch CPU and CUDA) as plain data (loads with ``weights_only=True``)."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class ResumeState:
    """The trainer's state a checkpoint restores besides DeepSpeed's model and optimizer.

    Attributes:
        step: optimizer steps done.
        run_id: the MLflow run to continue (None when tracking was off or down).
        nonfinite_skips: micro-batches skipped so far for a non-finite loss.
        window: this rank's log window (:meth:`pcrl.metrics.MetricWindow.state_dict`).
        data: this rank's loader position (``loader_state`` of the stream).
    """

    step: int = 0
    run_id: str | None = None
    nonfinite_skips: int = 0
    window: dict[str, Any] | None = None
    data: dict[str, Any] | None = None


def save_training_state(
    engine: Any,
    cfg: PretrainConfig,
    state: ResumeState,
    generator: torch.Generator,
) -> Path:
    """Save the checkpoint of ``state.step`` with everything an exact resume needs: the shared counters and
    config, and every rank's RNGs, objective generator, loader position and log window. Call on all ranks."""
    shared = {
        "step": state.step,
        # Rank 0's (the state DeepSpeed saves); set late when MLflow was down at the start.
        "mlflow_run_id": state.run_id,
        "nonfinite_skips": state.nonfinite_skips,
        "config_hash": config_hash(cfg),
        "config": config_to_dict(cfg),
    }
    own = {"rng": rng_state(), "generator": generator.get_state(), "data": state.data, "window": state.window}
    return save_checkpoint(engine, cfg, state.step, shared, own)


def resume_training(engine: Any, run_dir: Path, tag: str, generator: torch.Generator) -> ResumeState:
    """Load checkpoint ``tag`` into ``engine``, restore this rank's global RNGs and the objective's
    ``generator``, and return the rest of the trainer's state. Call on all ranks."""
    shared, own = load_checkpoint(engine, run_dir, tag)
    generator.set_state(own["generator"])
    set_rng_state(own["rng"])
    return ResumeState(
        step=int(shared["step"]),
        run_id=shared.get("mlflow_run_id"),
        nonfinite_skips=int(shared.get("nonfinite_skips", 0)),
        window=own["window"],
        data=own["data"],
    )
