"""Building polygons: polygonize each chunk core, finish whole pieces, hand seam pieces on.

A chunk's class mask is labelled into 4-connected components (the connectivity
``rasterio.features.shapes`` uses), and each component becomes one polygon with holes, in
global pixel coordinates, traced by :mod:`geoseg.vectorize.trace`. Components that touch an
inner seam of the chunk are returned raw, with their labels along the seam, so
:mod:`geoseg.vectorize.seams` can join them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from rasterio.windows import Window
from scipy import ndimage

from geoseg.vectorize.export import render_geojson
from geoseg.vectorize.features import FeatureBatch, stable_ids
from geoseg.vectorize.geometry import Frames
from geoseg.vectorize.regularize import regularize_polygons
from geoseg.vectorize.source import Prediction, read_class, read_valleys
from geoseg.vectorize.trace import trace_polygons

__all__ = ["ChunkPolygons", "Pieces", "PolygonJob", "finish_polygons", "polygonize_chunk"]

SIDES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class PolygonJob:
    """What every polygon task of one layer shares (picklable)."""

    pred: Prediction
    frames: Frames
    cls: str
    layer: str
    threshold: float
    min_area_m2: float
    simplify_m: float
    regularize: bool
    precision: int = 7
    keep_features: bool = False
    #: further classes whose pixels count as this class (e.g. building_contact, merged)
    also: tuple[str, ...] = ()
    #: (class, probability): pixels where that class is at least that likely are cut out
    cut: tuple[str, float] | None = None
    #: (square side in pixels, odd; depth): pixels in valleys of the class's probability that
    #: deep are cut out (:func:`geoseg.vectorize.source.read_valleys`)
    valley: tuple[int, float] | None = None


@dataclass
class Pieces:
    """Raw components: pixel-space polygons and per-component pixel statistics."""

    geoms: np.ndarray
    key: np.ndarray
    count: np.ndarray
    csum: np.ndarray
    cmax: np.ndarray

    def __len__(self) -> int:
        return len(self.geoms)

    def take(self, idx: np.ndarray) -> Pieces:
        return Pieces(
            self.geoms[idx], self.key[idx], self.count[idx], self.csum[idx], self.cmax[idx]
        )


@dataclass
class ChunkPolygons:
    """One chunk's result: finished features, and seam pieces with their seam labels.

    The finished features come as UTF-8 GeoJSON text (``count`` features); ``done`` holds them as
    geometries too when the job keeps features for other formats, else it is empty.
    """

    index: tuple[int, int]
    done: FeatureBatch
    seam: Pieces
    seam_labels: np.ndarray
    edges: dict[str, np.ndarray] = field(default_factory=dict)
    text: bytes = b""
    count: int = 0


def _component_stats(
    labels: np.ndarray, fg: np.ndarray, conf: np.ndarray | None, n: int, origin: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label 1..n: first pixel (global row, col), pixel count, confidence sum and max.

    ``fg`` is ``labels > 0`` (finding its pixels in a bool array is 4x less memory to scan).
    """
    flat = labels.ravel()
    idx = np.flatnonzero(fg)
    lab = flat[idx].astype(np.intp)  # matching dtypes keep ufunc.at on its fast path
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.int64)
    first = np.full(n + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, lab, idx)
    row, col = np.divmod(first[1:], labels.shape[1])
    key = np.column_stack((row + origin[0], col + origin[1])).astype(np.int64)
    if conf is None:
        csum = np.full(n, np.nan)
        cmax = np.full(n, -1, dtype=np.int32)
    else:
        c = conf.ravel()[idx]
        csum = np.bincount(lab, weights=c, minlength=n + 1)[1:]
        mx = np.zeros(n + 1, dtype=c.dtype)
        np.maximum.at(mx, lab, c)
        cmax = mx[1:].astype(np.int32)
    return key, count, csum, cmax


