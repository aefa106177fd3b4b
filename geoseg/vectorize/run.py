"""Vectorize one prediction raster: chunk tasks in parallel, seams merged, layers written.

Two ways in: :func:`vectorize_prediction` on a finished raster, and
:class:`StreamingVectorizer` while :func:`geoseg.engine.scene.predict_scene` writes one, each task
submitted as soon as the tiles it reads are stored. Both share :class:`_Vectorization`: the
tasks, and the fixed order their results are taken in, so the files do not depend on which
task finishes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rasterio.windows import Window

from geoseg.engine.grid import ChunkGrid
from geoseg.errors import InputError, OutputError, call_portably
from geoseg.io.raster import check_writable
from geoseg.io.remote import is_remote, redact
from geoseg.io.tiles import tile_keys
from geoseg.io.writer import RasterWriter, yield_to_the_model
from geoseg.runtime import cpu_cores
from geoseg.vectorize.centerlines import (
    CenterlineJob,
    SkeletonPixels,
    build_centerlines,
    skeleton_chunk,
)
from geoseg.vectorize.export import LayerWriter
from geoseg.vectorize.geometry import Frames, frames_for
from geoseg.vectorize.options import CONTACT_CLASS, LayerOutput, VectorizeOptions, VectorizeOutputs
from geoseg.vectorize.polygons import ChunkPolygons, PolygonJob, finish_polygons, polygonize_chunk
from geoseg.vectorize.seams import SeamMerger
from geoseg.vectorize.source import Prediction, inside, open_prediction, with_context

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.engine.options import PredictOptions

__all__ = ["StreamingVectorizer", "vector_cluster", "vectorize_prediction"]

log = logging.getLogger(__name__)

Task = tuple[str, Callable[..., Any], tuple[Any, ...]]


def _call(tag: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    return tag, fn(*args)


def _call_yielding(tag: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    """:func:`_call` at a lower priority (the worker thread's), beside a model on this CPU."""
    yield_to_the_model()
    return _call(tag, fn, args)


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

    from geoseg.engine.cluster import QUIET_WORKERS
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


@contextlib.contextmanager
def vector_cluster(
    predict: PredictOptions, options: VectorizeOptions | None
) -> Iterator[Client | None]:
    """The worker processes that make vectors while scenes are predicted on a local cluster of
    threads (polygonizing holds the GIL): ``options.workers`` of them when set, else that
    default or half the cores, whichever is more (on a 16-core GPU machine 8 processes, the
    other cores reading chunks and writing tiles for the GPU). Start it before that cluster,
    so that its workers fork. None when no vectors are asked for (``options`` None) or when
    ``predict`` runs on a Dask scheduler, whose workers take the vector tasks too."""
    if options is None or predict.scheduler:
        yield None
        return
    workers = options.workers
    if "workers" not in options.model_fields_set:
        workers = max(workers, cpu_cores() // 2)
    with local_client(workers) as client:
        yield client


def _run(tasks: list[Task], client: Client | None, workers: int) -> Iterator[tuple[str, Any]]:
    """Results of ``tasks`` as they finish: on ``client``, inline for one worker, else on a
    local Dask cluster of ``workers`` processes; at most two tasks per worker in flight.
    """
    from geoseg.engine.cluster import stream_tasks

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


def _threshold(cls: str, options: VectorizeOptions) -> float:
    """The probability threshold of class ``cls``'s polygons."""
    if cls == "building" and options.building_threshold is not None:
        return options.building_threshold
    return options.threshold


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


def _valley(
    pred: Prediction, cls: str, frames: Frames, options: VectorizeOptions
) -> tuple[int, float] | None:
    """(square side in pixels, odd, at least 3; depth) of the valley cut for buildings, from
    ``valley_m`` in this raster's pixels; None when off, when touching buildings are merged
    (``split_touching`` false) or without probabilities."""
    if cls != "building" or not options.valley_m or not options.split_touching:
        return None
    if pred.probs is None:
        log.warning(
            "%s: valley_m needs the class probabilities (a .probs.tif); buildings are not "
            "cut along valleys",
            redact(pred.path),
        )
        return None
    px = sum(frames.pixel_m) / 2
    side = max(3, round(options.valley_m / px))
    return side + 1 - side % 2, options.valley_depth


def _layer_plan(pred: Prediction, options: VectorizeOptions) -> list[tuple[str, str, str]]:
    """(class, layer name, kind) for every layer to write."""
    plan: list[tuple[str, str, str]] = []
    for cls, kind in options.layers.items():
        if cls not in pred.classes:
            log.warning(
                "%s: no class %r (classes: %s); skipped", redact(pred.path), cls, pred.classes
            )
            continue
        plan.append((cls, f"{cls}s", kind))
        if kind == "centerlines" and options.road_polygons:
            plan.append((cls, f"{cls}_areas", "polygons"))
    if not plan:
        raise InputError(
            f"{redact(pred.path)}: none of the classes {sorted(options.layers)} to vectorize is "
            "in its "
            f"classes {list(pred.classes)}"
        )
    return plan


class _Vectorization:
    """One prediction's vectorization: its chunk tasks, layer writers and seam mergers.

    Results come in through :meth:`add` in any order; polygon chunks are taken in a fixed order
    (by ``rank``, then row by row): their whole features are written at once and their seam
    pieces joined, and each component that crosses seams is written as soon as the chunks on
    all its seams are in. So the files are the same whatever order the tasks finish in.
    """

    def __init__(
        self,
        pred: Prediction,
        out: Path,
        options: VectorizeOptions,
        rank: Callable[[Window], int] | None = None,
    ) -> None:
        """``rank(window)``: when the pixels of a task's window can be read (tasks are taken in
        that order); default: all at once."""
        self.pred = pred
        options = options.under(pred.model_settings)
        frames = frames_for(pred)
        plan = _layer_plan(pred, options)
        self.plan = plan
        grid = ChunkGrid(pred.width, pred.height, options.chunk, 0, multiple=1)
        rows, cols = grid.shape
        #: (layer, function, arguments) of every task, and the window each task reads
        self.tasks: list[Task] = []
        self.reads: list[Window] = []
        self.jobs: dict[str, PolygonJob | CenterlineJob] = {}
        for cls, layer, kind in plan:
            if kind == "polygons":
                pj = PolygonJob(
                    pred,
                    frames,
                    cls,
                    layer,
                    _threshold(cls, options),
                    options.min_area_m2,
                    options.simplify_m,
                    options.regularize and cls != "road",
                    options.precision,
                    len(options.formats) > 1,
                    *_contact(pred, cls, options),
                    _valley(pred, cls, frames, options),
                )
                self.jobs[layer] = pj
                # a valley cut reads the closing's reach around the core
                reach = pj.valley[0] - 1 if pj.valley is not None else 0
                for ch in grid:
                    seams = (ch.row > 0, ch.row < rows - 1, ch.col > 0, ch.col < cols - 1)
                    self.tasks.append((layer, polygonize_chunk, (pj, ch.index, ch.core, seams)))
                    self.reads.append(with_context(ch.core, reach) if reach else ch.core)
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
                    options.bridge_m,
                )
                self.jobs[layer] = cj
                for ch in grid:
                    core = Window(*ch.core.flatten())
                    self.tasks.append((layer, skeleton_chunk, (cj, core)))
                    self.reads.append(with_context(core, options.halo))
        self.writers = {
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
        self.skeletons: dict[str, list[SkeletonPixels]] = {}
        self.mergers = {
            layer: SeamMerger(rows, cols)
            for layer, job in self.jobs.items()
            if isinstance(job, PolygonJob)
        }
        self.order = {
            (t[0], t[2][1]): i for i, t in enumerate(self.tasks) if t[1] is polygonize_chunk
        }
        self.ranks = [0 if rank is None else rank(w) for w in self.reads]
        self.ordered = sorted(self.order.values(), key=lambda i: (self.ranks[i], i))
        self.ready: dict[int, tuple[str, ChunkPolygons]] = {}
        self.next = 0

    def add(self, layer: str, value: Any) -> None:
        """Take one task's result."""
        if not isinstance(value, ChunkPolygons):
            self.skeletons.setdefault(layer, []).append(value)
            return
        self.ready[self.order[(layer, value.index)]] = (layer, value)
        while self.next < len(self.ordered) and self.ordered[self.next] in self.ready:
            lyr, ch = self.ready.pop(self.ordered[self.next])
            self.writers[lyr].write_rendered(ch.text, ch.count, ch.done)
            merged = self.mergers[lyr].add(ch)
            job = self.jobs[lyr]
            assert isinstance(job, PolygonJob)
            self.writers[lyr].write(finish_polygons(job, merged, traced=True))
            self.next += 1

    def publish(self, path: str | os.PathLike[str]) -> VectorizeOutputs:
        """Once every task's result is in: the last polygons and the centerlines written, each
        layer published under its final names."""
        for lyr, merger in self.mergers.items():
            job = self.jobs[lyr]
            assert isinstance(job, PolygonJob)
            self.writers[lyr].write(finish_polygons(job, merger.finish(), traced=True))
        counts: dict[str, LayerOutput] = {}
        for _, layer, kind in self.plan:
            job = self.jobs[layer]
            if isinstance(job, CenterlineJob):
                pix = SkeletonPixels.concat(self.skeletons.get(layer, []))
                self.writers[layer].write(build_centerlines(job, pix))
            counts[layer] = LayerOutput(layer, kind, self.writers[layer].count)  # type: ignore[arg-type]
        for layer, w in self.writers.items():
            counts[layer].paths = w.close()
        shown = ", ".join(f"{n} {c.count}" for n, c in counts.items())
        log.info("%s: %s", redact(self.pred.path), shown)
        return VectorizeOutputs(os.fspath(path) if is_remote(path) else Path(path), counts)

    def abort(self) -> None:
        """Delete every layer's partial files."""
        for w in self.writers.values():
            w.abort()


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
    out = Path(out_dir)
    check_writable(out)
    v = _Vectorization(pred, out, options)
    try:
        results = _run(v.tasks, client, options.workers)
        for done, (layer, value) in enumerate(results, start=1):
            v.add(layer, value)
            if progress is not None:
                progress(done, len(v.tasks))
        return v.publish(path)
    except BaseException:
        v.abort()
        raise


#: Streamed vectorize tasks in flight per worker, at most: results are taken only between two
#: chunks of the prediction (a CPU's forward pass takes seconds), so each worker has work queued.
TASKS_PER_WORKER = 4


class StreamingVectorizer:
    """Vectorizes a prediction while :func:`geoseg.engine.scene.predict_scene` writes it.

    Each chunk task is submitted to ``client`` as soon as every full-resolution tile it reads
    is stored in the writer's scratch file (:meth:`poll`), and reads those tiles instead of the
    COG, which does not exist yet (:class:`geoseg.io.tiles.StoredTiles`). So the vectors are made
    while the model runs, on the client's workers (processes: polygonizing holds the GIL), and
    the features are those :func:`vectorize_prediction` makes from the finished raster. At
    most :data:`TASKS_PER_WORKER` tasks per worker are in flight. :meth:`finish` stores the last
    tiles and waits for the remaining tasks (the scratch files must still exist: before the
    writer commits); :meth:`publish` then writes the layers under their final names.
    """

    def __init__(
        self,
        pred: Prediction,
        name: str,
        out: Path,
        options: VectorizeOptions,
        client: Client,
        written: Sequence[Window],
        yield_cpu: bool = False,
    ) -> None:
        """``pred`` describes the raster being written as output ``name`` of the writer, chunk
        by chunk in the order ``written`` (their cores). ``yield_cpu``: the model runs on this
        machine's CPU; the tasks run at a lower priority so that they take the cores it leaves
        idle, and the rest after it."""
        from distributed import as_completed

        self.client = client
        self.call = _call_yielding if yield_cpu else _call
        self.name = name
        self.source = pred.probs if pred.kind == "probs" else pred.mask

        def tiles(w: Window) -> list[tuple[int, int]]:
            return tile_keys(*inside(w, pred.width, pred.height))

        last: dict[tuple[int, int], int] = {}  # the last chunk written into each tile
        for i, core in enumerate(written):
            for key in tiles(core):
                last[key] = i

        def rank(w: Window) -> int:
            return max((last.get(key, len(written)) for key in tiles(w)), default=0)

        self.v = _Vectorization(pred, out, options, rank)
        self.limit = TASKS_PER_WORKER * max(1, sum(client.nthreads().values()))
        self.keys = [tiles(w) for w in self.v.reads]
        self.waiting = deque(sorted(range(self.total), key=lambda i: (self.v.ranks[i], i)))
        self.in_flight: set[Any] = set()
        self.done = as_completed()
        self.finished = 0

    @property
    def total(self) -> int:
        """Number of chunk tasks."""
        return len(self.v.tasks)

    def _submit_ready(self, writer: RasterWriter) -> None:
        """Submit waiting tasks in rank order while their tiles are stored and slots are free;
        the first task still missing a tile stops the scan (those after it need later tiles,
        or at least as late: a scan costs what it submits, not the scene's task count)."""
        while self.waiting and len(self.in_flight) < self.limit:
            i = self.waiting[0]
            stored = writer.stored(self.name, self.keys[i])
            if stored is None:
                return
            self.waiting.popleft()
            layer, fn, args = self.v.tasks[i]
            job = args[0]
            assert self.source is not None
            staged = replace(job.pred, staged={self.source: stored})
            args = (replace(job, pred=staged), *args[1:])
            fut = self.client.submit(
                call_portably,
                self.call,
                layer,
                fn,
                args,
                key=f"geoseg-vectorize-{uuid.uuid4().hex}",
                pure=False,
                retries=1,
            )
            self.in_flight.add(fut)
            self.done.add(fut)

    def _take(self, fut: Any) -> None:
        self.in_flight.discard(fut)
        layer, value = fut.result()
        fut.release()
        self.v.add(layer, value)
        self.finished += 1

    def poll(self, writer: RasterWriter) -> None:
        """Take the results that are in, and submit the tasks whose tiles are all stored."""
        for fut in [f for f in self.in_flight if f.done()]:
            self._take(fut)
        self._submit_ready(writer)

    def finish(
        self, writer: RasterWriter, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Store the last tiles (:meth:`RasterWriter.flush`), run every remaining task and take
        every result; ``progress(done, total)`` after each."""
        writer.flush()
        self._submit_ready(writer)
        while self.in_flight:
            fut = next(iter(self.done))
            if fut not in self.in_flight:  # taken by poll already
                continue
            self._take(fut)
            self._submit_ready(writer)
            if progress is not None:
                progress(self.finished, self.total)
        if self.waiting:  # every tile is stored: only an output never written is missing
            raise OutputError(f"{self.source}: {len(self.waiting)} vectorize chunks never read")

    def publish(self) -> VectorizeOutputs:
        """Write the last features and publish every layer (after the rasters are committed)."""
        assert self.source is not None
        return self.v.publish(self.source)

    def abort(self) -> None:
        """Cancel the tasks in flight and delete every layer's partial files."""
        if self.in_flight:
            self.client.cancel(list(self.in_flight))
            self.in_flight.clear()
        self.v.abort()
