"""``geoseg predict``: probabilities and class masks for scenes."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geoseg.cli.options import (
    Progress,
    backend_option,
    compute_options,
    input_filter_option,
    resample_option,
    tta_option,
)
from geoseg.errors import ConfigError
from geoseg.io.remote import check_writable_prefix, is_remote, join, redact, upload

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.engine.options import PredictOptions
    from geoseg.io.raster import Scene
    from geoseg.models.bundle import Bundle
    from geoseg.vectorize.options import VectorizeOptions

log = logging.getLogger("geoseg.cli")


@click.command()
@click.argument("scenes", nargs=-1, required=True)
@click.option(
    "-m",
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Model bundle directory (model.json + weights.safetensors).",
)
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    help="Output directory, or an object-store prefix (s3://bucket/prefix/, gs://, az://): "
    "outputs are made in a local temporary folder, then uploaded whole.",
)
@compute_options
@resample_option
@click.option(
    "--max-resample-ratio",
    type=click.FloatRange(min=1.0),
    default=8.0,
    show_default=True,
    help="Refuse scenes whose ground resolution is more than this many times finer or coarser "
    "than the model's GSD (with --resample): their time and memory grow with the ratio.",
)
@tta_option
@input_filter_option
@backend_option
@click.option(
    "--vectorize",
    "also_vectorize",
    is_flag=True,
    help="Also write building polygons and road centerlines (the same as adding vectors to "
    "--outputs).",
)
@click.option(
    "--outputs",
    "outputs",
    default="probs,mask",
    show_default=True,
    metavar="LIST",
    help="What to write, comma-separated: probs (class probabilities, uint8, one band per "
    "class: most of the bytes), mask (class ids), vectors (building polygons, road "
    "centerlines), quicklook (PNG). Vectors come from probs when they are written, else from "
    "the mask (then without confidence attributes).",
)
@click.option(
    "--compress",
    type=click.Choice(["deflate", "zstd", "lzw"]),
    default="deflate",
    show_default=True,
    help="The rasters' COG codec. deflate: read everywhere; zstd: smaller and faster to "
    "write (GDAL >= 2.3, QGIS, rasterio).",
)
def predict(
    scenes: tuple[str, ...],
    model_path: Path,
    out: str,
    chunk: int | None,
    halo: int | None,
    batch_size: int,
    device: str,
    precision: str,
    threads: int | None,
    workers: int | None,
    scheduler: str | None,
    resample: bool = True,
    max_resample_ratio: float = 8.0,
    tta: str = "none",
    input_filter: str = "model",
    backend: str = "auto",
    also_vectorize: bool = False,
    outputs: str = "probs,mask",
    compress: str = "deflate",
) -> None:
    """Write <stem>.probs.tif and <stem>.mask.tif COGs (and, with --outputs, vectors and a
    quicklook) for each SCENE into --out. A SCENE is a file, an http(s)://, s3://, gs:// or
    az:// URL, or a GDAL /vsi path: remote scenes are read window by window, never copied."""
    keep = parse_outputs(outputs) | ({"vectors"} if also_vectorize else set())
    rasters = needed_rasters(keep)
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.plan import check_compatible, check_resolution
    from geoseg.engine.scene import warm_up
    from geoseg.io.raster import check_writable, open_scene
    from geoseg.models.backends import architecture_proven, resolve_backend
    from geoseg.models.bundle import check_weights, load_bundle
    from geoseg.models.predictor import resolve_device
    from geoseg.vectorize.options import VectorizeOptions
    from geoseg.vectorize.run import vector_cluster

    # a filter the model cannot take fails here, before any scene is read
    bundle = load_bundle(model_path).with_input_filter(input_filter)
    options = PredictOptions(
        chunk=chunk,
        halo=halo,
        batch_size=batch_size,
        device=device,
        precision=precision,
        threads=threads,
        workers=workers,
        scheduler=scheduler,
        resample=resample,
        max_resample_ratio=max_resample_ratio,
        rasters=rasters,
        compress=compress,
        tta=tta,
        backend=backend,
        input_filter=input_filter,
    )
    # not installed: say so before any work
    resolved = resolve_backend(backend, resolve_device(device))
    opened = [open_scene(s) for s in scenes]
    _check_distinct_outputs(opened)
    for scene in opened:
        check_compatible(scene, bundle.spec, resample=resample)
        check_resolution(scene, bundle.spec, options)
    # after the cheap checks, before any cluster starts or allocation
    check_weights(bundle, architecture_known=architecture_proven(bundle, resolved))
    remote_out = out if is_remote(out) else None
    if remote_out is not None:
        check_writable_prefix(remote_out)
        out_dir = Path(tempfile.mkdtemp(prefix="geoseg-out-"))
    else:
        out_dir = Path(out)
        check_writable(out_dir)
    try:
        vectorize = VectorizeOptions() if "vectors" in keep else None
        with vector_cluster(options, vectorize) as vector_client:
            warm_up(bundle, options, opened[0])  # the model loads while the cluster starts
            _run(opened, bundle, options, keep, out_dir, remote_out, vectorize, vector_client)
    finally:
        if remote_out is not None:
            shutil.rmtree(out_dir, ignore_errors=True)


