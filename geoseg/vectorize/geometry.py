"""Coordinate frames: pixels → the raster's CRS → a local metric CRS → EPSG:4326.

Areas, lengths and tolerances are computed in the metric ("work") CRS: the raster's own CRS
when it is projected in metres, else a transverse Mercator centred on the raster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer

from geoseg.vectorize.source import Prediction

__all__ = ["Frames", "frames_for"]


@functools.lru_cache(maxsize=16)
def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)


@dataclass(frozen=True)
class Frames:
    """Picklable description of the coordinate frames of one prediction raster."""

    transform: Affine
    source_wkt: str
    work_wkt: str
    pixel_m: tuple[float, float]

    @property
    def work_is_source(self) -> bool:
        return self.source_wkt == self.work_wkt

    def pixels_to_work(self, geoms: np.ndarray) -> np.ndarray:
        """Geometries in pixel (col, row) coordinates → work CRS (metres)."""
        return self.source_to_work(self.pixels_to_source(geoms))

    def pixels_to_source(self, geoms: np.ndarray) -> np.ndarray:
        t = self.transform

        def affine(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack((t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f))

        return shapely.transform(geoms, affine)

    def source_to_work(self, geoms: np.ndarray) -> np.ndarray:
        if self.work_is_source:
            return geoms
        return _reproject(geoms, self.source_wkt, self.work_wkt)

    def work_to_source(self, geoms: np.ndarray) -> np.ndarray:
        if self.work_is_source:
            return geoms
        return _reproject(geoms, self.work_wkt, self.source_wkt)

    def work_to_lonlat(self, geoms: np.ndarray) -> np.ndarray:
        """Work CRS → EPSG:4326 in longitude/latitude order (RFC 7946)."""
        return _reproject(geoms, self.work_wkt, "EPSG:4326")


def _reproject(geoms: np.ndarray, src: str, dst: str) -> np.ndarray:
    tr = _transformer(src, dst)

    def fn(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tr.transform(x, y)  # type: ignore[no-any-return]

    return shapely.transform(geoms, fn, interleaved=False)


def frames_for(pred: Prediction) -> Frames:
    """Frames of ``pred``: its own CRS as the work CRS when metric, else a local tmerc."""
    if pred.metric:
        work = pred.crs_wkt
    else:
        cx, cy = pred.centre
        lon, lat = _transformer(pred.crs_wkt, "EPSG:4326").transform(cx, cy)
        work = CRS.from_proj4(
            f"+proj=tmerc +lat_0={lat:.8f} +lon_0={lon:.8f} +k=1 +x_0=0 +y_0=0 "
            "+datum=WGS84 +units=m +no_defs"
        ).to_wkt()
    t = pred.transform
    frames = Frames(t, pred.crs_wkt, work, (1.0, 1.0))
    # Pixel size in metres at the raster's centre, from a one-pixel step in each direction.
    c, r = pred.width / 2, pred.height / 2
    pts = shapely.points([(c, r), (c + 1, r), (c, r + 1)])
    w = shapely.get_coordinates(frames.pixels_to_work(np.asarray(pts)))
    px = float(np.hypot(*(w[1] - w[0])))
    py = float(np.hypot(*(w[2] - w[0])))
    return Frames(t, pred.crs_wkt, work, (px, py))
