"""Building changes between two layers: added, removed, changed and unchanged buildings.

Buildings are matched one to one with :func:`geoseg.evaluate.match_polygons`, the matching
of ``geoseg evaluate buildings``, in one metric CRS (areas in ground square metres). Each
building of either layer ends in exactly one class:

- ``added``: in AFTER, matched to no building of BEFORE;
- ``removed``: in BEFORE, matched to no building of AFTER;
- ``changed``: matched, with an IoU below ``unchanged_iou`` (an extension, a rebuild);
- ``unchanged``: matched at an IoU of at least ``unchanged_iou``.

Only the area that both layers cover is compared: an optional footprint (a vector file, or a
raster's valid-data outline) cuts both layers before matching, so that a building outside a
new scene is never called removed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.errors import InputError, OutputError
from geoseg.evaluate import match_polygons, metric_pair
from geoseg.io.remote import gdal_path, is_remote

if TYPE_CHECKING:
    import geopandas as gpd
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "CHANGE_CLASSES",
    "ChangeOptions",
    "ChangeSet",
    "NoOverlapError",
    "compare_buildings",
    "compare_files",
    "read_area",
    "read_buildings",
    "valid_outline",
    "write_changes",
]

#: The classes of the ``change`` property, in the order reports list them.
CHANGE_CLASSES = ("added", "removed", "changed", "unchanged")

#: Raster file endings that ``--area`` reads as a valid-data outline, not as a vector layer.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


class NoOverlapError(InputError):
    """The layers (or a layer and the compared area) have no ground in common."""


@dataclass(frozen=True)
class ChangeOptions:
    """How buildings are matched and classed; IoUs are 0..1, areas ground square metres."""

    #: a BEFORE and an AFTER building with at least this IoU can be the same building
    match_iou: float = 0.3
    #: a matched pair with at least this IoU is ``unchanged``; below it, ``changed``
    unchanged_iou: float = 0.8
    #: buildings smaller than this (after cutting to the area) are left out, m²
    min_area_m2: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.match_iou <= 1 or not 0 < self.unchanged_iou <= 1:
            raise InputError(
                f"IoU thresholds must lie in (0, 1], got match {self.match_iou}, "
                f"unchanged {self.unchanged_iou}"
            )
        if self.unchanged_iou < self.match_iou:
            raise InputError(
                f"unchanged_iou ({self.unchanged_iou}) must be at least match_iou "
                f"({self.match_iou}): a pair below the match threshold is no pair"
            )


@dataclass
class ChangeSet:
    """Every building of both layers with its class, in a metric CRS.

    ``features`` has the columns ``change``, ``area_before_m2``, ``area_after_m2``, ``iou``
    (NaN where a side is missing), ``before_index`` and ``after_index`` (the row in each input
    layer, -1 where missing); removed buildings carry their BEFORE geometry, the others their
    AFTER geometry.
    """

    features: gpd.GeoDataFrame

    @property
    def counts(self) -> dict[str, int]:
        """Class → number of buildings, every class present, as plain ints."""
        values = self.features["change"].value_counts() if len(self.features) else {}
        return {c: int(values.get(c, 0)) for c in CHANGE_CLASSES}

    def selected(self, keep_unchanged: bool = False) -> gpd.GeoDataFrame:
        """The features to write: ``added``, ``removed`` and ``changed``, and ``unchanged``
        too when asked."""
        if keep_unchanged:
            return self.features
        return self.features[self.features["change"] != "unchanged"].reset_index(drop=True)


# --- reading -----------------------------------------------------------------------------------


def _exists(path: str) -> bool:
    return is_remote(path) or path.startswith("/vsi") or Path(path).exists()


def read_buildings(path: str | os.PathLike[str]) -> gpd.GeoDataFrame:
    """Polygons of a vector file or URL (any format GDAL reads), CRS as declared (may be None).

    Raises :class:`InputError` for a missing or unreadable file and for a layer of other
    geometries (lines, points)."""
    import pyogrio

    name = os.fspath(path)
    if not _exists(name):
        raise InputError(f"{name}: no such file")
    try:
        gdf = pyogrio.read_dataframe(gdal_path(name), columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as exc:
        raise InputError(f"{name}: cannot read vector layer ({exc})") from exc
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].reset_index(drop=True)
    kinds = set(gdf.geom_type)
    if kinds - {"Polygon", "MultiPolygon"}:
        raise InputError(f"{name}: building layers must hold polygons, found {sorted(kinds)}")
    gdf["geometry"] = gdf.geometry.make_valid()
    return gdf


def _settle_crs(layers: list[gpd.GeoDataFrame], names: list[str]) -> None:
    """Give a layer without a CRS the CRS of another whose extent its coordinates overlap
    (the same data saved without a .prj); raise when no such CRS exists."""
    from geoseg.train.labels import check_label_crs

    known = [g for g in layers if g.crs is not None]
    for gdf, name in zip(layers, names, strict=True):
        if gdf.crs is not None:
            check_label_crs(gdf, name)
            continue
        guess = None
        if len(gdf):
            x0, y0, x1, y1 = gdf.total_bounds
            for other in known:
                if not len(other):
                    continue
                a0, b0, a1, b1 = other.total_bounds
                if x0 <= a1 and a0 <= x1 and y0 <= b1 and b0 <= y1:
                    guess = other.crs
                    break
        elif known:
            guess = known[0].crs
        if guess is None:
            raise InputError(
                f"{name}: has no CRS, and none can be inferred (its coordinates overlap no "
                "layer that has one); save it with its CRS (a .prj beside a shapefile)"
            )
        gdf.set_crs(guess, inplace=True)


def valid_outline(path: str | os.PathLike[str], longest: int = 2048) -> gpd.GeoSeries:
    """The outline of a raster's valid pixels, one (multi)polygon in the raster's CRS.

    The valid-data mask is read at most ``longest`` pixels on its longer side (GDAL uses
    overviews), so the outline's precision is the raster's size / ``longest``; a raster
    without invalid pixels gives its exact bounds."""
    import geopandas as gpd
    import rasterio
    import shapely
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.features import shapes
    from shapely.geometry import box, shape

    from geoseg.io.raster import gdal_env

    name = os.fspath(path)
    try:
        with gdal_env(), rasterio.open(gdal_path(name)) as ds:
            if ds.crs is None:
                raise InputError(f"{name}: has no CRS, so its outline cannot be placed")
            scale = min(1.0, longest / max(ds.width, ds.height))
            rows, cols = max(1, round(ds.height * scale)), max(1, round(ds.width * scale))
            valid = ds.dataset_mask(out_shape=(rows, cols), resampling=Resampling.nearest) > 0
            crs, bounds = ds.crs, ds.bounds
            transform = ds.transform @ Affine.scale(ds.width / cols, ds.height / rows)
    except RasterioError as exc:
        raise InputError(f"{name}: cannot read raster ({exc})") from exc
    if valid.all():
        geom = box(*bounds)
    else:
        polys = [
            shape(g)
            for g, v in shapes(valid.astype(np.uint8), mask=valid, transform=transform)
            if v == 1
        ]
        geom = shapely.union_all(polys) if polys else shapely.Polygon()
    return gpd.GeoSeries([geom], crs=crs)


def read_area(path: str | os.PathLike[str]) -> gpd.GeoSeries:
    """A footprint to compare within: a raster's valid-data outline, or the union of a vector
    file's polygons; one geometry with its CRS."""
    import geopandas as gpd
    import shapely

    name = os.fspath(path)
    if name.lower().endswith(RASTER_SUFFIXES):
        return valid_outline(name)
    gdf = read_buildings(name)
    if gdf.crs is None:
        raise InputError(f"{name}: the area has no CRS; save it with one")
    return gpd.GeoSeries([shapely.union_all(np.asarray(gdf.geometry.values))], crs=gdf.crs)