def polygonize_chunk(
    job: PolygonJob, index: tuple[int, int], core: Window, seams: tuple[bool, bool, bool, bool]
) -> ChunkPolygons:
    """Polygonize one chunk core; ``seams``: which sides (top, bottom, left, right) are seams."""
    cw = read_class(job.pred, job.cls, core, job.threshold, job.also, job.cut)
    if job.valley is not None:
        cw.fg &= ~read_valleys(job.pred, job.cls, core, *job.valley)
    origin = (int(core.row_off), int(core.col_off))
    labels, n = ndimage.label(cw.fg)
    if n == 0:
        return ChunkPolygons(index, FeatureBatch.empty(), _no_pieces(), np.empty(0, np.int64))
    labels = labels.astype(np.int32, copy=False)
    key, count, csum, cmax = _component_stats(labels, cw.fg, cw.conf, n, origin)
    geoms = trace_polygons(labels, n, origin)
    pieces = Pieces(geoms, key, count, csum, cmax)
    edges: dict[str, np.ndarray] = {}
    views = {"top": labels[0], "bottom": labels[-1], "left": labels[:, 0], "right": labels[:, -1]}
    for side, is_seam in zip(SIDES, seams, strict=True):
        if is_seam:
            edges[side] = views[side].copy()
    touching = np.zeros(n + 1, dtype=bool)
    for e in edges.values():
        touching[e] = True
    touching = touching[1:]
    seam_idx = np.flatnonzero(touching)
    done = finish_polygons(job, pieces.take(np.flatnonzero(~touching)), traced=True)
    text, kept = render_geojson(done, job.frames, job.precision, "Polygon")
    done = done.take(np.flatnonzero(kept)) if job.keep_features else FeatureBatch.empty()
    return ChunkPolygons(
        index, done, pieces.take(seam_idx), seam_idx + 1, edges, text, int(kept.sum())
    )


def _no_pieces() -> Pieces:
    e = np.empty(0, dtype=np.int64)
    return Pieces(np.empty(0, dtype=object), np.empty((0, 2), np.int64), e, e.astype(float), e)


def _polygonal(g: shapely.Geometry) -> shapely.Geometry:
    """The largest polygon of a repaired geometry (outputs are single polygons)."""
    if isinstance(g, shapely.Polygon):
        return g
    polys = [p for p in shapely.get_parts(g) if isinstance(p, shapely.Polygon)]
    if not polys:
        return shapely.Polygon()
    return max(polys, key=lambda p: p.area)


def finish_polygons(job: PolygonJob, pieces: Pieces, traced: bool = False) -> FeatureBatch:
    """Pixel-space components → filtered, simplified polygons in the work CRS with attributes.

    ``traced``: the pieces come from :func:`trace_polygons` or
    :func:`geoseg.vectorize.trace.join_pixel_polygons`, which keep only the corners of each
    ring; other pixel polygons may have collinear vertices.
    """
    if len(pieces) == 0:
        return FeatureBatch.empty()
    # Canonical form first (no collinear vertices, fixed ring start), so that simplification
    # gives the same result however the component was assembled.
    g = pieces.geoms if traced else shapely.simplify(pieces.geoms, 0.0)
    g = shapely.normalize(g)
    g = job.frames.pixels_to_work(g)
    keep = shapely.area(g) >= job.min_area_m2
    keep &= ~shapely.is_empty(g)
    g, pieces = g[keep], pieces.take(np.flatnonzero(keep))
    if len(g) == 0:
        return FeatureBatch.empty()
    if job.simplify_m > 0:
        g = shapely.simplify(g, job.simplify_m, preserve_topology=True)
    if job.regularize:
        cell = max(job.simplify_m, 2.0 * max(job.frames.pixel_m))
        g = regularize_polygons(g, cell)
    bad = ~shapely.is_valid(g) | (shapely.get_type_id(g) != 3)
    if bad.any():
        g[bad] = [_polygonal(x) for x in shapely.make_valid(g[bad])]
    ok = ~shapely.is_empty(g)
    g, pieces = g[ok], pieces.take(np.flatnonzero(ok))
    n = len(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        cmean = pieces.csum / pieces.count / 255.0
    cmax = np.where(pieces.cmax >= 0, pieces.cmax / 255.0, np.nan)
    columns = {
        "id": stable_ids(job.pred.scene, job.layer, pieces.key),
        "class": np.full(n, job.cls, dtype=object),
        "area_m2": shapely.area(g),
        "perimeter_m": shapely.length(g),
        "confidence_mean": cmean,
        "confidence_max": cmax,
        "scene": np.full(n, job.pred.scene, dtype=object),
        "model": np.full(n, job.pred.model, dtype=object),
    }
    return FeatureBatch(g, pieces.key, columns).sorted()