def _run(
    opened: list[Scene],
    bundle: Bundle,
    options: PredictOptions,
    keep: set[str],
    out_dir: Path,
    remote_out: str | None,
    vectorize: VectorizeOptions | None,
    vector_client: Client | None,
) -> None:
    """Predict every scene on one client; upload each scene's files when ``remote_out``.
    Vectors are made while each scene is predicted, on ``vector_client`` when given."""
    from geoseg.engine.cluster import open_client
    from geoseg.engine.scene import predict_scene, remove_stale_outputs

    def shown(p: Path) -> str:
        """Where a file ends up: its URL under ``remote_out`` (uploaded, and the local copy
        deleted), else its path."""
        return join(redact(remote_out), p.name) if remote_out is not None else str(p)

    with open_client(options) as client:
        for i, scene in enumerate(opened, start=1):
            progress = Progress(f"[{i}/{len(opened)}] {scene.stem}", log.info)
            try:
                result = predict_scene(
                    scene,
                    bundle,
                    out_dir,
                    options,
                    client,
                    progress=progress,
                    vectorize=vectorize,
                    vector_client=vector_client,
                )
            finally:
                progress.close()
            read_at = ""
            if result.resampled is not None:
                read_at = f", read at the model's {bundle.spec.gsd_m:g} m"
            written = result.rasters()
            kept = [p for name, p in written.items() if name in keep]
            click.echo(
                f"{scene.stem}: {' '.join(map(shown, kept))} "
                f"({result.chunks} chunks, {result.skipped} all-nodata{read_at})"
            )
            if result.vectors is not None:
                from geoseg.cli.vectorize import report

                report(result.vectors, shown)
            if "quicklook" in keep:
                from geoseg.pipeline.quicklook import write_quicklook

                assert result.mask is not None  # written for the quicklook
                png = out_dir / f"{scene.stem}.quicklook.png"
                png = write_quicklook(scene.path, result.mask, bundle.spec.classes, png, 1024)
                click.echo(f"{scene.stem}: {shown(png)}")
            final = [p for name, p in written.items() if name in keep]
            for name, p in written.items():
                if name not in keep:  # written only to make the vectors or the quicklook
                    p.unlink(missing_ok=True)
            if remote_out is None:  # a remote run's local folder is new: nothing earlier
                if result.vectors is not None:
                    final += [p for f in result.vectors.paths.values() for p in f.values()]
                if "quicklook" in keep:
                    final.append(png)
                remove_stale_outputs(out_dir, scene.stem, final, scene.path)
            if remote_out is not None:
                files = sorted(out_dir.glob(f"{scene.stem}.*"))
                for f in files:
                    upload(f, join(remote_out, f.name))
                    f.unlink()
                click.echo(f"{scene.stem}: uploaded {len(files)} file(s) to {redact(remote_out)}")


OUTPUTS = ("probs", "mask", "vectors", "quicklook")


def parse_outputs(value: str) -> set[str]:
    """The set named by ``--outputs`` (comma-separated names among :data:`OUTPUTS`)."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(names - set(OUTPUTS))
    if unknown or not names:
        raise ConfigError(
            f"--outputs takes one or more of {', '.join(OUTPUTS)}, got {value!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names


def needed_rasters(keep: set[str]) -> tuple[str, ...]:
    """The rasters to write for the outputs ``keep``: those asked for, the mask for a
    quicklook, and for vectors the probabilities if asked for, else the mask."""
    rasters = [r for r in ("probs", "mask") if r in keep]
    if "quicklook" in keep or ("vectors" in keep and not rasters):
        rasters.append("mask")
    return tuple(dict.fromkeys(rasters))


def _check_distinct_outputs(scenes: list[Scene]) -> None:
    """Refuse two scenes that would write the same output files (same stem), before any work:
    the second would silently replace the first's results."""
    seen: dict[str, str] = {}
    for scene in scenes:
        other = seen.get(scene.stem)
        if other is not None and os.path.realpath(other) != os.path.realpath(scene.path):
            raise ConfigError(
                f"scenes {other} and {scene.path} would both write {scene.stem}.probs.tif and "
                f"{scene.stem}.mask.tif in --out; rename one or predict them into different "
                "directories"
            )
        seen[scene.stem] = scene.path
