"""``geoseg run``: a pipeline over a batch of scenes, idempotent, resumable and failure-isolated.

For each scene the run's plan (:mod:`geoseg.pipeline.planning`) decides from the ledger
whether it must run (new, changed input, changed settings or model, missing outputs,
``--force``) or can be skipped. Scenes that run share one Dask client; at most
``compute.scenes_in_flight`` of them are in progress at once, each streaming a bounded number
of chunk tasks, so memory stays bounded on the client and on the workers. Every output file
is written under a temporary name and renamed, and the ledger row of a scene is closed only
after all its outputs exist, so a run killed at any moment is finished by the next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from geoseg.errors import GeosegError, InputError
from geoseg.io.remote import check_writable_prefix, join, redact_text, upload
from geoseg.models.bundle import Bundle, load_bundle
from geoseg.pipeline.config import LocalCompute, PipelineConfig
from geoseg.pipeline.identity import output_identity
from geoseg.pipeline.ledger import Ledger
from geoseg.pipeline.lock import PipelineLock
from geoseg.pipeline.planning import PlannedScene, ledger_key, ledger_path_for, plan_run

# Planning, skipping and listing import none of the engine (numpy, rasterio, torch, Dask):
# a run with nothing to do answers in well under a second. The engine is imported by the
# functions that run scenes.
if TYPE_CHECKING:
    from distributed import Client

    from geoseg.engine.options import PredictOptions
    from geoseg.io.raster import Scene
    from geoseg.pipeline.scene_changes import SceneChanges

__all__ = [
    "RunProgress",
    "RunSummary",
    "SceneResult",
    "lock_path",
    "predict_options",
    "run_pipeline",
]

log = logging.getLogger(__name__)


@dataclass
class SceneResult:
    """How one scene ended: ``done``, ``skipped``, ``failed`` or ``interrupted``."""

    path: Path | str
    stem: str
    status: str
    reason: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    #: when it ended (``time.time()``), for the batch's marginal cost per scene
    ended: float | None = None
    #: building changes against the pipeline's reference (added, removed, changed, unchanged)
    changes: dict[str, int] | None = None


@dataclass
class RunSummary:
    """The outcome of a run: its ledger id and one result per scene."""

    run_id: int
    pipeline: str
    results: list[SceneResult]
    seconds: float
    out_dir: Path | str | None = None
    started: float | None = None  # time.time() when the command began
    report: str | None = None  # the run's report.html, when written

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failures(self) -> list[SceneResult]:
        return [r for r in self.results if r.status == "failed"]

    def amortized(self) -> tuple[float, float] | None:
        """(seconds until the first scene was done, start-up included; seconds per scene after
        it, from the completions of the others): what a batch costs beyond its first scene.
        None with fewer than two scenes done."""
        ends = sorted(r.ended for r in self.results if r.status == "done" and r.ended)
        if len(ends) < 2 or self.started is None:
            return None
        return ends[0] - self.started, (ends[-1] - ends[0]) / (len(ends) - 1)

    @property
    def ok(self) -> bool:
        return not self.failures

    def change_counts(self) -> dict[str, int] | None:
        """Building changes summed over the scenes compared in this run; None when none was."""
        compared = [r.changes for r in self.results if r.changes is not None]
        if not compared:
            return None
        return {k: sum(c.get(k, 0) for c in compared) for k in compared[0]}


class RunProgress(Protocol):
    """Callbacks a front end implements to show a run's progress."""

    def batch_started(self, planned: list[PlannedScene]) -> None: ...

    def scene_started(self, scene: PlannedScene) -> None: ...

    def scene_chunks(self, scene: PlannedScene, done: int, total: int) -> None: ...

    def scene_finished(self, result: SceneResult) -> None: ...


def predict_options(config: PipelineConfig, scheduler: str | None = None) -> PredictOptions:
    """The engine's options for this pipeline; ``scheduler`` overrides ``compute``."""
    from geoseg.engine.options import PredictOptions

    p, c = config.predict, config.compute
    workers = c.workers if isinstance(c, LocalCompute) else 1
    return PredictOptions(
        rasters=needed_rasters(config),
        compress=config.outputs.compress,
        chunk=p.chunk,
        halo=p.halo,
        batch_size=p.batch_size,
        device=p.device,
        precision=p.precision,
        resample=p.resample,
        max_resample_ratio=p.max_resample_ratio,
        tta=p.tta,
        backend=p.backend,
        input_filter=p.input_filter,
        threads=c.threads,
        workers=workers,
        scheduler=scheduler_address(config, scheduler),
    )


