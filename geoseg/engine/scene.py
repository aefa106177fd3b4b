"""The per-scene driver: chunk tasks streamed to the single writer that makes the COGs, the
vectors made while the scene is predicted, and the outputs' names, tags and stale siblings.

Results stream back to the writer on the client as they finish, with a bounded number of tasks
in flight: no full-scene array exists anywhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoseg.engine.resample import (
    ResampledGrid,
    resample_bytes,
)
from geoseg.io.raster import Scene, check_writable
from geoseg.io.remote import redact
from geoseg.io.writer import RasterWriter
from geoseg.models.bundle import Bundle

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.vectorize.options import VectorizeOptions
    from geoseg.vectorize.source import Prediction

from geoseg.engine.chunks import ChunkPlan, predict_chunks
from geoseg.engine.cluster import stream_tasks, write_in_background
from geoseg.engine.options import (
    MASK_NODATA,
    PredictOptions,
    PredictOutputs,
    local_threads,
    torch_threads,
)
from geoseg.engine.plan import (
    check_compatible,
    check_working_set,
    chunk_batches,
    chunk_order,
    scene_grid,
)
from geoseg.models.predictor import (
    BundleFactory,
    PredictorFactory,
    TorchPredictor,
    get_predictor,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)


def bundle_factory(bundle: Bundle, options: PredictOptions) -> BundleFactory:
    """The predictor recipe that :func:`predict_scene` uses for ``bundle`` by default."""
    from geoseg.models.backends import resolve_backend

    device = resolve_device(options.device)
    return BundleFactory(
        str(bundle.path.resolve()),
        bundle.sha256,
        device,
        resolve_precision(options.precision, device),
        torch_threads(options, device),
        options.tta,
        resolve_backend(options.backend, device),
        local_threads(options) if not options.scheduler else 1,
        bundle.spec_sha256,
        options.input_filter,
    )


def warm_up(
    bundle: Bundle, options: PredictOptions, scene: Scene, *, on_cpu: bool = False
) -> threading.Thread | None:
    """On CUDA, build the predictor that :func:`predict_scene` will use and run one pass at the
    scene's chunk shape, in a thread of this process, while the caller starts its local
    cluster and opens its outputs. Only for an in-process cluster (no ``scheduler``), whose
    workers then find the predictor built. Errors are left to the workers, which build it
    again and report them. Returns the started thread, or None.

    On a CPU (``on_cpu``: build only) it gains a fraction of a second of a run that takes
    minutes, and the weights would live in another thread's malloc arena: not by default."""
    device = resolve_device(options.device)
    if options.scheduler or not (device.startswith("cuda") or on_cpu):
        return None
    factory = bundle_factory(bundle, options)
    spec = bundle.with_input_filter(options.input_filter).spec
    padded = scene_grid(scene, spec, options).at(0, 0).padded
    shape = (options.batch_size, len(spec.bands), int(padded.height), int(padded.width))

    def work() -> None:
        try:
            predictor = get_predictor(factory)
            if factory.device.startswith("cuda") and isinstance(predictor, TorchPredictor):
                predictor.warm(shape)
        except Exception:  # noqa: S110  (reported by the worker that builds it again)
            log.debug("warm-up failed", exc_info=True)

    thread = threading.Thread(target=work, name="geoseg-warm-up", daemon=True)
    thread.start()
    return thread


def output_paths(scene: Scene, out_dir: Path) -> tuple[Path, Path]:
    """(probabilities, class mask) output paths for ``scene`` in ``out_dir``."""
    return out_dir / f"{scene.stem}.probs.tif", out_dir / f"{scene.stem}.mask.tif"


def stale_outputs(out_dir: Path, stem: str, written: Sequence[Path]) -> list[Path]:
    """Outputs of scene ``stem`` in ``out_dir`` that an earlier run wrote and this one did not
    (``written``, every file this run wrote for the scene): its probabilities or class mask
    when geoseg's tags show that geoseg wrote them, its quicklook, and its vector layers
    ``<stem>.<layer>.<format>`` (change layers included; a layer name without a dot, so that
    another scene's files, ``<stem>.x.<layer>.geojson``, never match). They describe another
    prediction than the files beside them."""
    from geoseg.vectorize.options import FORMATS

    keep = {os.path.abspath(p) for p in written}
    found: list[Path] = []
    for kind in ("probs", "mask"):
        path = out_dir / f"{stem}.{kind}.tif"
        if os.path.abspath(path) not in keep and path.is_file() and _written_by_geoseg(path):
            found.append(path)
    layer = re.compile(
        re.escape(stem)
        + r"\.(?:quicklook\.png|[^./\\]+\.(?:"
        + "|".join(map(re.escape, FORMATS.values()))
        + "))"
    )
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
            name, full = entry.name, os.path.abspath(entry.path)
            if layer.fullmatch(name) and entry.is_file() and full not in keep:
                found.append(Path(full))
    return sorted(found)


