"""Where dask work runs: the only module that knows about schedulers.

``threads`` (default, all local cores), ``processes``, ``synchronous`` (debugging),
``local-cluster`` (a ``distributed.LocalCluster`` of worker processes) or the address of a
running ``dask scheduler``. Stages build lazy graphs; :meth:`Executor.compute` runs them
here, with a progress bar and timing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask

from .config import ExecutorConfig
from .errors import SchedulerError
from .plan import WorkerPlan

log = logging.getLogger("pipeline")


@contextmanager
def timed(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log the start, end and duration of a step (and record it in ``timings``)."""
    log.info("%s: started", name)
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        log.info("%s: stopped after %.2f s (%s)", name, time.perf_counter() - start,
                 type(exc).__name__)  # fmt: skip
        raise
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[name] = elapsed
    log.info("%s: finished in %.2f s", name, elapsed)


@dataclass
class Executor:
    """A live dask context: compute lazy objects with progress, know the core count."""

    kind: str
    n_cores: int
    client: Any = None
    progress: bool = False
    #: Distributed only: seconds without any task finishing before the run stops
    #: (``executor.stall_timeout_s``; ``None`` = wait forever).
    stall_timeout_s: float | None = None
    #: Task-state transitions each worker processed (distributed only), read when the
    #: executor closes: evidence of where the work ran.
    worker_transitions: dict[str, int] = field(default_factory=dict)

    def record_worker_activity(self) -> None:
        if self.client is None:
            return
        try:
            self.worker_transitions = self.client.run(
                lambda dask_worker: dask_worker.state.transition_counter
            )
        except Exception as exc:  # a lost worker must not fail a finished run
            log.warning("could not read worker activity: %s", exc)

    def compute(self, *objects: Any, desc: str = "") -> Any:
        """Compute dask collections on this executor; returns one result per object."""
        if self.client is not None:
            results = self._compute_distributed(objects, desc)
        elif self.progress:
            from dask.diagnostics import ProgressBar

            if desc:
                print(f"[{desc}]", flush=True)
            with ProgressBar(minimum=1.0):
                results = dask.compute(*objects)
        else:
            results = dask.compute(*objects)
        return results[0] if len(objects) == 1 else tuple(results)

    def _compute_distributed(self, objects: tuple, desc: str) -> list:
        """``client.compute`` + gather, watched: a lost scheduler or a cluster that stops
        making progress ends in one :class:`SchedulerError` line, not a hang or tracebacks."""
        from distributed import progress, wait

        client = self.client
        address = client.scheduler.address
        what = f" during {desc}" if desc else ""
        try:
            futures = client.compute(list(objects))
            bar = None
            if self.progress:  # drawn beside the watch below (the bar blocks until done)
                bar = threading.Thread(
                    target=progress, args=(futures,), kwargs={"notebook": False}, daemon=True
                )
                bar.start()
            watch = StallWatch(self.stall_timeout_s, lambda: _scheduler_transitions(client))
            while True:
                try:
                    wait(futures, timeout=watch.poll_s)
                    break
                except TimeoutError:
                    stalled = watch.stalled()
                    if stalled:
                        raise SchedulerError(
                            f"No task finished for {stalled:.0f} s{what} on the dask cluster at "
                            f"{address} (executor.stall_timeout_s). Check the workers (hung, "
                            "paused or out of memory); rerun to continue."
                        ) from None
            if bar is not None:
                bar.join(timeout=2)
                print(flush=True)
            return client.gather(futures)
        except SchedulerError:
            raise
        except Exception as exc:
            if client.status in ("running", "newly-created") and _scheduler_alive(client):
                raise  # a task's own error: the caller reports it
            raise SchedulerError(
                f"Lost the dask scheduler at {address}{what} ({type(exc).__name__}). Restart "
                "it and its workers, then rerun to continue (completed stages are kept)."
            ) from None


class StallWatch:
    """Tells when a counter (the scheduler's task transitions) has not moved for too long."""

    def __init__(self, limit_s: float | None, read: Any) -> None:
        self.limit_s, self.read = limit_s, read
        self.poll_s = 1.0 if limit_s is None else max(0.2, min(5.0, limit_s / 4))
        self.last, self.since = read(), time.monotonic()

    def stalled(self) -> float:
        """Seconds without progress if past the limit, else 0."""
        now, value = time.monotonic(), self.read()
        if value != self.last:
            self.last, self.since = value, now
            return 0.0
        idle = now - self.since
        return idle if self.limit_s is not None and idle > self.limit_s else 0.0


def _scheduler_transitions(client: Any) -> int:
    """Task state transitions the scheduler has processed (grows while work progresses)."""
    return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def _scheduler_alive(client: Any) -> bool:
    try:
        client.run_on_scheduler(lambda: True)
        return True
    except Exception:  # any failure to reach it is the answer
        return False


