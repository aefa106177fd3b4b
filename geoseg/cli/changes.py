"""``geoseg changes``: what is new, gone or altered between two building layers."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("before", type=str)
@click.argument("after", type=str)
@click.option(
    "--out",
    "-o",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="The change layer to write: .geojson (EPSG:4326, RFC 7946), .gpkg or .fgb.",
)
@click.option(
    "--area",
    "areas",
    multiple=True,
    metavar="FILE",
    help="Compare only within this footprint: a vector file's polygons, or a raster's "
    "valid-data outline (.tif, .vrt, …). Repeat it to compare within the ground all of them "
    "cover (e.g. both scenes). Default: everywhere.",
)
@click.option(
    "--match-iou",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.3,
    show_default=True,
    help="A BEFORE and an AFTER building with at least this IoU can be the same building "
    "(matched one to one, best IoU first, as `geoseg evaluate buildings` does).",
)
@click.option(
    "--unchanged-iou",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.8,
    show_default=True,
    help="A matched pair with at least this IoU is unchanged; below it, changed.",
)
@click.option(
    "--min-area",
    "min_area_m2",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Leave out buildings smaller than this (after cutting to the area), ground m².",
)
@click.option("--all", "keep_unchanged", is_flag=True, help="Also write the unchanged buildings.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the counts as JSON: {added, removed, changed, unchanged}.",
)
def changes(
    before: str,
    after: str,
    out: Path,
    areas: tuple[str, ...],
    match_iou: float,
    unchanged_iou: float,
    min_area_m2: float,
    keep_unchanged: bool,
    json_path: Path | None,
) -> None:
    """Compare the building layers BEFORE and AFTER (any format and CRS): write every added,
    removed and changed building to --out, with its class in the `change` property, its area
    before and after (m²) and the IoU of its match."""
    from geoseg.changes import ChangeOptions, compare_files, write_changes
    from geoseg.cli.evaluate import write_report
    from geoseg.evaluate import format_table

    options = ChangeOptions(match_iou, unchanged_iou, min_area_m2)
    result = compare_files(before, after, areas, options)
    write_changes(result, out, keep_unchanged)
    counts = result.counts
    click.echo(format_table([(k, str(v)) for k, v in counts.items()]))
    if json_path is not None:
        write_report(json_path, dict(counts))
