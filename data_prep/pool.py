"""Where the work of :mod:`data_prep.shard` runs: this process, a local process pool, or a Ray cluster.

All three run the same module-level functions on the same arguments and hand the results back in
submission order, with a bounded number of tasks in flight. The sharder's output therefore does not depend
on the back end or the worker count, and the parent never holds more than ``window`` results (each worker
holds one volume at a time). Both DICOM header reading and volume preparation go through :meth:`Pool.map`.

Ray (``--ray ADDRESS``): ``local`` starts a private Ray instance on this machine with ``--workers`` CPUs
and stops it at the end; ``auto`` or ``ray://host:10001`` / ``host:6379`` joins a running cluster, whose
CPUs set the number of tasks in flight. On a cluster the input paths must be readable from every node
(a shared file system) and ``pcrl`` installed in the nodes' Python; the output is assembled by this process
only (local workers stage their results beside it, :attr:`Pool.shares_disk`). Ray gives each one-CPU task
``OMP_NUM_THREADS=1``, as the local pool does with ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["Pool", "PoolError", "WorkerDied"]

logger = logging.getLogger(__name__)

# Heavy imports done once in the forkserver, before it forks the workers (torch alone takes seconds).
_PRELOAD = ["torch", "SimpleITK", "nibabel", "pydicom", "zstandard", "pcrl.shards", "data_prep.readers"]


class PoolError(RuntimeError):
    """The back end cannot run the work (Ray missing or unreachable, a worker died); the message says what
    to do."""


class WorkerDied(PoolError):
    """A worker process died while running a task (killed, or out of memory); ``str(exc)`` says which.
    ``recoverable`` is true where the other tasks go on (Ray) and false where they are lost with it (a local
    process pool)."""

    def __init__(self, message: str, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


def _init_worker() -> None:
    import numcodecs.blosc
    import torch

    # One process per core already; intra-op (and Blosc's) threads would oversubscribe.
    torch.set_num_threads(1)
    numcodecs.blosc.use_threads = False


class Pool:
    """Runs ``fn(*args)`` for many argument tuples in this process, a process pool or Ray, in order.

    Args:
        workers: local worker processes (<= 1: run in this process); with ``ray="local"`` the CPUs of the
            private Ray instance.
        ray: ``None`` (no Ray), ``"local"``, or the address of a running Ray cluster (``auto``, ``host:port``,
            ``ray://host:port``).

    The back end starts on the first :meth:`map` that needs it and stops in :meth:`close` (or on leaving a
    ``with`` block).
    """

    def __init__(self, workers: int = 1, ray: str | None = None) -> None:
        self.workers = workers
        self.ray = ray
        self._executor: ProcessPoolExecutor | None = None
        self._ray_started = False
        self._ray_remote: Any = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None

    @property
    def parallel(self) -> bool:
        return self.ray is not None or self.workers > 1

    @property
    def shares_disk(self) -> bool:
        """Whether the work runs on this machine (in this process, local processes, or a private Ray
        instance), so that a worker can write files for this process to move."""
        return self.ray in (None, "local")

    @property
    def backend(self) -> str:
        """``ray``, ``processes`` or ``inline`` (for summaries and messages)."""
        return "ray" if self.ray is not None else "processes" if self.workers > 1 else "inline"

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the local worker processes in the background (the forkserver imports torch and the readers
        once, a second or two), so that the start overlaps whatever this process does next, such as listing
        the inputs. :meth:`map` waits for it; :meth:`wait_started` says how long it had to. No-op for Ray and
        for work in this process."""
        if (
            self.ray is not None
            or not self.parallel
            or self._starting is not None
            or self._executor is not None
        ):
            return

        def warm() -> None:
            try:
                self._local()
                assert self._executor is not None
                # One short task per worker: each submit spawns a worker while none is idle yet.
                for future in [self._executor.submit(_ready) for _ in range(self.workers)]:
                    future.result()
            except BaseException as e:  # reported by map(), where the work needs the pool
                self._start_error = e

        self._starting = threading.Thread(target=warm, name="pool-start", daemon=True)
        self._starting.start()

    def wait_started(self) -> float:
        """Wait for :meth:`start` to finish; the seconds waited."""
        if self._starting is None:
            return 0.0
        began = time.perf_counter()
        self._starting.join()
        self._starting = None
        if self._start_error is not None:
            logger.debug("starting the workers failed: %r", self._start_error)
            self._start_error = None
            # map() starts the pool again and reports a failure where it happens.
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        return time.perf_counter() - began

    def map(
        self,
        fn: Callable[..., Any],
        args: Iterable[tuple[Any, ...]],
        window: int | None = None,
        failed: Callable[[tuple[Any, ...], str], Any] | None = None,
    ) -> Iterator[Any]:
        """``fn(*a)`` for each ``a`` in ``args``, yielded in order, at most ``window`` in flight (default
        twice the workers: each worker has its next task queued while the parent writes).

        Args:
            fn: a module-level function (workers import it by name).
            args: argument tuples.
            window: tasks in flight at most.
            failed: on Ray, where a dead worker loses only its own task, ``failed(a, reason)`` is yielded in
                place of that task's result; without it the death raises.

        Raises:
            WorkerDied: a worker process died running one of the tasks (the message names its input).
        """
        if not self.parallel:
            for a in args:
                yield fn(*a)
            return
        self.wait_started()
        submit, result = self._ray() if self.ray is not None else self._local()
        window = window or 2 * self._slots()
        pending: deque[tuple[tuple[Any, ...], Any]] = deque()
        it = iter(args)
        for a in it:
            pending.append((a, submit(fn, a)))
            if len(pending) >= window:
                break
        while pending:
            a, handle = pending.popleft()
            try:
                value = result(handle, a)
            except WorkerDied as e:
                if failed is None or not e.recoverable:
                    raise
                value = failed(a, str(e))
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, submit(fn, nxt)))
            yield value

    def _slots(self) -> int:
        if self.ray is None:
            return self.workers
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _local(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        if self._executor is None:
            # Not fork: the parent may hold torch/OpenMP threads. forkserver imports the heavy libraries once
            # and forks each worker from that clean, thread-free process; spawn where it is missing. (Not
            # data_prep.shard itself: under `python -m` the workers re-run it as __mp_main__, and a preloaded
            # copy makes runpy warn.)
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(_PRELOAD)
            else:
                ctx = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=_init_worker
            )
        executor = self._executor

        def submit(fn: Callable[..., Any], a: tuple[Any, ...]) -> Future[Any]:
            try:
                return executor.submit(fn, *a)
            except BrokenProcessPool as e:
                # A worker died before this task went in: it fails like the tasks in flight, in order, as a
                # WorkerDied from result() (not a bare BrokenProcessPool from the middle of map()).
                lost: Future[Any] = Future()
                lost.set_exception(e)
                return lost

        def result(future: Future[Any], a: tuple[Any, ...]) -> Any:
            try:
                return future.result()
            except BrokenProcessPool:
                # Every task in flight is lost with the pool: the job cannot go on in order.
                raise WorkerDied(
                    f"a worker process died while working on {_name(a)} or a task next to it (out of "
                    "memory?); retry with fewer --workers (completed work is kept and reused)"
                ) from None

        return submit, result

    def _ray(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        try:
            import ray

            from pcrl.ray_local import start_local_ray
        except ImportError:
            raise PoolError("--ray needs Ray: pip install 'pcrl[ray]'") from None
        if self._ray_remote is None:
            if not ray.is_initialized():
                try:
                    if self.ray == "local":
                        # address="local": a new instance even where another one runs on this machine (with
                        # no address, Ray would join any instance it finds, or RAY_ADDRESS).
                        # With token authentication on (pcrl.ray_local): its ports listen on every interface.
                        start_local_ray(num_cpus=max(1, self.workers), include_dashboard=False,
                                        logging_level=logging.WARNING, log_to_driver=False)  # fmt: skip
                    else:
                        ray.init(address=self.ray, logging_level=logging.WARNING)
                except (
                    Exception
                ) as e:  # ConnectionError, or a bare Exception when the node times out starting
                    raise PoolError(
                        f"--ray {self.ray}: cannot start or reach Ray ({type(e).__name__}: {str(e).strip()[:200]}); "
                        "pass the address of a running cluster (ray start --head prints it), auto, or local"
                    ) from None
                self._ray_started = True
            # max_retries=0: a task that killed its worker (out of memory) would kill the next one too.
            self._ray_remote = ray.remote(num_cpus=1, max_retries=0)(_call)
        remote = self._ray_remote

        def submit(fn: Callable[..., Any], a: tuple[Any, ...]) -> Any:
            return remote.remote(fn, a)

        def result(ref: Any, a: tuple[Any, ...]) -> Any:
            try:
                return ray.get(ref)
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
                # Other tasks are unaffected on Ray: the caller reports this one and goes on.
                raise WorkerDied(
                    f"the Ray worker died while working on it ({type(e).__name__}; out of memory?)",
                    recoverable=True,
                ) from None

        return submit, result

    def close(self) -> None:
        """Stop the process pool, and the Ray instance if this pool started or joined it."""
        self.wait_started()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False
        self._ray_remote = None


def _ready() -> None:
    time.sleep(0.02)  # long enough that the next submit finds this worker busy and starts another


def _call(fn: Callable[..., Any], a: tuple[Any, ...]) -> Any:
    return fn(*a)


def _name(a: tuple[Any, ...]) -> str:
    """The input a task was about, for messages (the first argument that has a path)."""
    for v in a:
        path = getattr(v, "path", None)
        if path is not None:
            return str(path)
    return repr(a[0]) if a else "a task"