# --- comparing ---------------------------------------------------------------------------------


def _polygonal(g: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (what cutting a polygon may leave beside lines)."""
    import shapely

    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _cut(gdf: gpd.GeoDataFrame, area: BaseGeometry | None, min_area_m2: float) -> gpd.GeoDataFrame:
    """``gdf`` (metric CRS) cut to ``area``, without empty pieces and those under the minimum;
    the index keeps each building's row in its source layer."""
    import shapely

    geoms = np.asarray(gdf.geometry.values, dtype=object)
    if area is not None and len(geoms):
        geoms = np.asarray([_polygonal(g) for g in shapely.intersection(geoms, area)], dtype=object)
    keep = ~shapely.is_empty(geoms) if len(geoms) else np.zeros(0, bool)
    if min_area_m2 > 0 and len(geoms):
        keep &= shapely.area(geoms) >= min_area_m2
    out = gdf.iloc[np.flatnonzero(keep)].copy()
    out["geometry"] = geoms[keep] if len(geoms) else []
    return out


def _check_overlap(
    before: gpd.GeoDataFrame, after: gpd.GeoDataFrame, area: BaseGeometry | None, names: list[str]
) -> None:
    from shapely.geometry import box

    extents = [box(*g.total_bounds) if len(g) else None for g in (before, after)]
    if area is not None:
        for ext, name in zip(extents, names, strict=True):
            if ext is not None and not ext.intersects(area):
                raise NoOverlapError(
                    f"{name}: its buildings lie wholly outside the compared area; nothing of "
                    "it can be compared (the wrong layer or area?)"
                )
    elif (
        extents[0] is not None and extents[1] is not None and not extents[0].intersects(extents[1])
    ):
        raise NoOverlapError(
            f"{names[0]} and {names[1]} do not overlap: their extents have no ground in "
            "common, so every building would be added or removed (the wrong layers, or a "
            "wrong CRS?)"
        )


def compare_buildings(
    before: gpd.GeoDataFrame,
    after: gpd.GeoDataFrame,
    area: gpd.GeoSeries | None = None,
    options: ChangeOptions | None = None,
    names: Sequence[str] = ("BEFORE", "AFTER"),
) -> ChangeSet:
    """Class every building of ``before`` and ``after`` (polygon layers with CRSs) within
    ``area`` (a footprint with its CRS; None: everywhere). ``names`` label errors."""
    import geopandas as gpd
    import shapely

    opts = options or ChangeOptions()
    b, a = metric_pair(before, after)
    crs = a.crs
    cut_area = None
    if area is not None:
        cut_area = shapely.union_all(np.asarray(area.to_crs(crs).make_valid().values))
        if cut_area.is_empty:
            raise NoOverlapError("the compared area is empty (a raster without valid pixels?)")
    _check_overlap(b, a, cut_area, list(names))
    b = _cut(b, cut_area, opts.min_area_m2)
    a = _cut(a, cut_area, opts.min_area_m2)
    bg = np.asarray(b.geometry.values, dtype=object)
    ag = np.asarray(a.geometry.values, dtype=object)
    matches = match_polygons(list(ag), list(bg), opts.match_iou)
    rows: list[dict[str, Any]] = []
    geoms: list[BaseGeometry] = []
    matched_a = {i for i, _, _ in matches}
    matched_b = {j for _, j, _ in matches}
    b_area = shapely.area(bg) if len(bg) else np.zeros(0)
    a_area = shapely.area(ag) if len(ag) else np.zeros(0)
    b_index, a_index = b.index.to_numpy(), a.index.to_numpy()
    for i, j, iou in sorted(matches):
        kind = "unchanged" if iou >= opts.unchanged_iou else "changed"
        rows.append(_row(kind, b_area[j], a_area[i], iou, b_index[j], a_index[i]))
        geoms.append(ag[i])
    for i in range(len(ag)):
        if i not in matched_a:
            rows.append(_row("added", np.nan, a_area[i], np.nan, -1, a_index[i]))
            geoms.append(ag[i])
    for j in range(len(bg)):
        if j not in matched_b:
            rows.append(_row("removed", b_area[j], np.nan, np.nan, b_index[j], -1))
            geoms.append(bg[j])
    columns = ["change", "area_before_m2", "area_after_m2", "iou", "before_index", "after_index"]
    frame = gpd.GeoDataFrame(rows, columns=columns, geometry=geoms, crs=crs)
    return ChangeSet(frame.astype({"before_index": "int64", "after_index": "int64"}))


def _row(
    kind: str, area_before: float, area_after: float, iou: float, bi: Any, ai: Any
) -> dict[str, Any]:
    return {
        "change": kind,
        "area_before_m2": float(area_before),
        "area_after_m2": float(area_after),
        "iou": float(iou),
        "before_index": int(bi),
        "after_index": int(ai),
    }


def compare_files(
    before_path: str | os.PathLike[str],
    after_path: str | os.PathLike[str],
    areas: Sequence[str | os.PathLike[str]] = (),
    options: ChangeOptions | None = None,
) -> ChangeSet:
    """:func:`compare_buildings` of two files, within the intersection of ``areas`` (vector
    files or rasters; none: everywhere)."""
    names = [os.fspath(before_path), os.fspath(after_path)]
    before, after = read_buildings(before_path), read_buildings(after_path)
    _settle_crs([before, after], names)
    area = None
    for p in areas:
        piece = read_area(p)
        area = piece if area is None else area.intersection(piece.to_crs(area.crs))
        if area.is_empty.all():
            raise NoOverlapError(f"{os.fspath(p)}: the areas given have no ground in common")
    return compare_buildings(before, after, area, options, names)


# --- writing -----------------------------------------------------------------------------------

_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}


