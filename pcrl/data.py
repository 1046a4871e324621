"""The streaming loader that feeds training processes, and the fixed views that evaluation and pictures show.

The loader reads the shards of :mod:`pcrl.shards` (the contract with ``data_prep``). It is deterministic
and independent of worker timing: each epoch draws one permutation of the manifest from ``(seed, epoch)``
on every rank, consumer ``c`` of ``world_size × num_workers`` takes every ``consumers``-th volume of it,
and every view is rendered with a seed derived from ``(seed, epoch, position in the permutation, pair)``
(:func:`derive_seed`). A loader built with ``start_batches=N`` continues exactly where one that has handed
out N batches stands; that is how a run resumes.

Example::

    loader = build_loader(cfg, PCRLv2Views(cfg.views), rank=0, world_size=1)
    state = loader.dataset.loader_state(batches=100, num_workers=cfg.data.num_workers)  # for a checkpoint
    loader = build_loader(cfg, PCRLv2Views(cfg.views), rank=0, world_size=1, start_batches=100)  # resumes
"""

from __future__ import annotations

import atexit
import functools
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pcrl.shards import SampleRecord, read_manifest, read_volume, threshold_to_unit, to_unit_range

if TYPE_CHECKING:
    from pcrl.config import PretrainConfig
    from pcrl.views import PCRLv2Views

__all__ = [
    "UNREADABLE",
    "BadDataError",
    "ViewLoader",
    "VolumeStream",
    "build_loader",
    "derive_seed",
    "fixed_views",
]

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (non-negative integers): the first 64-bit word
    ``np.random.SeedSequence(keys)`` generates, shifted right by one bit (so it fits a signed int64).

    Every derived seed of pcrl comes from here: the loader's per-sample seeds ``(seed, epoch, position,
    pair)``, its DataLoader generator ``(seed, rank, 0x10AD)``, and the fixed views of :func:`fixed_views`,
    each with a stream constant of its own among the keys.
    """
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


UNREADABLE: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    EOFError,
    OverflowError,
    MemoryError,
    RecursionError,
    RuntimeError,  # numcodecs' Blosc errors; zstandard.ZstdError and struct.error are wrapped by pcrl.shards
)
"""What reading one volume may raise on a damaged or hostile shard: the volume is skipped (or, with
``data.bad_volumes=fail``, the run stops with :class:`BadDataError`), never a traceback. KeyboardInterrupt and
SystemExit are not among them."""


class BadDataError(ValueError):
    """Unreadable volumes beyond what ``data.bad_volumes`` / ``data.max_bad_fraction`` allow; the message
    names the shard and the key."""

    @staticmethod
    def message(error: BaseException) -> str:
        """The message alone, without the worker traceback a DataLoader wraps around a worker's error."""
        return str(error).rsplit("BadDataError: ", 1)[-1].strip()


# --- the stream -------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, int, "float | None"], dict[str, Any]]


class VolumeStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of samples, split over ranks and loader workers.

    Epoch ``e`` permutes the records with ``np.random.default_rng([seed, e])`` (the same on every rank).
    There are ``world_size × num_workers`` consumers (one when the loader has no workers); consumer
    ``c = rank·num_workers + worker_id`` takes ``perm[c::consumers]``, cut to ``len(records) // consumers``
    so that every consumer yields the same number of samples per epoch (the remainder is skipped for that
    epoch, and differs from epoch to epoch). Each volume yields ``pairs_per_volume`` samples:
    ``transform(volume, derive_seed(seed, epoch, position, pair), tissue_threshold) | {"key": record.key}``,
    ``position`` being the volume's place in the epoch's permutation.

    Args:
        records: the volumes (e.g. from :func:`pcrl.shards.read_manifest`).
        transform: ``(volume (X, Y, Z) float32 in [0, 1], seed, tissue_threshold) -> dict`` (picklable when
            the loader has workers); :func:`build_loader` passes :meth:`pcrl.views.PCRLv2Views.draw`.
        rank: this process's rank.
        world_size: number of ranks.
        seed: the run seed.
        ct_window: (low, high) HU → [0, 1].
        pairs_per_volume: samples rendered from one decoded volume.
        tissue_threshold_hu: tissue threshold in HU, passed to the transform in [0, 1] units for CT and as
            ``None`` for MR; ``None`` turns it off.
        start_batches: resume a DataLoader over this stream (batches of ``batch_size``, any number of
            workers, or none) after it has handed out this many batches: every worker starts exactly where
            the uninterrupted loader's worker would be (see :meth:`worker_positions`); :meth:`loader_state`
            is what a checkpoint records of that position and :meth:`check_loader_state` checks it. A stream
            iterated without a DataLoader counts as a loader without workers.
        batch_size: the DataLoader's batch size (what ``start_batches`` counts in).
        verify: check each volume's checksum while reading.
        bad_volumes: what an unreadable volume (missing or truncated shard, corrupt bytes, non-finite voxels)
            does: ``fail`` raises :class:`BadDataError`; ``skip`` reports it with its shard and key, counts
            it, and reads the next volume of the consumer's share in its place.
        max_bad_fraction: with ``skip``, raise :class:`BadDataError` once the unreadable volumes one consumer
            has met pass this fraction of its share of an epoch.
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        transform: Transform,
        *,
        rank: int,
        world_size: int,
        seed: int,
        ct_window: Sequence[float],
        pairs_per_volume: int = 1,
        tissue_threshold_hu: float | None = -150.0,
        start_batches: int = 0,
        batch_size: int = 1,
        verify: bool = False,
        bad_volumes: str = "fail",
        max_bad_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if bad_volumes not in ("skip", "fail"):
            raise ValueError(f"bad_volumes must be skip or fail, got {bad_volumes!r}")
        self.bad_volumes = bad_volumes
        self.max_bad_fraction = float(max_bad_fraction)
        self._bad: set[str] = set()
        """Keys of the unreadable volumes this consumer has met (each reported and counted once)."""
        if not records:
            raise ValueError("VolumeStream needs at least one volume")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if pairs_per_volume < 1:
            raise ValueError(f"pairs_per_volume must be >= 1, got {pairs_per_volume}")
        if len(ct_window) != 2 or not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {list(ct_window)}")
        if start_batches < 0 or batch_size < 1:
            raise ValueError(
                f"start_batches must be >= 0 and batch_size >= 1, got {start_batches} and {batch_size}"
            )
        self.records = list(records)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.ct_window = (float(ct_window[0]), float(ct_window[1]))
        self.pairs_per_volume = pairs_per_volume
        self.tissue_threshold_hu = tissue_threshold_hu
        self.verify = verify
        self.start_batches = int(start_batches)
        self.batch_size = int(batch_size)

    # -- partitioning ----------------------------------------------------------------------------------

    def consumers(self, num_workers: int) -> int:
        """Number of consumers of one epoch for a loader with ``num_workers`` workers per rank."""
        return self.world_size * max(1, num_workers)

    def check_consumers(self, num_workers: int) -> None:
        """Raise ValueError when there are fewer volumes than consumers (some would get nothing)."""
        consumers = self.consumers(num_workers)
        if len(self.records) < consumers:
            raise ValueError(
                f"{len(self.records)} volumes but world_size×num_workers = {self.world_size}×{max(1, num_workers)} = "
                f"{consumers} consumers; lower data.num_workers or add volumes"
            )

    def epoch_indices(self, epoch: int, consumer: int, consumers: int) -> list[tuple[int, int]]:
        """``(position in the permutation, record index)`` pairs that ``consumer`` reads in ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        per_consumer = len(self.records) // consumers
        positions = range(consumer, consumer + consumers * per_consumer, consumers)
        return [(p, int(perm[p])) for p in positions]

    def worker_positions(self, batches: int, num_workers: int) -> list[dict[str, int]]:
        """Where each loader worker of this rank stands once a DataLoader has handed out ``batches`` batches.

        A DataLoader takes its batches round-robin from workers 0..W-1, each ``batch_size`` consecutive
        samples of one worker's stream, so worker ``w`` has made ``ceil((batches - w) / W)`` of them (one
        worker, the loading process itself, when ``num_workers`` is 0). Entry ``w`` is
        ``{"worker", "samples", "epoch", "cursor", "pair"}``: worker ``w`` has yielded ``samples`` samples
        and next renders pair ``pair`` of volume ``cursor`` of its share of epoch ``epoch``.
        """
        workers = max(1, num_workers)
        per_epoch = len(self.records) // self.consumers(num_workers) * self.pairs_per_volume
        positions = []
        for w in range(workers):
            samples = max(0, -(-(batches - w) // workers)) * self.batch_size
            epoch, rest = divmod(samples, per_epoch)
            cursor, pair = divmod(rest, self.pairs_per_volume)
            positions.append(
                {"worker": w, "samples": samples, "epoch": epoch, "cursor": cursor, "pair": pair}
            )
        return positions

    def _consumer(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        self.check_consumers(num_workers)
        # A resumed loader asks worker 0 first, where the uninterrupted one would ask worker
        # start_batches mod W next: worker i carries on the stream of worker (i + start_batches) mod W.
        slot = (worker_id + self.start_batches) % num_workers
        return slot, self.rank * num_workers + slot, self.consumers(num_workers)

    # -- iteration -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, consumer, consumers = self._consumer()
        # Where this worker's stream stands after start_batches batches ((0, 0, 0) for a fresh loader).
        at = self.worker_positions(self.start_batches, consumers // self.world_size)[slot]
        epoch, cursor, first_pair = at["epoch"], at["cursor"], at["pair"]
        while True:
            indices = self.epoch_indices(epoch, consumer, consumers)
            for i, (position, _) in enumerate(indices[cursor:], start=cursor):
                record, volume = self._read_readable(indices, i)
                threshold = threshold_to_unit(self.tissue_threshold_hu, record.modality, self.ct_window)
                for pair in range(first_pair, self.pairs_per_volume):
                    # A 63-bit seed, a pure function of (seed, epoch, position in the permutation, pair).
                    sample = self.transform(volume, derive_seed(self.seed, epoch, position, pair), threshold)
                    sample["key"] = record.key
                    yield sample
                first_pair = 0
            epoch, cursor = epoch + 1, 0

    def _read_readable(
        self, indices: Sequence[tuple[int, int]], at: int
    ) -> tuple[SampleRecord, torch.Tensor]:
        """The volume at ``indices[at]`` in [0, 1], or, when it is unreadable, the next readable one of this
        consumer's share (cyclically): every position still yields its samples, so positions and resumes stay
        exact. An unreadable volume is reported once with its shard and key, and counted.

        Raises:
            BadDataError: ``bad_volumes="fail"``, or this consumer's unreadable volumes pass
                ``max_bad_fraction`` of its share.
        """
        for k in range(len(indices)):
            record = self.records[indices[(at + k) % len(indices)][1]]
            if record.key in self._bad:
                continue
            try:
                array, _ = read_volume(record, verify=self.verify)
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise ValueError(
                        f"{record.shard}: volume {record.key} holds {int(np.size(array) - np.isfinite(array).sum())} "
                        "non-finite voxels (NaN/inf)"
                    )
                volume = to_unit_range(array, record.modality, self.ct_window)
            except UNREADABLE as e:
                e.__traceback__ = None  # its frames would keep the failed read's buffers alive
                self._skip(record, e, share=len(indices))
                continue
            return record, volume
        raise BadDataError(
            f"no readable volume left in this loader's share of {len(indices)}; see the warnings above"
        )

    def _skip(self, record: SampleRecord, error: BaseException, share: int) -> None:
        reason = (
            str(error) if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {error}"
        )
        if record.key not in reason:
            reason = f"volume {record.key}: {reason}"
        if str(record.shard) not in reason:
            reason = f"{record.shard}: {reason}"
        if self.bad_volumes == "fail":
            raise BadDataError(f"{reason} (data.bad_volumes=fail; set it to skip to train on without it)")
        self._bad.add(record.key)
        limit = self.max_bad_fraction * share
        logger.warning(
            "skipping unreadable volume %s of shard %s: %s (%d unreadable of this loader's %d volumes, limit %.3g)",
            record.key,
            record.shard,
            reason,
            len(self._bad),
            share,
            limit,
        )
        if len(self._bad) > limit:
            raise BadDataError(
                f"{len(self._bad)} of the {share} volumes of one loader are unreadable, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows (last: {reason}); check or re-shard "
                "the data (python -m data_prep.shard), or raise data.max_bad_fraction"
            )

    def loader_state(self, batches: int, num_workers: int) -> dict[str, Any]:
        """The data position a checkpoint records for a loader with ``num_workers`` workers that has handed
        out ``batches`` batches: every worker's position, plus everything those positions depend on."""
        return {
            "batches": batches,
            "batch_size": self.batch_size,
            "num_workers": num_workers,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_records": len(self.records),
            "pairs_per_volume": self.pairs_per_volume,
            "workers": self.worker_positions(batches, num_workers),
        }

    def check_loader_state(self, saved: Mapping[str, Any], num_workers: int) -> None:
        """Raise ValueError, naming the setting, unless ``saved`` (from :meth:`loader_state`) is exactly where
        this stream resumes a loader with ``num_workers`` workers."""
        mine = self.loader_state(self.start_batches, num_workers)
        settings = {
            "seed": "run.seed",
            "world_size": "the number of processes",
            "num_workers": "data.num_workers",
            "batch_size": "train.micro_batch_size",
            "pairs_per_volume": "views.pairs_per_volume",
            "num_records": "the number of volumes in data.shards (data.split)",
        }
        for key, setting in settings.items():
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"{setting} was {saved.get(key)} when the checkpoint was written and is {mine[key]} now, so "
                    "the data position cannot be carried over exactly; relaunch with the checkpoint's value "
                    "or start a new run (another run.name)"
                )
        if saved != mine:
            raise ValueError(
                f"the checkpoint's data position {dict(saved)} is not where the loader resumes: {mine}"
            )


