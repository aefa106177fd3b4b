"""Vectorize one prediction raster: chunk tasks in parallel, seams merged, layers written."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.grid import ChunkGrid
from geoseg.raster import check_writable
from geoseg.remote import is_remote
from geoseg.vectorize.centerlines import (
    CenterlineJob,
    SkeletonPixels,
    build_centerlines,
    skeleton_chunk,
)
from geoseg.vectorize.export import LayerWriter
from geoseg.vectorize.geometry import frames_for
from geoseg.vectorize.options import CONTACT_CLASS, LayerOutput, VectorizeOptions, VectorizeOutputs
from geoseg.vectorize.polygons import ChunkPolygons, PolygonJob, finish_polygons, polygonize_chunk
from geoseg.vectorize.seams import SeamMerger
from geoseg.vectorize.source import Prediction, open_prediction

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["vectorize_prediction"]

log = logging.getLogger(__name__)

Task = tuple[str, Callable[..., Any], tuple[Any, ...]]


def _call(tag: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    return tag, fn(*args)


@contextlib.contextmanager
def local_client(workers: int) -> Iterator[Client]:
    """A Dask cluster of ``workers`` single-threaded worker processes on this machine.

    Processes, not threads: polygonizing holds the GIL for much of its time. Workers are
    forked when this process runs no other threads (about 1 s to start instead of several
    seconds of fresh imports per worker), else spawned. Forked workers inherit this process's
    allocator (tuned by the command line); spawned ones get the same settings through
    glibc's variables (:data:`geoseg.runtime.MALLOC_ENV`) unless the user set their own.
    """
    import dask
    from distributed import Client, LocalCluster

    from geoseg.predict import QUIET_WORKERS
    from geoseg.runtime import MALLOC_ENV, allocator_wanted

    method = "fork" if os.name == "posix" and threading.active_count() == 1 else "spawn"
    settings: dict[str, Any] = {"distributed.worker.multiprocessing-method": method}
    if method == "spawn" and allocator_wanted():
        environ = dask.config.get("distributed.nanny.pre-spawn-environ", {})
        settings["distributed.nanny.pre-spawn-environ"] = {**environ, **MALLOC_ENV}
    with (
        dask.config.set({**settings, **QUIET_WORKERS}),
        LocalCluster(
            processes=True,
            n_workers=workers,
            threads_per_worker=1,
            dashboard_address=":0",  # any free port: no clash with a running cluster
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _run(tasks: list[Task], client: Client | None, workers: int) -> Iterator[tuple[str, Any]]:
    """Results of ``tasks`` as they finish: on ``client``, inline for one worker, else on a
    local Dask cluster of ``workers`` processes; at most two tasks per worker in flight.
    """
    from geoseg.predict import stream_tasks

    if client is not None:
        n = max(1, sum(client.nthreads().values()))
        yield from stream_tasks(client, _call, iter(tasks), 2 * n, "geoseg-vectorize")
        return
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            yield _call(*t)
        return
    with local_client(min(workers, len(tasks))) as local:
        yield from stream_tasks(local, _call, iter(tasks), 2 * workers, "geoseg-vectorize")


def _contact(
    pred: Prediction, cls: str, options: VectorizeOptions
) -> tuple[tuple[str, ...], tuple[str, float] | None]:
    """(classes whose pixels join ``cls``'s, class cut out above a probability) for buildings
    of a model with a contact class. Merging: building and contact pixels form the footprint.
    Splitting: building pixels only, less those whose contact probability reaches
    ``contact_threshold`` (which matters below 0.5, where building can still be likeliest)."""
    if cls != "building" or CONTACT_CLASS not in pred.classes:
        return (), None
    if not options.split_touching:
        return (CONTACT_CLASS,), None
    return (), (CONTACT_CLASS, options.contact_threshold)


def _layer_plan(pred: Prediction, options: VectorizeOptions) -> list[tuple[str, str, str]]:
    """(class, layer name, kind) for every layer to write."""
    plan: list[tuple[str, str, str]] = []
    for cls, kind in options.layers.items():
        if cls not in pred.classes:
            log.warning("%s: no class %r (classes: %s); skipped", pred.path, cls, pred.classes)
            continue
        plan.append((cls, f"{cls}s", kind))
        if kind == "centerlines" and options.road_polygons:
            plan.append((cls, f"{cls}_areas", "polygons"))
    if not plan:
        raise InputError(
            f"{pred.path}: none of the classes {sorted(options.layers)} to vectorize is in its "
            f"classes {list(pred.classes)}"
        )
    return plan


def vectorize_prediction(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: VectorizeOptions | None = None,
    client: Client | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VectorizeOutputs:
    """Write ``<stem>.<layer>.geojson`` (and other formats) for a probs or mask raster.

    Chunks run on ``client`` when given, else in ``options.workers`` local processes; the
    raster is read window by window. ``progress(done, total)`` is called after each chunk.
    """
    options = options or VectorizeOptions()
    pred = open_prediction(path)
    frames = frames_for(pred)
    out = Path(out_dir)
    check_writable(out)
    plan = _layer_plan(pred, options)
    grid = ChunkGrid(pred.width, pred.height, options.chunk, 0, multiple=1)
    rows, cols = grid.shape
    tasks: list[Task] = []
    jobs: dict[str, PolygonJob | CenterlineJob] = {}
    for cls, layer, kind in plan:
        if kind == "polygons":
            pj = PolygonJob(
                pred,
                frames,
                cls,
                layer,
                options.threshold,
                options.min_area_m2,
                options.simplify_m,
                options.regularize and cls != "road",
                options.precision,
                len(options.formats) > 1,
                *_contact(pred, cls, options),
            )
            jobs[layer] = pj
            for ch in grid:
                seams = (ch.row > 0, ch.row < rows - 1, ch.col > 0, ch.col < cols - 1)
                tasks.append((layer, polygonize_chunk, (pj, ch.index, ch.core, seams)))
        else:
            cj = CenterlineJob(
                pred,
                frames,
                cls,
                layer,
                options.threshold,
                options.spur_m,
                options.simplify_m,
                options.halo,
            )
            jobs[layer] = cj
            for ch in grid:
                tasks.append((layer, skeleton_chunk, (cj, Window(*ch.core.flatten()))))
    writers = {
        layer: LayerWriter(
            out,
            pred.stem,
            layer,
            frames,
            options.formats,
            options.precision,
            "Polygon" if kind == "polygons" else "LineString",
        )
        for _, layer, kind in plan
    }
    try:
        skeletons = _collect(tasks, client, options.workers, writers, jobs, grid.shape, progress)
        counts: dict[str, LayerOutput] = {}
        for _, layer, kind in plan:
            job = jobs[layer]
            if isinstance(job, CenterlineJob):
                pix = SkeletonPixels.concat(skeletons.get(layer, []))
                writers[layer].write(build_centerlines(job, pix))
            counts[layer] = LayerOutput(layer, kind, writers[layer].count)  # type: ignore[arg-type]
        for layer, w in writers.items():
            counts[layer].paths = w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    log.info("%s: %s", pred.path, ", ".join(f"{n} {c.count}" for n, c in counts.items()))
    return VectorizeOutputs(os.fspath(path) if is_remote(path) else Path(path), counts)


def _collect(
    tasks: list[Task],
    client: Client | None,
    workers: int,
    writers: dict[str, LayerWriter],
    jobs: dict[str, PolygonJob | CenterlineJob],
    shape: tuple[int, int],
    progress: Callable[[int, int], None] | None,
) -> dict[str, list[SkeletonPixels]]:
    """Run the chunk tasks; returns the skeleton pixels of each centerline layer.

    Polygon chunks are taken in chunk order (row by row), whatever order they finish in: their
    whole features are written at once and their seam pieces joined; each component that
    crosses seams is written as soon as the chunks on all its seams are in.
    """
    skeletons: dict[str, list[SkeletonPixels]] = {}
    mergers = {
        layer: SeamMerger(*shape) for layer, job in jobs.items() if isinstance(job, PolygonJob)
    }
    order = {(t[0], t[2][1]): i for i, t in enumerate(tasks) if t[1] is polygonize_chunk}
    ordered = sorted(order.values())
    ready: dict[int, tuple[str, ChunkPolygons]] = {}
    nxt = 0
    for done, (layer, value) in enumerate(_run(tasks, client, workers), start=1):
        if isinstance(value, ChunkPolygons):
            ready[order[(layer, value.index)]] = (layer, value)
            while nxt < len(ordered) and ordered[nxt] in ready:
                lyr, ch = ready.pop(ordered[nxt])
                writers[lyr].write_rendered(ch.text, ch.count, ch.done)
                merged = mergers[lyr].add(ch)
                job = jobs[lyr]
                assert isinstance(job, PolygonJob)
                writers[lyr].write(finish_polygons(job, merged))
                nxt += 1
        else:
            skeletons.setdefault(layer, []).append(value)
        if progress is not None:
            progress(done, len(tasks))
    for lyr, merger in mergers.items():
        job = jobs[lyr]
        assert isinstance(job, PolygonJob)
        writers[lyr].write(finish_polygons(job, merger.finish()))
    return skeletons
