"""``geoseg vectorize``: building polygons and road centerlines from predictions."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from geoseg.cli.options import Progress, out_dir_option
from geoseg.errors import ConfigError, describe_validation_error
from geoseg.io.remote import redact
from geoseg.vectorize.options import VectorizeOptions, VectorizeOutputs

log = logging.getLogger("geoseg.cli")


def _layers(spec: tuple[str, ...]) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for item in spec:
        cls, sep, kind = item.partition("=")
        if not sep or not cls:
            raise ConfigError(f"--layer takes CLASS=polygons|centerlines, got {item!r}")
        out[cls] = kind
    return out


def build_options(**kwargs: Any) -> VectorizeOptions:
    """Options from CLI values; ``None`` keeps the default. Raises :class:`ConfigError`."""
    values = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return VectorizeOptions(**values)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise ConfigError(f"invalid vectorize options: {problems}") from exc


def vectorize_options(f: Any) -> Any:
    """The options of ``geoseg vectorize`` (``geoseg predict --vectorize`` takes the defaults,
    or the settings chosen for its model)."""
    opts = [
        click.option(
            "--threshold",
            type=float,
            default=None,
            help="Probability threshold for a class (default 0.5).",
        ),
        click.option(
            "--building-threshold",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="Probability threshold of building polygons, in place of --threshold: higher "
            "parts neighbours that a yard or an alley barely separates (default: the model's "
            "chosen value, else --threshold; needs the probabilities).",
        ),
        click.option(
            "--min-area",
            "min_area_m2",
            type=float,
            default=None,
            help="Drop polygons smaller than this, in square metres (default: the model's "
            "chosen value, else 2).",
        ),
        click.option(
            "--simplify",
            "simplify_m",
            type=float,
            default=None,
            help="Simplification tolerance in metres (default 0.5; 0 = off).",
        ),
        click.option(
            "--regularize/--no-regularize",
            default=None,
            help="Straighten building outlines to right angles.",
        ),
        click.option(
            "--spur",
            "spur_m",
            type=float,
            default=None,
            help="Prune dangling road edges shorter than this, in metres (default 10).",
        ),
        click.option(
            "--bridge",
            "bridge_m",
            type=click.FloatRange(min=0),
            default=None,
            help="Join a dangling road end to the nearest road ahead of it (within 35°) up to "
            "this many metres away: roads broken by trees or shadows (default 0 = off).",
        ),
        click.option(
            "--split-touching/--merge-touching",
            "split_touching",
            default=None,
            help="With a model that has a building_contact class: its pixels separate touching "
            "buildings (default), or count as building (--merge-touching).",
        ),
        click.option(
            "--contact-threshold",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="Cut pixels whose building_contact probability reaches this out of buildings "
            "(default: the model's chosen value, else 0.4; lower splits more).",
        ),
        click.option(
            "--valley",
            "valley_m",
            type=click.FloatRange(min=0),
            default=None,
            help="Also cut building pixels whose probability dips below its surroundings "
            "within a square this many metres wide (shared walls the contact class misses): "
            "more touching buildings told apart (default: the model's chosen value, else 0 = "
            "off; needs the probabilities).",
        ),
        click.option(
            "--valley-depth",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="How deep (in probability) a dip must be for --valley to cut it (default: the "
            "model's chosen value, else 0.1).",
        ),
        click.option(
            "--road-polygons/--no-road-polygons",
            default=None,
            help="Also write road polygons (<stem>.road_areas).",
        ),
        click.option(
            "--layer",
            "layer_spec",
            multiple=True,
            metavar="CLASS=KIND",
            help="Map a class to polygons or centerlines (repeatable; replaces the "
            "default building=polygons, road=centerlines).",
        ),
        click.option(
            "--format",
            "formats",
            multiple=True,
            type=click.Choice(["geojson", "gpkg", "fgb", "parquet"]),
            help="Extra output formats (repeatable); GeoJSON is always written.",
        ),
        click.option(
            "--precision",
            type=click.IntRange(0, 15),
            default=None,
            help="GeoJSON coordinate decimals (default 7).",
        ),
        click.option(
            "--vector-chunk",
            "vchunk",
            type=click.IntRange(min=64),
            default=None,
            help="Vectorizing chunk size in pixels (default 2048).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def options_from_cli(
    layer_spec: tuple[str, ...],
    formats: tuple[str, ...],
    vchunk: int | None,
    workers: int | None,
    **kwargs: Any,
) -> VectorizeOptions:
    return build_options(
        layers=_layers(layer_spec),
        formats=list(formats) or None,
        chunk=vchunk,
        workers=workers,
        **kwargs,
    )


def report(outs: VectorizeOutputs, where: Callable[[Path], str] = str) -> None:
    """One line per layer: its feature count and files (``where`` names a file)."""
    for name, layer in outs.layers.items():
        paths = " ".join(where(Path(p)) for p in layer.paths.values())
        click.echo(f"{name}: {layer.count} features → {paths}")


@click.command()
@click.argument("predictions", nargs=-1, required=True)
@out_dir_option
@vectorize_options
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Local worker processes (default 2).",
)
def vectorize(
    predictions: tuple[str, ...],
    out_dir: Path,
    workers: int | None,
    layer_spec: tuple[str, ...],
    formats: tuple[str, ...],
    vchunk: int | None,
    **kwargs: Any,
) -> None:
    """Write <stem>.buildings.geojson and <stem>.roads.geojson for each PREDICTION
    (a <stem>.probs.tif or <stem>.mask.tif from geoseg predict; a file, or an http(s)://,
    s3://, gs:// or az:// URL) into --out."""
    options = options_from_cli(layer_spec, formats, vchunk, workers, **kwargs)
    for path in predictions:
        progress = Progress(f"vectorize {os.path.basename(redact(path))}", log.info)
        try:
            from geoseg.vectorize.run import vectorize_prediction  # scipy etc.: only when used

            outs = vectorize_prediction(path, out_dir, options, progress=progress)
        finally:
            progress.close()
        report(outs)
