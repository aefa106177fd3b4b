"""Vectorize one prediction raster: chunk tasks in parallel, seams merged, layers written."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.grid import ChunkGrid
from geoseg.raster import check_writable
from geoseg.vectorize.centerlines import (
    CenterlineJob,
    SkeletonPixels,
    build_centerlines,
    skeleton_chunk,
)
from geoseg.vectorize.export import LayerWriter
from geoseg.vectorize.features import FeatureBatch
from geoseg.vectorize.geometry import frames_for
from geoseg.vectorize.options import LayerOutput, VectorizeOptions, VectorizeOutputs
from geoseg.vectorize.polygons import ChunkPolygons, PolygonJob, finish_polygons, polygonize_chunk
from geoseg.vectorize.seams import merge_seams
from geoseg.vectorize.source import Prediction, open_prediction

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["vectorize_prediction"]

log = logging.getLogger(__name__)

Task = tuple[str, Callable[..., Any], tuple[Any, ...]]


def _call(tag: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    return tag, fn(*args)


def _run_local(tasks: list[Task], workers: int) -> Iterator[tuple[str, Any]]:
    """Run tasks inline (1 worker) or in a process pool, at most 2 per worker in flight."""
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            yield _call(*t)
        return
    # fork is cheap and inherits the imports; fall back to spawn where threads are running.
    method = "fork" if threading.active_count() == 1 and os.name == "posix" else "spawn"
    todo = iter(tasks)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: set[Future[tuple[str, Any]]] = set()
        for t in todo:
            pending.add(pool.submit(_call, *t))
            if len(pending) >= 2 * workers:
                break
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                nxt = next(todo, None)
                if nxt is not None:
                    pending.add(pool.submit(_call, *nxt))
                yield fut.result()


def _run(tasks: list[Task], client: Client | None, workers: int) -> Iterator[tuple[str, Any]]:
    if client is None:
        yield from _run_local(tasks, workers)
        return
    from geoseg.predict import stream_tasks

    n = max(1, sum(client.nthreads().values()))
    yield from stream_tasks(client, _call, iter(tasks), 2 * n, "geoseg-vectorize")


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
    pred = open_prediction(Path(path))
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
        results = _collect(tasks, client, options.workers, writers, progress)
        counts: dict[str, LayerOutput] = {}
        for _, layer, kind in plan:
            job = jobs[layer]
            if isinstance(job, PolygonJob):
                merged = merge_seams(results.polygons.get(layer, {}))
                writers[layer].write(finish_polygons(job, merged))
            else:
                pix = SkeletonPixels.concat(results.skeletons.get(layer, []))
                writers[layer].write(build_centerlines(job, pix))
            counts[layer] = LayerOutput(layer, kind, writers[layer].count)  # type: ignore[arg-type]
        for layer, w in writers.items():
            counts[layer].paths = w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    log.info("%s: %s", pred.path, ", ".join(f"{n} {c.count}" for n, c in counts.items()))
    return VectorizeOutputs(Path(path), counts)


class _Results:
    def __init__(self) -> None:
        self.polygons: dict[str, dict[tuple[int, int], ChunkPolygons]] = {}
        self.skeletons: dict[str, list[SkeletonPixels]] = {}


def _collect(
    tasks: list[Task],
    client: Client | None,
    workers: int,
    writers: dict[str, LayerWriter],
    progress: Callable[[int, int], None] | None,
) -> _Results:
    """Run the chunk tasks; write finished polygons in chunk order, keep seam pieces."""
    res = _Results()
    order = {(t[0], t[2][1]): i for i, t in enumerate(tasks) if t[1] is polygonize_chunk}
    ready: dict[int, tuple[str, ChunkPolygons]] = {}
    nxt = 0
    ordered = sorted(order.values())
    for done, (layer, value) in enumerate(_run(tasks, client, workers), start=1):
        if isinstance(value, ChunkPolygons):
            ready[order[(layer, value.index)]] = (layer, value)
            while nxt < len(ordered) and ordered[nxt] in ready:
                lyr, ch = ready.pop(ordered[nxt])
                writers[lyr].write_rendered(ch.text, ch.count, ch.done)
                ch.done, ch.text = FeatureBatch.empty(), ""
                res.polygons.setdefault(lyr, {})[ch.index] = ch
                nxt += 1
        else:
            res.skeletons.setdefault(layer, []).append(value)
        if progress is not None:
            progress(done, len(tasks))
    return res