def _connect(address: str, timeout_s: float) -> Any:
    from distributed import Client

    try:
        return Client(address, timeout=f"{timeout_s}s", set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(
            f"Cannot reach the dask scheduler at {address} within {timeout_s:g} s ({type(exc).__name__}). "
            "Start it with 'dask scheduler' or fix executor.scheduler / --scheduler."
        ) from None


#: Packages whose versions must match between the client and every worker: they shape
#: the results or the pickled objects that travel between them.
MATCHED_PACKAGES = ("embedding-clusters", "numpy", "scikit-learn", "zarr", "dask", "distributed")


def check_workers(client: Any, timeout_s: float) -> None:
    """Every worker must import this package with the client's package versions.

    Raises :class:`SchedulerError` in one line naming the first worker and what is missing
    or different, instead of tasks that fail (or wait) on the workers only.
    """
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except (TimeoutError, OSError):
        raise SchedulerError(
            f"The dask scheduler at {client.scheduler.address} has no worker after "
            f"{timeout_s:g} s. Start workers with 'dask worker <address>'."
        ) from None
    packages = MATCHED_PACKAGES

    def environment() -> dict[str, str | None]:
        # Defined here so that it is pickled by value: it must run on a worker that
        # cannot import this package (which is what it finds out).
        from importlib import import_module
        from importlib.metadata import PackageNotFoundError, version

        found: dict[str, str | None] = {}
        for name in packages:
            try:
                found[name] = version(name)
            except PackageNotFoundError:
                found[name] = None
        try:
            import_module("pipeline.train")
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            found["import_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return found

    reports = client.run(environment)
    mine = environment()
    for worker, found in sorted(reports.items()):
        if found.get("import_error") or found.get("embedding-clusters") is None:
            why = found.get("import_error") or "not installed"
            raise SchedulerError(
                f"Worker {worker} cannot import the pipeline package ({why}). Install it on "
                "every worker (README: 'Workers need the package') and restart the workers."
            )
        different = [
            f"{name} {found.get(name)} (client {mine[name]})"
            for name in MATCHED_PACKAGES
            if found.get(name) != mine[name]
        ]
        if different:
            raise SchedulerError(
                f"Worker {worker} runs {', '.join(different)}. Install the client's versions "
                "on every worker: mixed versions can give different results."
            )


def return_large_blocks_to_os(threshold_bytes: int = 4 << 20) -> None:
    """Serve allocations above ``threshold_bytes`` with mmap, so freed blocks leave RSS.

    glibc raises its mmap threshold after each large free, after which block-sized arrays
    come from per-thread heaps that never shrink: peak memory then grows with the number
    of blocks seen, not with the block size. Fixing the threshold keeps it flat.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, threshold_bytes)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextmanager
def open_executor(
    cfg: ExecutorConfig, workers: WorkerPlan, verbose: bool = False
) -> Iterator[Executor]:
    """Enter the configured scheduler for the duration of the block.

    ``workers`` comes from the plan; progress bars and the dashboard link are printed
    only when ``verbose`` (and ``executor.progress``).
    """
    return_large_blocks_to_os()
    scheduler = cfg.scheduler
    progress = verbose and cfg.progress
    if scheduler in ("threads", "processes", "synchronous"):
        n = workers.n_workers
        local = {"scheduler": scheduler, "num_workers": n}
        with dask.config.set(local):
            yield Executor(kind=scheduler, progress=progress, n_cores=n)
        return
    if scheduler == "local-cluster":
        from distributed import Client, LocalCluster

        n_workers, threads = workers.n_workers, workers.threads_per_worker
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=":0",
            ) as cluster,
            Client(cluster) as client,
        ):
            log.info(
                "local cluster: %d workers x %d threads, dashboard %s",
                n_workers,
                threads,
                client.dashboard_link,
            )
            if verbose:
                print(f"dask dashboard: {client.dashboard_link}", flush=True)
            ex = Executor(
                kind="local-cluster", n_cores=workers.n_cores, client=client, progress=progress,
                stall_timeout_s=cfg.stall_timeout_s,
            )  # fmt: skip
            yield ex
            ex.record_worker_activity()
        return
    client = _connect(scheduler, cfg.connect_timeout_s)
    try:
        check_workers(client, cfg.connect_timeout_s)
        if verbose:
            print(f"dask dashboard: {client.dashboard_link}", flush=True)
        cores = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()) or 1
        ex = Executor(kind="distributed", n_cores=cores, client=client, progress=progress,
                      stall_timeout_s=cfg.stall_timeout_s)  # fmt: skip
        yield ex
        ex.record_worker_activity()
    finally:
        try:
            client.close(timeout=5)
        except Exception as exc:  # a lost scheduler: the run's own error says so
            log.debug("closing the client: %s", exc)