def _written_by_geoseg(path: Path) -> bool:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return "GEOSEG_MODEL" in src.tags()
    except rasterio.errors.RasterioError:
        return False


def remove_stale_outputs(
    out_dir: Path, stem: str, written: Sequence[Path], scene: str
) -> list[Path]:
    """Delete :func:`stale_outputs` of scene ``scene`` (outputs named ``stem``) once every
    output of this run (``written``) is in place, with a warning naming them; returns those
    removed. So a folder never holds a mask of one model beside the layers of another.
    (:func:`predict_scene` leaves this to its caller, which knows every file it writes.)"""
    stale = stale_outputs(out_dir, stem, written)
    removed = []
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("%s: cannot remove the earlier run's %s (%s)", redact(scene), path, exc)
            continue
        removed.append(path)
    if removed:
        log.warning(
            "%s: removed %d output(s) of an earlier run that this one did not write: %s",
            redact(scene),
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def output_tags(
    bundle: Bundle, scene: Scene, tta: str = "none", input_filter: str = "model"
) -> dict[str, str]:
    """Metadata stored in every output raster, read back by ``geoseg vectorize``; the
    test-time augmentation mode (``GEOSEG_TTA``) when there was one, the input filter a run
    chose in place of the model's (``GEOSEG_INPUT_FILTER``: ``off`` or metres), and the
    vectorizer settings chosen for the model (``GEOSEG_VECTORIZE``) when it has any."""
    tags = {
        "GEOSEG_CLASSES": json.dumps(bundle.spec.classes),
        "GEOSEG_MODEL": bundle.ident,
        "GEOSEG_MODEL_NAME": bundle.spec.name,
        "GEOSEG_MODEL_SHA256": bundle.sha256,
        "GEOSEG_SCENE": os.path.basename(redact(scene.path)),
    }
    if tta != "none":
        tags["GEOSEG_TTA"] = tta
    if input_filter != "model":
        tags["GEOSEG_INPUT_FILTER"] = input_filter
    if bundle.spec.vectorize is not None and bundle.spec.vectorize.settings():
        from geoseg.vectorize.source import VECTORIZE_TAG

        tags[VECTORIZE_TAG] = json.dumps(bundle.spec.vectorize.settings(), sort_keys=True)
    return tags


def predict_scene(
    scene: Scene,
    bundle: Bundle,
    out_dir: str | os.PathLike[str],
    options: PredictOptions,
    client: Client,
    *,
    factory: PredictorFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_tags: dict[str, str] | None = None,
    vectorize: VectorizeOptions | None = None,
    vector_client: Client | None = None,
) -> PredictOutputs:
    """Predict one scene into ``<stem>.probs.tif`` and ``<stem>.mask.tif`` COGs in ``out_dir``.

    ``extra_tags`` are stored in the outputs beside :func:`output_tags` (e.g. the scene's STAC
    item id).

    ``vectorize``: also write the vector layers, made from the probabilities when they are
    written, else from the class mask, while the scene is predicted (see
    :class:`geoseg.vectorize.run.StreamingVectorizer`); their tasks run on ``vector_client``
    (default: ``client``; give one of worker processes when ``client`` runs threads).

    ``factory`` overrides how workers build the predictor (default: the bundle on the options'
    device and precision, with their test-time augmentation; the outputs' ``GEOSEG_TTA`` tag
    names the options' mode whatever the factory). ``progress(done, total)`` is called after
    each chunk is written.
    """
    bundle = bundle.with_input_filter(options.input_filter)  # its halo with a stronger one
    spec = bundle.spec
    notes = check_compatible(scene, spec, resample=options.resample)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    grid = scene_grid(scene, spec, options)
    chunk = getattr(grid, "chunk", spec.chunk)
    resample = grid.plan if isinstance(grid, ResampledGrid) else None
    host = 0
    if resample is not None:
        first = grid.at(0, 0)
        scene_window = resample.scene_window(first.padded, first.core)
        host = resample_bytes(
            scene_window,
            first.padded,
            len(spec.bands),
            np.dtype(scene.dtype).itemsize,
            chunks=options.batch_size,
        )
    if not options.scheduler:
        check_working_set(
            spec,
            grid.at(0, 0).padded,
            options.batch_size,
            options.device,
            options.tta,
            host_bytes=host,
        )
    if not options.chunk and chunk != spec.chunk:
        log.info(
            "%s: %d px chunks for the %d px halo on %s (redundant compute %.2fx)",
            redact(scene.path),
            chunk,
            grid.halo,
            resolve_device(options.device),
            grid.redundancy,
        )
    if isinstance(grid, ResampledGrid):
        gx, gy = scene.ground_res
        log.info(
            "%s: read at the model's %.3g m (ground pixels %.3g x %.3g m; %.3g x %.3g model "
            "pixels per scene pixel): %d chunks, %.3g model pixels",
            redact(scene.path),
            spec.gsd_m,
            gx,
            gy,
            grid.plan.ratio_x,
            grid.plan.ratio_y,
            len(grid),
            float(grid.model_pixels),
        )
    device = resolve_device(options.device)
    if factory is None:
        factory = bundle_factory(bundle, options)
    out = Path(out_dir)
    check_writable(out)
    probs_path, mask_path = output_paths(scene, out)
    plan = ChunkPlan(scene, tuple(spec.bands), spec.normalization, len(spec.classes), resample)
    n_workers = max(1, sum(client.nthreads().values()))
    max_in_flight = options.max_in_flight or 2 * n_workers
    total, done, skipped = len(grid), 0, 0
    writer = RasterWriter(
        scene,
        {**output_tags(bundle, scene, options.tta, options.input_filter), **(extra_tags or {})},
        write_in_background(options, device),
        compress=options.compress,
    )
    want_probs, want_mask = "probs" in options.rasters, "mask" in options.rasters
    if want_probs:
        writer.add(
            "probs",
            probs_path,
            len(spec.classes),
            band_names=spec.classes,
            resampling="average",
            with_mask=scene.has_mask,  # else every pixel is valid: no mask to write or to read
        )
    if want_mask:
        writer.add("mask", mask_path, 1, nodata=MASK_NODATA, band_names=["class_id"])
    order = chunk_order(grid, scene, len(spec.bands))
    vec = None
    if vectorize is not None:
        from geoseg.vectorize.run import StreamingVectorizer

        chunks = list(order)
        order = iter(chunks)
        source = "probs" if want_probs else "mask"
        pred = _prediction(scene, bundle, probs_path if want_probs else mask_path, want_probs)
        vec = StreamingVectorizer(
            pred,
            source,
            out,
            vectorize,
            vector_client or client,
            [c.core for c in chunks],
            not options.scheduler,  # on this machine: the model and its feed come first
        )
    tasks = ((plan, batch, factory) for batch in chunk_batches(order, options.batch_size))
    name = f"geoseg-predict-{scene.stem}"
    try:
        with writer:
            for results in stream_tasks(client, predict_chunks, tasks, max_in_flight, name):
                for r in results:
                    if want_probs:
                        writer.write("probs", r.chunk.core, r.probs, r.valid)
                    if want_mask:
                        writer.write("mask", r.chunk.core, r.mask)
                    done += 1
                    skipped += r.skipped
                if vec is not None:
                    vec.poll(writer)
                if progress is not None:
                    progress(done, total)
            if vec is not None:
                left = vec.total - vec.finished
                log.info("%s: finishing %d vectorize chunks", redact(scene.path), left)
                vec.finish(writer, _every(VECTOR_PROGRESS_S, partial(_vector_progress, scene)))
        vectors = None if vec is None else vec.publish()
    except BaseException:
        if vec is not None:
            vec.abort()
        raise
    log.info("%s: %d chunks (%d all-nodata) → %s", redact(scene.path), total, skipped, out)
    return PredictOutputs(
        scene.path,
        probs_path if want_probs else None,
        mask_path if want_mask else None,
        total,
        skipped,
        grid.redundancy,
        notes,
        None if resample is None else (resample.ratio_x, resample.ratio_y),
        vectors,
    )


#: Seconds between two log lines on the vectorize chunks still running after a prediction.
VECTOR_PROGRESS_S = 10.0


def _vector_progress(scene: Scene, done: int, total: int) -> None:
    log.info("%s: %d/%d vectorize chunks", redact(scene.path), done, total)


def _every(seconds: float, report: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """``report(done, total)`` at most once every ``seconds``, and always for the last one."""
    last = time.monotonic()

    def call(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done >= total or now - last >= seconds:
            last = now
            report(done, total)

    return call


def _prediction(scene: Scene, bundle: Bundle, path: Path, probs: bool) -> Prediction:
    """The vectorizer's description of output ``path`` of :func:`predict_scene`, made before
    any chunk runs: a scene the vectorizer cannot georeference fails before the model's work."""
    from geoseg.vectorize.source import describe_prediction

    return describe_prediction(
        os.fspath(path),
        tuple(bundle.spec.classes),
        scene.width,
        scene.height,
        scene.crs,
        scene.transform,
        output_tags(bundle, scene),  # what the raster's tags will say
        os.fspath(path) if probs else None,
    )
