"""Write layers: streamed RFC 7946 GeoJSON, plus GeoPackage, FlatGeobuf and GeoParquet.

Every file is written under a temporary name beside its target and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely

from geoseg.errors import OutputError
from geoseg.vectorize.features import FeatureBatch
from geoseg.vectorize.geometry import Frames
from geoseg.vectorize.options import FORMATS

__all__ = ["LayerWriter"]


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        v = float(value)
        return None if math.isnan(v) else round(v, 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _temporary(final: Path) -> Path:
    """A hidden name beside ``final`` with the same extension (GDAL picks drivers by it)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial{final.suffix}")


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
            self._fh: IO[str] = open(self.tmp["geojson"], "w", encoding="utf-8")  # noqa: SIM115
            self._fh.write(
                '{"type":"FeatureCollection","name":' + json.dumps(layer) + ',"features":[\n'
            )
        except OSError as exc:
            raise OutputError(f"{self.paths['geojson']}: cannot write ({exc.strerror})") from exc

    def write(self, batch: FeatureBatch) -> None:
        """Append ``batch`` (geometries in the work CRS) to every output."""
        if len(batch) == 0:
            return
        g = self.frames.work_to_lonlat(batch.geoms)
        g = shapely.set_precision(g, 10.0**-self.precision)
        if self.geometry_type == "Polygon":
            g = shapely.orient_polygons(g, exterior_cw=False)
        texts = shapely.to_geojson(g)
        empty = shapely.is_empty(g)
        names = list(batch.columns)
        cols = [batch.columns[n].tolist() for n in names]
        lines = []
        for i, text in enumerate(texts.tolist()):
            if empty[i]:
                continue
            props = {n: _clean(col[i]) for n, col in zip(names, cols, strict=True)}
            lines.append(
                '{"type":"Feature","id":'
                + json.dumps(props.get("id"))
                + ',"geometry":'
                + text
                + ',"properties":'
                + json.dumps(props, allow_nan=False)
                + "}"
            )
        if not lines:
            return
        try:
            if not self._first:
                self._fh.write(",\n")
            self._fh.write(",\n".join(lines))
        except OSError as exc:
            raise OutputError(f"{self.paths['geojson']}: write failed ({exc.strerror})") from exc
        self._first = False
        self.count += len(lines)
        if len(self.paths) > 1:
            self._extra.append(batch.take(np.flatnonzero(~empty)))

    def close(self) -> dict[str, Path]:
        """Finish every output and rename it into place; returns format → path."""
        try:
            self._fh.write("\n]}\n")
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