def write_changes(
    changes: ChangeSet,
    out: str | os.PathLike[str],
    keep_unchanged: bool = False,
    precision: int = 7,
) -> Path:
    """Write the change layer to ``out`` (GeoJSON, GeoPackage or FlatGeobuf by its ending) in
    EPSG:4326, atomically: under a temporary name, then renamed. GeoJSON follows RFC 7946
    (counter-clockwise exterior rings), with ``precision`` coordinate decimals."""
    import pyogrio

    from geoseg.io.tempfiles import temporary_path

    out = Path(out)
    driver = _DRIVERS.get(out.suffix.lower())
    if driver is None:
        raise OutputError(f"{out}: unknown vector format; use .geojson, .gpkg or .fgb")
    frame = changes.selected(keep_unchanged).to_crs("EPSG:4326")
    frame = frame.drop(columns=["before_index", "after_index"])
    options: dict[str, Any] = {}
    if driver == "GeoJSON":
        options = {"RFC7946": "YES", "COORDINATE_PRECISION": precision}
    tmp = temporary_path(out, out.suffix.lower())  # OGR checks a GeoPackage's extension
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pyogrio.write_dataframe(
            frame, tmp, driver=driver, layer="changes", layer_options=options or None
        )
        os.replace(tmp, out)
    except (OSError, pyogrio.errors.DataSourceError) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the change layer ({exc})") from exc
    return out
