"""Write layers: streamed RFC 7946 GeoJSON, plus GeoPackage, FlatGeobuf and GeoParquet.

Every file is written under a temporary name beside its target and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import shapely

from geoseg.errors import OutputError
from geoseg.io.tempfiles import temporary_path
from geoseg.vectorize.features import FeatureBatch
from geoseg.vectorize.geometry import Frames
from geoseg.vectorize.options import FORMATS

__all__ = ["LayerWriter", "render_geojson"]


#: Decimals of attribute values in GeoJSON.
ATTRIBUTE_DECIMALS = 4


def _column_values(col: np.ndarray) -> list[Any]:
    """A column as JSON-ready Python values: floats rounded, NaN as null, numpy ints as int."""
    if col.dtype.kind == "f":
        vals: list[Any] = np.round(col.astype(np.float64), ATTRIBUTE_DECIMALS).tolist()
        for i in np.flatnonzero(np.isnan(col)).tolist():
            vals[i] = None
        return vals
    out: list[Any] = col.tolist()
    return [None if isinstance(v, float) and math.isnan(v) else v for v in out]


def _geometries(g: np.ndarray, precision: int) -> list[Any] | None:
    """GeoJSON geometry objects of ``g``, coordinates rounded to ``precision`` decimals.

    All geometries must be non-empty polygons or all linestrings; returns None otherwise.
    Coordinates are rounded with numpy (no GEOS snapping); a geometry that rounding would make
    invalid is snapped to the grid with :func:`shapely.set_precision` instead, and written as
    what that gives (a polygon may become a multipolygon).
    """
    types = shapely.get_type_id(g)
    if len(g) == 0 or not ((types == 3).all() or (types == 1).all()):
        return None
    kind, coords, offsets = shapely.to_ragged_array(g)
    coords = np.round(coords, precision)
    rounded = shapely.from_ragged_array(kind, coords, offsets)
    bad = np.flatnonzero(~shapely.is_valid(rounded))
    xy: list[Any] = coords.tolist()
    parts: list[Any]
    if kind == shapely.GeometryType.LINESTRING:
        (ends,) = offsets
        parts = [xy[a:b] for a, b in zip(ends[:-1].tolist(), ends[1:].tolist(), strict=True)]
    else:
        rings, polys = offsets
        ring_xy = [xy[a:b] for a, b in zip(rings[:-1].tolist(), rings[1:].tolist(), strict=True)]
        parts = [ring_xy[a:b] for a, b in zip(polys[:-1].tolist(), polys[1:].tolist(), strict=True)]
    name = "LineString" if kind == shapely.GeometryType.LINESTRING else "Polygon"
    out: list[Any] = [{"type": name, "coordinates": c} for c in parts]
    if len(bad):
        snapped = snap_to_grid(g[bad], 10.0**-precision)
        if kind == shapely.GeometryType.POLYGON:
            snapped = shapely.orient_polygons(snapped, exterior_cw=False)
        for i, text in zip(bad.tolist(), shapely.to_geojson(snapped).tolist(), strict=True):
            if text is not None:  # else keep the rounded coordinates: nothing better exists
                out[i] = json.loads(text)
    return out


def snap_to_grid(g: np.ndarray, grid: float) -> np.ndarray:
    """:func:`shapely.set_precision` of each geometry; GEOS refuses some (a "side location
    conflict" after reprojection): those are made valid first (their polygonal part for
    polygons), and any it still refuses become None."""
    try:
        return shapely.set_precision(g, grid)
    except shapely.errors.GEOSException:
        pass
    out = np.empty(len(g), dtype=object)
    for i, geom in enumerate(g):
        try:
            out[i] = shapely.set_precision(geom, grid)
        except shapely.errors.GEOSException:
            fixed = shapely.make_valid(geom)
            if shapely.get_type_id(geom) in (3, 6):  # Polygon, MultiPolygon: keep the area
                parts = shapely.get_parts(fixed)
                fixed = shapely.multipolygons(parts[shapely.get_type_id(parts) == 3])
            try:
                out[i] = shapely.set_precision(fixed, grid)
            except shapely.errors.GEOSException:
                out[i] = None
    return out


def render_geojson(
    batch: FeatureBatch, frames: Frames, precision: int, geometry_type: str
) -> tuple[bytes, np.ndarray]:
    """GeoJSON Feature texts of ``batch`` (work CRS), UTF-8, one per line joined by ",\\n",
    and which features were kept.

    Geometries go to EPSG:4326 (lon, lat) with ``precision`` decimals; polygons get
    counter-clockwise exterior rings and clockwise holes (RFC 7946). Empty ones are dropped.
    """
    if len(batch) == 0:
        return b"", np.zeros(0, dtype=bool)
    g = frames.work_to_lonlat(batch.geoms)
    if geometry_type == "Polygon":
        g = shapely.orient_polygons(g, exterior_cw=False)
    keep = ~shapely.is_empty(g)
    g = g[keep]
    geometries = _geometries(g, precision)
    if geometries is None:
        snapped = snap_to_grid(g, 10.0**-precision)
        if geometry_type == "Polygon":
            snapped = shapely.orient_polygons(snapped, exterior_cw=False)
        geometries = [None if t is None else json.loads(t) for t in shapely.to_geojson(snapped)]
    names = list(batch.columns)
    cols = [_column_values(batch.columns[n][keep]) for n in names]
    ids = cols[names.index("id")] if "id" in names else [None] * len(geometries)
    rows = zip(*cols, strict=True) if names else ([] for _ in geometries)
    dumps = orjson.dumps  # a tenth of json's time, and the same text for these values
    lines = [
        dumps(
            {
                "type": "Feature",
                "id": fid,
                "geometry": geom,
                "properties": dict(zip(names, values, strict=True)),
            }
        )
        for fid, geom, values in zip(ids, geometries, rows, strict=True)
    ]
    return b",\n".join(lines), keep


def _temporary(final: Path) -> Path:
    """A hidden name beside ``final`` with the same extension (GDAL picks drivers by it)."""
    return temporary_path(final, final.suffix)


class LayerWriter:
    """Streams one layer's features to ``<stem>.<layer>.<ext>`` in each requested format.

    GeoJSON is EPSG:4326 (lon, lat) with ``precision`` decimals, counter-clockwise exterior
    rings and clockwise holes, and no ``crs`` member. The other formats keep the raster's CRS;
    their features are kept until :meth:`close`, so request them only when needed.
    """

    def __init__(
        self,
        out_dir: Path,
        stem: str,
        layer: str,
        frames: Frames,
        formats: tuple[str, ...],
        precision: int,
        geometry_type: str,
    ) -> None:
        self.frames = frames
        self.precision = precision
        self.geometry_type = geometry_type
        self.layer = layer
        self.paths = {f: out_dir / f"{stem}.{layer}.{FORMATS[f]}" for f in formats}
        self.tmp = {f: _temporary(p) for f, p in self.paths.items()}
        self.count = 0
        self._extra: list[FeatureBatch] = []
        self._first = True
        try:
            self._fh: IO[bytes] = open(self.tmp["geojson"], "wb")  # noqa: SIM115
            self._fh.write(
                b'{"type":"FeatureCollection","name":' + orjson.dumps(layer) + b',"features":[\n'
            )
        except OSError as exc:
            raise OutputError(f"{self.paths['geojson']}: cannot write ({exc.strerror})") from exc

    def write(self, batch: FeatureBatch) -> None:
        """Append ``batch`` (geometries in the work CRS) to every output."""
        text, keep = render_geojson(batch, self.frames, self.precision, self.geometry_type)
        self.write_rendered(text, int(keep.sum()), batch.take(np.flatnonzero(keep)))

    def write_rendered(self, text: bytes, count: int, batch: FeatureBatch) -> None:
        """Append ``count`` features already rendered by :func:`render_geojson`; ``batch``
        holds the same features for the other formats (unused when only GeoJSON is written).
        """
        if count == 0:
            return
        try:
            if not self._first:
                self._fh.write(b",\n")
            self._fh.write(text)
        except OSError as exc:
            raise OutputError(f"{self.paths['geojson']}: write failed ({exc.strerror})") from exc
        self._first = False
        self.count += count
        if self.needs_features:
            self._extra.append(batch)

    @property
    def needs_features(self) -> bool:
        """Whether formats other than GeoJSON need the features' geometries and columns."""
        return len(self.paths) > 1

    def close(self) -> dict[str, Path]:
        """Finish every output and rename it into place; returns format → path."""
        try:
            self._fh.write(b"\n]}\n")
            self._fh.close()
            for fmt in self.paths:
                if fmt != "geojson":
                    self._write_other(fmt)
            for fmt, final in self.paths.items():
                os.replace(self.tmp[fmt], final)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.paths['geojson']}: cannot finish layer ({exc})") from exc
        return dict(self.paths)

    def abort(self) -> None:
        """Remove every temporary file; final names stay untouched."""
        with contextlib.suppress(Exception):
            self._fh.close()
        for tmp in self.tmp.values():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _write_other(self, fmt: str) -> None:
        import geopandas as gpd
        import pandas as pd
        from pyproj import CRS

        batches = self._extra or [FeatureBatch.empty()]
        geoms = np.concatenate([self.frames.work_to_source(b.geoms) for b in batches])
        data: dict[str, Any] = {}
        for name in batches[0].columns or {}:
            data[name] = np.concatenate([b.columns[name] for b in batches])
        df = gpd.GeoDataFrame(
            pd.DataFrame(data),
            geometry=gpd.GeoSeries(geoms),
            crs=CRS.from_wkt(self.frames.source_wkt),
        )
        tmp = self.tmp[fmt]
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
            return
        import pyogrio

        driver = {"gpkg": "GPKG", "fgb": "FlatGeobuf"}[fmt]
        pyogrio.write_dataframe(
            df, tmp, driver=driver, layer=self.layer, geometry_type=self.geometry_type
        )