def needed_rasters(config: PipelineConfig) -> tuple[str, ...]:
    """The rasters a scene's prediction writes: the class mask always (the quicklook and the
    ledger use it), the probabilities when kept or when the vectors are made from them (then
    they are removed after vectorizing). Not writing unwanted probabilities saves most of the
    output's cost: they are ``classes`` bands against the mask's one."""
    keep_probs = "probs" in config.outputs.rasters or config.outputs.vectors
    return ("probs", "mask") if keep_probs else ("mask",)


def scheduler_address(config: PipelineConfig, scheduler: str | None = None) -> str | None:
    """The Dask scheduler the run uses: ``scheduler``, else the pipeline's; None: local."""
    c = config.compute
    return scheduler or (None if isinstance(c, LocalCompute) else c.scheduler)


def lock_path(ledger_path: Path, name: str) -> Path:
    """The lock file of pipeline ``name``, kept beside the ledger."""
    return ledger_path.parent / "locks" / f"{name}.lock"


class _SceneJob:
    """Processes one scene: predict, vectorize, quicklook; records it in the ledger."""

    def __init__(
        self,
        config: PipelineConfig,
        bundle: Bundle,
        options: PredictOptions,
        client: Client,
        ledger: Ledger,
        run_id: int,
        progress: RunProgress | None,
        stop: threading.Event,
        vector_client: Client | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.options = options
        self.client = client
        self.vector_client = vector_client
        self.ledger = ledger
        self.run_id = run_id
        self.progress = progress
        self.stop = stop
        self.config_hash = config.config_hash(bundle.spec)
        self.changes: SceneChanges | None = None
        if config.changes is not None:
            from datetime import UTC, datetime

            from geoseg.pipeline.scene_changes import SceneChanges

            seen = datetime.now(UTC).isoformat(timespec="seconds")
            self.changes = SceneChanges(config, ledger, seen)

    def __call__(self, planned: PlannedScene) -> SceneResult:
        if self.stop.is_set():
            return SceneResult(
                planned.path,
                planned.stem,
                "interrupted",
                planned.reason,
                error="the run was stopped before this scene started",
            )
        row = self.ledger.start_scene(
            self.run_id,
            self.config.name,
            ledger_key(planned.path),
            planned.size,
            planned.mtime_ns,
            self.config_hash,
            self.bundle.sha256,
            planned.reason,
        )
        if self.progress is not None:
            self.progress.scene_started(planned)
        log.debug("%s: started (%s)", planned.stem, planned.reason)
        t0 = time.perf_counter()
        result = SceneResult(planned.path, planned.stem, "failed", planned.reason)
        try:
            files, info = self._process(planned)
            result.status, result.outputs = "done", files
            result.changes = info.get("changes")
            info["identity"] = {name: output_identity(p) for name, p in files.items()}
        except GeosegError as exc:
            result.error = redact_text(str(exc))
        except Exception as exc:  # isolate any failure to its scene
            log.debug("%s: unexpected error", ledger_key(planned.path), exc_info=True)
            result.error = redact_text(f"{type(exc).__name__}: {exc}")
        else:
            result.seconds = time.perf_counter() - t0
            result.ended = time.time()
            self._close(row, result, {"files": files, **info})
            return result
        result.seconds = time.perf_counter() - t0
        if self.config.remote_out is None:  # a remote run's local folder is gone already
            with contextlib.suppress(OSError):
                _remove_leftovers(self.config.out_dir / planned.stem)
        if self.stop.is_set():
            result.status = "interrupted"
            result.error = f"the run was stopped while this scene was in progress ({result.error})"
        log.warning("%s: %s: %s", planned.stem, result.status, result.error)
        self._close(row, result, {})
        return result

    def _close(self, row: int, result: SceneResult, outputs: dict[str, Any]) -> None:
        try:
            self.ledger.finish_scene(row, result.status, outputs, result.error)
        except GeosegError as exc:
            log.error("%s: could not record the result in the ledger: %s", result.stem, exc)
            if result.status == "done":
                result.status, result.error = "failed", str(exc)
        if self.progress is not None:
            self.progress.scene_finished(result)

    def _process(self, planned: PlannedScene) -> tuple[dict[str, str], dict[str, Any]]:
        from geoseg.io.raster import check_writable, open_scene

        broken = self.config.stac_errors().get(str(planned.path))
        if broken is not None:
            raise InputError(broken)
        scene = open_scene(planned.path)
        remote = self.config.remote_out
        if remote is None:
            out = self.config.out_dir / planned.stem
            check_writable(out)  # also sweeps what a killed run left
            return self._outputs(planned, scene, out)
        # made locally, then each file uploaded whole (an object appears complete or not at all)
        out = Path(tempfile.mkdtemp(prefix=f"geoseg-{planned.stem}-"))
        try:
            files, info = self._outputs(planned, scene, out)
            uploaded = {}
            for name, p in files.items():
                url = join(remote, planned.stem, Path(p).name)
                upload(Path(p), url)
                uploaded[name] = url
            return uploaded, info
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _outputs(
        self, planned: PlannedScene, scene: Scene, out: Path
    ) -> tuple[dict[str, str], dict[str, Any]]:
        from geoseg.engine.scene import predict_scene, remove_stale_outputs
        from geoseg.pipeline.quicklook import write_quicklook
        from geoseg.pipeline.report import scene_facts

        def chunks(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress.scene_chunks(planned, done, total)

        # read before predicting: with reference 'previous' the new layer replaces it
        reference = self.changes.reference(ledger_key(planned.path)) if self.changes else None
        item = self.config.stac_items().get(str(planned.path))
        pred = predict_scene(
            scene,
            self.bundle,
            out,
            self.options,
            self.client,
            progress=chunks,
            extra_tags={"GEOSEG_STAC_ITEM": item} if item else None,
            vectorize=(
                self.config.vectorize_options(self.bundle.spec)
                if self.config.outputs.vectors
                else None
            ),
            vector_client=self.vector_client,
        )
        files = {name: str(p) for name, p in pred.rasters().items()}
        info: dict[str, Any] = {"chunks": pred.chunks, "skipped_chunks": pred.skipped}
        if item:
            info["stac_item"] = item
        if pred.warnings:
            info["warnings"] = pred.warnings
        if pred.vectors is not None:
            files.update(
                (f"{layer}.{fmt}", str(path))
                for layer, by_format in pred.vectors.paths.items()
                for fmt, path in by_format.items()
            )
            info["counts"] = pred.vectors.counts
        lines = {
            name: str(lo.paths["geojson"])
            for name, lo in (pred.vectors.layers.items() if pred.vectors is not None else ())
            if lo.kind == "centerlines" and "geojson" in lo.paths
        }
        info.update(scene_facts(scene.path, lines))
        changed = None
        if self.changes is not None and reference is not None:
            layer = files.get(self.changes.layer_file)
            if layer is None:
                raise InputError(
                    f"changes.layer {self.changes.settings.layer!r}: this run wrote no such "
                    f"layer (it wrote {', '.join(sorted(files))})"
                )
            more, extra, changed = self.changes.compare(
                reference, scene.path, planned.stem, layer, out
            )
            files.update(more)
            info.update(extra)
        if self.config.outputs.quicklook:
            assert pred.mask is not None  # always written
            png = write_quicklook(
                scene.path,
                pred.mask,
                self.bundle.spec.classes,
                out / f"{planned.stem}.quicklook.png",
                self.config.outputs.quicklook_px,
                changes=changed,
            )
            files["quicklook"] = str(png)
        if "probs" in files and "probs" not in self.config.outputs.rasters:
            Path(files.pop("probs")).unlink(missing_ok=True)
        removed = []  # the folder is the scene's: its files named by either stem
        for stem in dict.fromkeys((scene.stem, planned.stem)):
            written = [Path(p) for p in files.values()]
            removed += remove_stale_outputs(out, stem, written, scene.path)
        if removed:
            info["removed_stale"] = [p.name for p in removed]
        return files, info


def _remove_leftovers(out: Path) -> None:
    """Delete temporary files a killed run left in a scene's folder (we hold the lock)."""
    for p in out.glob(".*.partial*"):
        if p.is_file():
            log.debug("removing leftover %s", p)
            p.unlink(missing_ok=True)


def run_pipeline(
    config: PipelineConfig,
    *,
    force: bool = False,
    scheduler: str | None = None,
    ledger_path: str | os.PathLike[str] | None = None,
    progress: RunProgress | None = None,
    stop: threading.Event | None = None,
    client_factory: Callable[[PredictOptions], Any] | None = None,
) -> RunSummary:
    """Run ``config`` once over its scenes; see the module docstring for the guarantees.

    Raises :class:`GeosegError` for problems of the whole run (bad model, no scenes, locked,
    unreadable ledger). Problems of single scenes are in the summary and the ledger instead.
    """
    started = time.time()  # the ledger's clock: the summary reports the recorded duration
    stop = stop or threading.Event()
    bundle = load_bundle(config.model_path)
    path = ledger_path_for(config, ledger_path)
    with Ledger(path) as ledger, PipelineLock(lock_path(path, config.name), config.name):
        stale = ledger.mark_interrupted(config.name)
        if stale:
            log.info("%s: closed %d earlier run(s) that were killed", config.name, stale)
        planned = plan_run(config, bundle, ledger, force)
        todo = [p for p in planned if p.action == "run"]
        options = None
        if todo:
            from geoseg.models.backends import architecture_proven, resolve_backend
            from geoseg.models.bundle import check_weights
            from geoseg.models.predictor import resolve_device

            options = predict_options(config, scheduler)
            # a bad bundle fails the run before any cluster starts (the scheduler's workers
            # may convert it elsewhere: then the whole check, here)
            known = not options.scheduler and architecture_proven(
                bundle, resolve_backend(options.backend, resolve_device(options.device))
            )
            check_weights(bundle, architecture_known=known)
            if config.remote_out is not None:
                check_writable_prefix(config.remote_out)
        run_id = ledger.start_run(
            config.name,
            config.source,
            config.config_hash(bundle.spec),
            bundle.sha256,
            bundle.ident,
            scheduler_address(config, scheduler) or "local",
            force,
            started=started,
        )
        log.info(
            "%s: run %d: %d scene(s), %d to process",
            config.name,
            run_id,
            len(planned),
            sum(p.action == "run" for p in planned),
        )
        if progress is not None:
            progress.batch_started(planned)
        results: list[SceneResult] = []
        try:
            for p in planned:
                if p.action == "skip":
                    ledger.record_skip(
                        run_id,
                        config.name,
                        ledger_key(p.path),
                        p.size,
                        p.mtime_ns,
                        config.config_hash(bundle.spec),
                        bundle.sha256,
                        p.reason,
                    )
                    res = SceneResult(p.path, p.stem, "skipped", p.reason)
                    results.append(res)
                    if progress is not None:
                        progress.scene_finished(res)
            if options is not None:
                results += _run_scenes(
                    config, bundle, options, ledger, run_id, todo, progress, stop, client_factory
                )
        except BaseException:
            stop.set()
            ledger.interrupt_run(run_id, "the run was interrupted")
            raise
        failed = sum(r.status in ("failed", "interrupted") for r in results)
        status = "interrupted" if stop.is_set() else ("failed" if failed else "done")
        ledger.finish_run(run_id, status, f"{failed} scene(s) failed" if failed else None)
        row = ledger.run(run_id)
        report = _write_run_report(config, ledger, run_id) if config.outputs.report else None
    order = {p.path: i for i, p in enumerate(planned)}
    results.sort(key=lambda r: order[r.path])
    seconds = row.finished - row.started if row is not None and row.finished else 0.0
    out_dir = config.remote_out or config.out_dir
    return RunSummary(run_id, config.name, results, seconds, out_dir, started, report)


def _write_run_report(config: PipelineConfig, ledger: Ledger, run_id: int) -> str | None:
    """``report.html`` in the output folder, for this run; a report that cannot be written is
    a warning, not a failure of the run (every scene's outputs are done)."""
    from geoseg.pipeline.report import write_report

    try:
        remote = config.remote_out
        if remote is None:
            return str(write_report(ledger, run_id, config.out_dir / "report.html"))
        with tempfile.TemporaryDirectory(prefix="geoseg-report-") as tmp:
            local = write_report(ledger, run_id, Path(tmp) / "report.html", link_base=remote)
            upload(local, join(remote, "report.html"))
        return join(remote, "report.html")
    except GeosegError as exc:
        log.warning("%s: run %d: no report: %s", config.name, run_id, exc)
        return None


def _run_scenes(
    config: PipelineConfig,
    bundle: Bundle,
    options: PredictOptions,
    ledger: Ledger,
    run_id: int,
    todo: list[PlannedScene],
    progress: RunProgress | None,
    stop: threading.Event,
    client_factory: Callable[[PredictOptions], Any] | None,
) -> list[SceneResult]:
    """Run scenes on one client, at most ``scenes_in_flight`` at a time."""
    if client_factory is None:
        from geoseg.engine.cluster import open_client

        client_factory = open_client
    from geoseg.vectorize.run import vector_cluster

    in_flight = config.compute.scenes_in_flight
    vectorize = config.vectorize_options(bundle.spec) if config.outputs.vectors else None
    with (
        vector_cluster(options, vectorize) as vector_client,
        client_factory(options) as client,
    ):
        job = _SceneJob(
            config, bundle, options, client, ledger, run_id, progress, stop, vector_client
        )
        pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="geoseg-scene")
        futures: list[Future[SceneResult]] = []
        try:
            futures = [pool.submit(job, p) for p in todo]
            return [f.result() for f in futures]
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise
        finally:
            pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
