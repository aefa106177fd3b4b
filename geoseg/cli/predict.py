"""``geoseg predict``: probabilities and class masks for scenes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geoseg.cli.options import Progress, compute_options, out_dir_option, resample_option
from geoseg.errors import ConfigError

if TYPE_CHECKING:
    from geoseg.raster import Scene

log = logging.getLogger("geoseg.cli")


@click.command()
@click.argument("scenes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-m",
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Model bundle directory (model.json + weights.safetensors).",
)
@out_dir_option
@compute_options
@resample_option
@click.option(
    "--vectorize",
    "also_vectorize",
    is_flag=True,
    help="Also write building polygons and road centerlines (see geoseg vectorize).",
)
def predict(
    scenes: tuple[Path, ...],
    model_path: Path,
    out_dir: Path,
    chunk: int | None,
    halo: int | None,
    batch_size: int,
    device: str,
    precision: str,
    threads: int | None,
    workers: int | None,
    scheduler: str | None,
    resample: bool = True,
    also_vectorize: bool = False,
) -> None:
    """Write <stem>.probs.tif and <stem>.mask.tif COGs for each SCENE into --out."""
    from geoseg.model import check_weights, load_bundle
    from geoseg.predict import PredictOptions, check_compatible, open_client, predict_scene, warm_up
    from geoseg.raster import check_writable, open_scene

    bundle = load_bundle(model_path)
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
    )
    opened = [open_scene(s) for s in scenes]
    _check_distinct_outputs(opened)
    for scene in opened:
        check_compatible(scene, bundle.spec, resample=resample)
    check_weights(bundle)  # after the cheap checks, before any cluster starts or allocation
    check_writable(out_dir)
    warm_up(bundle, options, opened[0])  # the model loads while the cluster starts
    with open_client(options) as client:
        for i, scene in enumerate(opened, start=1):
            progress = Progress(f"[{i}/{len(opened)}] {scene.stem}", log.info)
            try:
                result = predict_scene(scene, bundle, out_dir, options, client, progress=progress)
            finally:
                progress.close()
            read_at = ""
            if result.resampled is not None:
                read_at = f", read at the model's {bundle.spec.gsd_m:g} m"
            click.echo(
                f"{scene.stem}: {result.probs} {result.mask} "
                f"({result.chunks} chunks, {result.skipped} all-nodata{read_at})"
            )
            if also_vectorize:
                from geoseg.cli.vectorize import report
                from geoseg.vectorize import vectorize_prediction

                report(vectorize_prediction(result.probs, out_dir, client=client))


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
