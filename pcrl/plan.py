"""Estimates of a pretraining run before it starts: shard storage, ingest CPU time, GPU-hours, wall time and
checkpoint sizes, from a summary of the data, the run's config and measured rates.

Every figure is a pure function of its inputs; every rate used is a :class:`Rate` that says where and when it
was measured, and the estimate lists them all under ``assumptions``. ``launch/plan.py`` is the command line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pcrl.config import PretrainConfig

__all__ = [
    "COMPRESSION",
    "DEVICES",
    "INGEST_CORE_S_PER_MVOX",
    "STORED_BYTES",
    "DataSummary",
    "Device",
    "PlanError",
    "Rate",
    "checkpoint_bytes",
    "estimate",
    "summarize_headers",
    "summarize_records",
    "training_rate",
]


class PlanError(ValueError):
    """An input the estimate cannot be made from (no volumes, no GPUs, an unmeasured setting); the message
    names it and what to do."""


@dataclass(frozen=True)
class Rate:
    """One measured rate and its provenance."""

    value: float
    unit: str
    measured: str
    """When (ISO date)."""
    where: str
    """The machine and the command or document the number comes from."""

    def describe(self, what: str) -> dict[str, Any]:
        """The rate as an ``assumptions`` entry."""
        return {
            "what": what,
            "value": self.value,
            "unit": self.unit,
            "measured": self.measured,
            "where": self.where,
        }


# Bytes per stored voxel: data_prep writes CT as int16 HU and MR as float16 in [0, 1].
STORED_BYTES: dict[str, int] = {"ct": 2, "mr": 2}

# Compressed shard bytes / raw stored bytes, per modality: data_prep.shard (WebDataset, zstd level 1, the default)
# on the five pyradiomics sample volumes at 1 mm (4 accepted: two lung CTs 0.473 and 0.489, two brain MRs 0.794
# and 0.812). --compression-level 3 stores about 0.40 and 0.76 (docs/benchmarks.md#data-preparation).
COMPRESSION: dict[str, Rate] = {
    "ct": Rate(
        0.49, "compressed/raw bytes", "2026-12-04",
        "python -m data_prep.shard on the pyradiomics lung CTs (1 mm, WebDataset, level 1), cpu-zen4",
    ),
    "mr": Rate(
        0.81, "compressed/raw bytes", "2026-12-04",
        "python -m data_prep.shard on the pyradiomics brain MRs (1 mm, WebDataset, level 1), cpu-zen4",
    ),
}  # fmt: skip

# CPU time of data_prep.shard per million output voxels (read, reorient, resample to 1 mm, intensity policy,
# compress, write, and the job's QA sheet), one worker.
INGEST_CORE_S_PER_MVOX = Rate(
    0.068,
    "core-seconds per output Mvoxel",
    "2026-12-04",
    "data_prep.shard of the pyradiomics brain1 (MR) and lung1 (CT) with one worker, cpu-zen4 "
    "(launch/plan.py --calibrate; 0.063 and 0.068 in two runs)",
)


@dataclass(frozen=True)
class Device:
    """A known accelerator: training-step throughput per setting at one model size, and the share of that
    throughput the real engine keeps once the loader and DeepSpeed are in the loop."""

    name: str
    description: str
    step_rates: Mapping[tuple[str, bool, int], Rate]
    """(precision, channels_last, micro_batch) → samples/s of ``bench/train_step.py`` on one device."""
    measured_size: Mapping[str, Any]
    """The model and view sizes the rates were measured at (config keys → values)."""
    engine_fraction: Rate
    """Samples/s of the real engine (loader, views, DeepSpeed) over the step alone."""
    multi_device_efficiency: Rate = field(
        default_factory=lambda: Rate(
            1.0,
            "fraction of linear scaling",
            "not measured",
            "assumed: pcrl has not run on more than one GPU (docs/benchmarks.md, What has run on a GPU)",
        )
    )


_H100 = "one NVIDIA H100 80GB, torch 2.11, CUDA 13.0 (docs/benchmarks.md, Training step, GPU)"
_H100_STEP = "bash bench/gpu_check.sh train (bench/train_step.py), " + _H100

DEVICES: dict[str, Device] = {
    "h100": Device(
        name="h100",
        description="NVIDIA H100 80GB (SXM), measured 2026-11-26/27",
        step_rates={
            ("fp32", False, 8): Rate(59.6, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", False, 8): Rate(92.5, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", True, 8): Rate(125.1, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", False, 16): Rate(97.7, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", True, 16): Rate(146.2, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", False, 32): Rate(101.1, "samples/s", "2026-11-26", _H100_STEP),
            ("bf16", True, 32): Rate(157.6, "samples/s", "2026-11-26", _H100_STEP),
            # The engine itself (fp16 through DeepSpeed's loss scaling, 40 steps): 56 samples/s, so the step
            # alone is that over the engine fraction below.
            ("fp16", True, 8): Rate(
                round(56 / (113 / 146.2), 1),
                "samples/s",
                "2026-11-27",
                "bash bench/gpu_check.sh engine (fp16, micro-batch 8: 56 samples/s in the engine, "
                "divided by the engine fraction), " + _H100,
            ),
        },
        measured_size={
            "model.base_channels": 32,
            "model.depth": 4,
            "views.global_size": (64, 64, 32),
            "views.local_size": (16, 16, 16),
            "views.num_locals": 6,
        },
        engine_fraction=Rate(
            round(113 / 146.2, 3),
            "engine/step samples/s",
            "2026-11-27",
            "launch/pretrain.py base.yaml, bf16 + channels-last, micro-batch 16, 12 loader workers, three "
            "real volumes: 111-115 samples/s against 146.2 for the step alone, " + _H100,
        ),
    ),
}


@dataclass(frozen=True)
class DataSummary:
    """The volumes a run would train on: counts, voxels at the target spacing and stored bytes per modality.

    ``stored_bytes`` is measured (a shard folder's manifest) or ``None`` (raw inputs: estimated from voxels).
    """

    volumes: dict[str, int]
    voxels: dict[str, int]
    stored_bytes: dict[str, int] | None
    origin: str
    files_found: int | None = None
    sampled: int | None = None
    unreadable: int = 0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scaled_from: int | None = None
    """The volumes actually summarised when the figures were scaled to more (``launch/plan.py --volumes``)."""

    @property
    def total_volumes(self) -> int:
        return sum(self.volumes.values())

    def scaled(self, factor: float) -> DataSummary:
        """The same data ``factor`` times over (for what-if plans and tests)."""
        return replace(
            self,
            scaled_from=self.scaled_from or self.total_volumes,
            volumes={m: round(n * factor) for m, n in self.volumes.items()},
            voxels={m: round(n * factor) for m, n in self.voxels.items()},
            stored_bytes=None
            if self.stored_bytes is None
            else {m: round(n * factor) for m, n in self.stored_bytes.items()},
        )


def summarize_records(records: Iterable[Any], origin: str) -> DataSummary:
    """A summary of manifest records (:class:`pcrl.shards.SampleRecord`): shapes and compressed sizes.

    Raises:
        PlanError: there are no records.
    """
    volumes: dict[str, int] = {}
    voxels: dict[str, int] = {}
    stored: dict[str, int] = {}
    for r in records:
        volumes[r.modality] = volumes.get(r.modality, 0) + 1
        voxels[r.modality] = voxels.get(r.modality, 0) + int(np.prod(r.shape))
        stored[r.modality] = stored.get(r.modality, 0) + int(r.size)
    if not volumes:
        raise PlanError(f"{origin}: the manifest lists no volumes; shard some with python -m data_prep.shard")
    return DataSummary(volumes, voxels, stored, origin)


def summarize_headers(
    shapes: Sequence[tuple[Sequence[int], str]],
    files_found: int,
    unreadable: int,
    origin: str,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> DataSummary:
    """Extrapolate a sample of headers to all ``files_found`` files.

    Args:
        shapes: for each readable sampled file, its shape after resampling to ``spacing`` and its modality.
        files_found: volume files under the inputs.
        unreadable: sampled files whose header could not be read (assumed rejected in the same share).
        origin: what the inputs were, for messages.
        spacing: the target spacing (``data_prep.shard --spacing``).

    Raises:
        PlanError: no sampled header could be read.
    """
    if not shapes:
        raise PlanError(f"{origin}: none of the {unreadable} sampled files has a readable volume header")
    # Each sampled file stands for files_found / sampled files; unreadable ones for files data_prep rejects.
    scale = files_found / (len(shapes) + unreadable)
    volumes: dict[str, float] = {}
    voxels: dict[str, float] = {}
    for shape, modality in shapes:
        volumes[modality] = volumes.get(modality, 0.0) + scale
        voxels[modality] = voxels.get(modality, 0.0) + scale * int(np.prod(shape))
    return DataSummary(
        {m: round(n) for m, n in volumes.items()},
        {m: round(n) for m, n in voxels.items()},
        None,
        origin,
        files_found=files_found,
        sampled=len(shapes) + unreadable,
        unreadable=unreadable,
        spacing=tuple(float(s) for s in spacing),
    )


def _size_of(cfg: PretrainConfig) -> dict[str, Any]:
    return {
        "model.base_channels": cfg.model.base_channels,
        "model.depth": cfg.model.depth,
        "views.global_size": tuple(cfg.views.global_size),
        "views.local_size": tuple(cfg.views.local_size),
        "views.num_locals": cfg.views.num_locals,
    }


def training_rate(cfg: PretrainConfig, device: Device) -> tuple[float, list[dict[str, Any]]]:
    """Samples/s of one device of the real engine for ``cfg``, and the rates it rests on.

    The step rate of the config's (precision, channels-last, micro-batch); an unmeasured micro-batch takes
    the nearest measured one of the same setting. A model or view size other than the measured one scales
    the rate by the ratio of FLOPs per sample (:func:`pcrl.metrics.flops_per_sample`).

    Raises:
        PlanError: the device has no measurement of the config's precision and channels-last setting.
    """
    precision, cl, mb = cfg.engine.precision, cfg.engine.channels_last, cfg.train.micro_batch_size
    same = {k[2]: r for k, r in device.step_rates.items() if k[:2] == (precision, cl)}
    if not same:
        known = ", ".join(
            f"engine.precision={p} engine.channels_last={str(c).lower()}"
            for p, c in sorted({k[:2] for k in device.step_rates})
        )
        raise PlanError(
            f"--device {device.name}: no measurement of engine.precision={precision} "
            f"engine.channels_last={str(cl).lower()}; measured settings: {known}"
        )
    nearest = min(same, key=lambda m: (abs(math.log(m / mb)), m))
    step = same[nearest]
    what = f"training step, {precision}{' + channels-last' if cl else ''}, micro-batch {nearest}, per device"
    if nearest != mb:
        what += f" (nearest measured to train.micro_batch_size={mb})"
    assumptions = [step.describe(what), device.engine_fraction.describe("real engine over the step alone")]
    rate = step.value * device.engine_fraction.value
    size = _size_of(cfg)
    if size != dict(device.measured_size):
        from pcrl.metrics import flops_per_sample

        measured_cfg = replace(
            cfg,
            model=replace(
                cfg.model,
                base_channels=device.measured_size["model.base_channels"],
                depth=device.measured_size["model.depth"],
            ),
            views=replace(
                cfg.views,
                global_size=device.measured_size["views.global_size"],
                local_size=device.measured_size["views.local_size"],
                num_locals=device.measured_size["views.num_locals"],
            ),
        )
        ratio = flops_per_sample(measured_cfg) / flops_per_sample(cfg)
        rate *= ratio
        assumptions.append(
            {
                "what": "throughput scaled by FLOPs per sample (measured size / this config's size)",
                "value": round(ratio, 4),
                "unit": "ratio",
                "measured": "computed",
                "where": f"pcrl.metrics.flops_per_sample; measured size {dict(device.measured_size)}, "
                f"this config {size}",
            }
        )
    return rate, assumptions


def checkpoint_bytes(cfg: PretrainConfig, checkpoints_written: int) -> tuple[int, int, dict[str, Any]]:
    """Bytes of one checkpoint and of the set the run keeps, from the parameter count.

    A checkpoint holds the weights (fp32; fp16 runs hold fp16 weights plus fp32 master copies), the
    optimizer's state (AdamW: two fp32 moments; SGD: one momentum buffer, none at momentum 0) and the
    buffers (BatchNorm statistics). The model is built on the meta device: no memory, no arithmetic.
    """
    import torch

    from pcrl.objective import build_task

    with torch.device("meta"):
        task = build_task(cfg, activation_checkpointing=False)
    params = sum(p.numel() for p in task.parameters())
    buffers = sum(b.numel() * b.element_size() for b in task.buffers())
    per_param = 4 if cfg.engine.precision != "fp16" else 2 + 4
    if cfg.optim.name == "adamw":
        per_param += 2 * 4
    elif cfg.optim.momentum > 0:
        per_param += 4
    one = params * per_param + buffers
    keep = cfg.train.keep_checkpoints
    kept = checkpoints_written if keep == 0 else min(keep, checkpoints_written)
    detail = {"parameters": params, "bytes_per_parameter": per_param, "buffer_bytes": buffers, "kept": kept}
    return one, one * kept, detail


def estimate(
    data: DataSummary,
    cfg: PretrainConfig,
    gpus: int,
    device: Device | None = None,
    device_rate: Rate | None = None,
    ingest: Rate = INGEST_CORE_S_PER_MVOX,
    compression: Mapping[str, Rate] | None = None,
) -> dict[str, Any]:
    """The plan of a run: storage, ingest, training time and checkpoint sizes, with every rate it used.

    Args:
        data: the volumes (:func:`summarize_records` or :func:`summarize_headers`).
        cfg: the resolved pretraining config (``train.max_steps``, batch sizes, precision, model).
        gpus: devices the run trains on (each runs ``train.micro_batch_size`` per micro-batch).
        device: a known device (:data:`DEVICES`); or ``device_rate``, a calibrated samples/s of the real
            engine on one device of this machine.
        ingest: CPU time of ``data_prep.shard`` per output megavoxel.
        compression: compressed/raw bytes per modality for raw inputs (default :data:`COMPRESSION`).

    Raises:
        PlanError: zero GPUs, no volumes, or a modality without a compression rate.
    """
    if gpus < 1:
        raise PlanError(f"--gpus: must be at least 1, got {gpus}")
    if data.total_volumes < 1:
        raise PlanError(f"{data.origin}: no volumes to train on")
    if (device is None) == (device_rate is None):
        raise PlanError("give either a known --device or --calibrate")
    compression = COMPRESSION if compression is None else compression
    assumptions: list[dict[str, Any]] = []

    # storage: measured compressed bytes, or voxels x bytes per voxel x measured compression.
    if data.stored_bytes is not None:
        storage = dict(data.stored_bytes)
        storage_note = f"compressed sizes in the manifest of {data.origin}"
    else:
        storage = {}
        for modality, vox in data.voxels.items():
            if modality not in compression:
                raise PlanError(
                    f"no compression rate for modality {modality!r}; known: {sorted(compression)}"
                )
            storage[modality] = round(vox * STORED_BYTES[modality] * compression[modality].value)
            assumptions.append(compression[modality].describe(f"shard compression, {modality}"))
        storage_note = (
            f"{data.files_found} volume files found, headers of {data.sampled} sampled "
            f"({data.unreadable} unreadable), resampled to {data.spacing} mm, "
            f"CT int16 / MR float16, x measured compression"
        )
    total_voxels = sum(data.voxels.values())
    ingest_core_hours = total_voxels / 1e6 * ingest.value / 3600
    assumptions.append(ingest.describe("ingest CPU time (data_prep.shard, one worker)"))

    # training: samples per step from the config and the device count, as launch/pretrain.py would run it.
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * gpus
    train_samples = samples_per_step * cfg.train.max_steps
    if device is not None:
        per_device, rate_notes = training_rate(cfg, device)
        assumptions.extend(rate_notes)
        efficiency = device.multi_device_efficiency if gpus > 1 else None
        device_name = device.name
    else:
        assert device_rate is not None
        per_device = device_rate.value
        assumptions.append(device_rate.describe("training step on this machine, per device"))
        efficiency = (
            Rate(1.0, "fraction of linear scaling", "not measured", "assumed for --calibrate")
            if gpus > 1
            else None
        )
        device_name = "this machine (--calibrate)"
    if efficiency is not None:
        per_device *= efficiency.value
        assumptions.append(efficiency.describe(f"scaling to {gpus} devices"))
    train_wall_hours = train_samples / (per_device * gpus) / 3600
    train_gpu_hours = train_wall_hours * gpus

    every = cfg.train.checkpoint_every
    written = (cfg.train.max_steps // every if every else 0) + (
        0 if every and cfg.train.max_steps % every == 0 else 1
    )
    one, kept, ckpt = checkpoint_bytes(cfg, written)
    assumptions.append(
        {
            "what": "checkpoint contents",
            "value": ckpt["bytes_per_parameter"],
            "unit": "bytes per parameter",
            "measured": "computed",
            "where": f"{ckpt['parameters']:,} parameters of the config's model and heads (built on the meta "
            f"device) x weights + {cfg.optim.name} state, plus {ckpt['buffer_bytes']:,} buffer bytes; "
            "DeepSpeed's own metadata not counted",
        }
    )
    return {
        "data": {
            "origin": data.origin,
            "volumes": dict(data.volumes),
            "voxels": dict(data.voxels),
            "files_found": data.files_found,
            "sampled": data.sampled,
            "unreadable": data.unreadable,
            "scaled_from": data.scaled_from,
        },
        "device": device_name,
        "gpus": gpus,
        "storage_bytes": {"total": sum(storage.values()), "per_modality": storage, "from": storage_note},
        "ingest_core_hours": ingest_core_hours,
        "train_samples": train_samples,
        "samples_per_step": samples_per_step,
        "samples_per_volume": train_samples / data.total_volumes,
        "train_samples_per_s_per_device": per_device,
        "train_gpu_hours": train_gpu_hours,
        "train_wall_hours": train_wall_hours,
        "checkpoint_bytes": {"one": one, "kept": kept, "kept_count": ckpt["kept"], "written": written},
        "assumptions": assumptions,
    }