def _worker_init(worker_id: int) -> None:
    # A preemption signal (SIGTERM/SIGUSR1) may reach the whole process group; it is the training process's
    # to handle at a step boundary, and a worker dying of it would fail the batch in flight.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    # At exit multiprocessing terminates daemonic children with SIGTERM and waits for them; loader workers
    # ignore SIGTERM (above), so a process leaving with its persistent workers alive (an error, a preemption)
    # would wait forever.
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _kill_workers_at_exit_once() -> None:
    """Register :func:`_kill_workers_at_exit` once per process, when the first loader with workers is built:
    after multiprocessing's own exit handler (registered when torch imports it), so it runs first (atexit is
    LIFO). A process that only imports this module (``data_prep``, evaluation) keeps Python's exit as it is."""
    atexit.register(_kill_workers_at_exit)


def build_loader(
    cfg: PretrainConfig,
    views: PCRLv2Views,
    rank: int,
    world_size: int,
    start_batches: int = 0,
    device: torch.device | str | None = None,
) -> torch.utils.data.DataLoader | ViewLoader:
    """The training loader of one rank: manifest → :class:`VolumeStream` → batches of views.

    Batches come from one worker each, round-robin, so the batch sequence is deterministic, and a loader
    built with ``start_batches=N`` continues exactly where one that has handed out N batches stands. The
    workers' own RNGs are seeded from ``(run.seed, rank)``; the views never draw from them (each sample has
    its own seed), and the training process's global RNG is left untouched.

    The workers decode volumes, draw each sample's geometry from its seed and cut the regions its views read
    (:meth:`pcrl.views.PCRLv2Views.draw`); whole batches are rendered at once by ``views`` (a
    :class:`pcrl.views.PCRLv2Views` with its torch or DALI spatial backend): in the workers on a CPU ``device``
    (default), or in this process on a GPU or by DALI, through a :class:`ViewLoader`.

    Raises:
        FileNotFoundError / ValueError: see :func:`pcrl.shards.read_manifest`; ValueError also when there are
            fewer volumes than ``world_size × data.num_workers``.
        TypeError: ``views`` is not a renderer of :mod:`pcrl.views`.
    """
    from pcrl.views import PCRLv2Views, TorchSpatial, collate_draws

    if not isinstance(views, PCRLv2Views):
        raise TypeError(f"build_loader renders with a pcrl.views.PCRLv2Views, got {type(views).__name__}")
    records = read_manifest(cfg.data.shards, cfg.data.split)
    stream = VolumeStream(
        records,
        views.draw,
        rank=rank,
        world_size=world_size,
        seed=cfg.run.seed,
        ct_window=cfg.data.ct_window,
        pairs_per_volume=cfg.views.pairs_per_volume,
        tissue_threshold_hu=cfg.views.filter_threshold_hu,
        start_batches=start_batches,
        batch_size=cfg.train.micro_batch_size,
        bad_volumes=cfg.data.bad_volumes,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    workers = cfg.data.num_workers
    # Fail here, in the training process, rather than inside a worker.
    stream.check_consumers(workers)
    extra: dict[str, Any] = (
        {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": True} if workers else {}
    )
    # Whole batches are rendered by the torch renderer in the worker on a CPU, or here (a GPU, or DALI) from
    # pinned regions.
    device = torch.device(device if device is not None else "cpu")
    render_here = device.type != "cpu" or not isinstance(views.spatial, TorchSpatial)
    # A GPU gets the packed float16 regions of pack_regions; DALI on a CPU gets the list of crops.
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = (
        functools.partial(collate_draws, pack=device.type != "cpu") if render_here else views.collate
    )
    if not render_here:
        # compiles the CPU renderer's kernels once here, before the workers fork, not in every worker
        importlib.import_module("pcrl.views.cpu_kernels")
    if workers:
        _kill_workers_at_exit_once()
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.train.micro_batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if workers else None,
        # The DataLoader's own generator (its workers' base seed), a pure function of (seed, rank).
        generator=torch.Generator().manual_seed(derive_seed(cfg.run.seed, rank, 0x10AD)),
        **extra,
    )
    return ViewLoader(loader, views, device) if render_here else loader  # type: ignore[arg-type]


class ViewLoader:
    """Batches of draws from a DataLoader, rendered in this process by ``views`` on ``device``.

    Iterating yields rendered batches (the dict of :meth:`pcrl.views.PCRLv2Views.render`); ``dataset`` is the
    DataLoader's :class:`VolumeStream`, so positions and resume work as for a plain loader. The copy of the
    next batch to the GPU is non-blocking from pinned memory and nothing here waits for the device.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, views: Any, device: torch.device) -> None:
        self.loader = loader
        self.views = views
        self.device = device

    @property
    def dataset(self) -> VolumeStream:
        """The stream the batches come from."""
        return self.loader.dataset  # type: ignore[return-value]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.views.render(batch, self.device)


# --- fixed views ------------------------------------------------------------------------------------


def fixed_views(
    cfg: PretrainConfig,
    views: PCRLv2Views,
    samples: Sequence[tuple[SampleRecord, Sequence[int]]],
) -> Iterator[tuple[SampleRecord, dict[str, Any]]]:
    """Render fixed samples, the way the loader renders training samples but with seeds chosen by the caller:
    the views of the validation metric (:func:`pcrl.evaluate.eval_views`) and of the reconstruction panel
    (:func:`pcrl.figures.panel_views`).

    Args:
        cfg: the run config (``data.ct_window``, ``views.filter_threshold_hu``).
        views: the renderer.
        samples: ``(record, keys)`` pairs; each renders ``views(volume, derive_seed(*keys), threshold)``
            from the record's volume in [0, 1] with its tissue threshold, as in training. A volume is read
            once and kept only until its last sample.

    Yields:
        ``(record, sample)`` in the order of ``samples``; ``sample`` as :meth:`pcrl.views.PCRLv2Views.__call__`
        returns it.
    """
    last = {record.key: i for i, (record, _) in enumerate(samples)}
    volumes: dict[str, torch.Tensor] = {}
    for i, (record, keys) in enumerate(samples):
        if record.key not in volumes:
            array, _ = read_volume(record)
            volumes[record.key] = to_unit_range(array, record.modality, cfg.data.ct_window)
        threshold = threshold_to_unit(cfg.views.filter_threshold_hu, record.modality, cfg.data.ct_window)
        volume = volumes.pop(record.key) if last[record.key] == i else volumes[record.key]
        yield record, views(volume, seed=derive_seed(*keys), tissue_threshold=threshold)
