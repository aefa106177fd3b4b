"""The Dask cluster a prediction runs on (an in-process one by default, quiet), and the task
stream: a bounded number of tasks in flight, results taken in order as they finish."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from geoseg.errors import ConfigError, call_portably
from geoseg.runtime import cpu_cores

if TYPE_CHECKING:
    from distributed import Client


from geoseg.engine.options import PredictOptions, local_threads

#: Dask settings for every local cluster geoseg starts. The worker's statistical profiler
#: samples every thread's stack 100 times a second on the event loop, under the GIL; beside an
#: in-process forward pass that cost 5–18 % of its time on a 2-core CPU.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False}


#: More for :func:`open_client`'s in-process cluster, whose scheduler and worker share an event
#: loop thread with the forward pass: each wake-up of that loop takes the GIL and a core from
#: it. With the profiler off, the other periodic callbacks (a tick every 20 ms on both, a
#: worker memory check every 100 ms, system monitors every 500 ms, work stealing, the active
#: memory manager) still cost 5 % of every pass (+31 ± 6 ms on a 580 ms pass, passes alternated
#: with and without a cluster); at the settings below, 3 % (+17 ± 6 ms). None of them has work
#: here: a single worker holds every task, tasks are few and long, their memory bounded.
QUIET_LOCAL_CLUSTER = {
    **QUIET_WORKERS,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
    "distributed.scheduler.active-memory-manager.start": False,
}


@contextlib.contextmanager
def open_client(options: PredictOptions) -> Iterator[Client]:
    """A Dask client: the given scheduler, or an in-process local cluster of worker threads."""
    import dask
    from distributed import Client, LocalCluster

    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach Dask scheduler {options.scheduler}: {exc}") from exc
        with client:
            yield client
        return
    with dask.config.set(QUIET_LOCAL_CLUSTER):  # read when the cluster starts, not later
        cluster = LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=local_threads(options),
            dashboard_address=":0",  # any free port: no clash with a running cluster
            silence_logs=logging.WARNING,
        )
    with cluster, Client(cluster) as client:
        yield client


def stream_tasks(
    client: Client,
    fn: Callable[..., Any],
    args: Iterator[tuple[Any, ...]],
    max_in_flight: int,
    name: str,
) -> Iterator[Any]:
    """Submit ``fn(*a)`` for each ``a``, at most ``max_in_flight`` at once; yield results as done.

    On error the remaining tasks are cancelled and the task's exception is re-raised.
    """
    from distributed import as_completed

    pending = as_completed()
    futures = set()

    def submit_next() -> bool:
        a = next(args, None)
        if a is None:
            return False
        key = f"{name}-{uuid.uuid4().hex}"
        fut = client.submit(call_portably, fn, *a, key=key, pure=False, retries=1)
        futures.add(fut)
        pending.add(fut)
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    try:
        for fut in pending:
            result = fut.result()
            futures.discard(fut)
            fut.release()
            yield result
            submit_next()
    finally:
        if futures:
            client.cancel(list(futures))


def write_in_background(options: PredictOptions, device: str) -> bool:
    """Queue each chunk's tiles for the writer's threads without waiting (see
    :class:`RasterWriter`) when the model runs elsewhere (a GPU, a remote cluster) and this
    machine's cores are free for it; when the forward pass fills this CPU, wait for each
    chunk's tiles, so that the writer does not run ahead of the model."""
    return (device != "cpu" or bool(options.scheduler)) and cpu_cores() > 1
