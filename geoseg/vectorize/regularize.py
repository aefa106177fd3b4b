"""Straighten building outlines: dominant orientation, right angles only."""

from __future__ import annotations

import math

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize, shapes

__all__ = ["dominant_angle", "regularize_polygon", "regularize_polygons"]


def dominant_angle(poly: shapely.Polygon) -> float:
    """Dominant edge direction of ``poly`` modulo 90°, weighted by edge length (radians)."""
    xy = shapely.get_coordinates(poly.exterior)
    d = np.diff(xy, axis=0)
    lengths = np.hypot(d[:, 0], d[:, 1])
    if lengths.sum() == 0:
        return 0.0
    # Angles times 4 wrap every 90°, so parallel and perpendicular edges vote together.
    theta = np.arctan2(d[:, 1], d[:, 0]) * 4.0
    angle = math.atan2(
        float((lengths * np.sin(theta)).sum()), float((lengths * np.cos(theta)).sum())
    )
    return angle / 4.0


def regularize_polygon(poly: shapely.Polygon, cell: float) -> shapely.Polygon:
    """Rectilinear version of ``poly`` in its own dominant frame, on a grid of ``cell`` metres.

    The outline is rotated so its dominant direction is horizontal, rasterized on a ``cell``
    grid, polygonized (right angles only) and rotated back. Falls back to ``poly`` when the
    result would lose the shape (empty, split, or area off by more than 25 %).
    """
    if poly.is_empty or cell <= 0:
        return poly
    angle = dominant_angle(poly)
    cx, cy = poly.centroid.x, poly.centroid.y
    deg = math.degrees(angle)
    rotated = shapely.affinity.rotate(poly, -deg, origin=(cx, cy))
    x0, y0, x1, y1 = rotated.bounds
    w = max(1, math.ceil((x1 - x0) / cell) + 2)
    h = max(1, math.ceil((y1 - y0) / cell) + 2)
    if w * h > 4_000_000:
        return poly
    t = Affine(cell, 0, x0 - cell, 0, -cell, y1 + cell)
    grid = rasterize([(rotated, 1)], out_shape=(h, w), transform=t, dtype="uint8")
    parts = [shapely.geometry.shape(g) for g, v in shapes(grid, mask=grid > 0, transform=t) if v]
    if len(parts) != 1:
        return poly
    out = shapely.simplify(parts[0], 0.0)
    out = shapely.affinity.rotate(out, deg, origin=(cx, cy))
    if not out.is_valid or abs(out.area - poly.area) > 0.25 * poly.area:
        return poly
    return out


def regularize_polygons(geoms: np.ndarray, cell: float) -> np.ndarray:
    """:func:`regularize_polygon` over an array of polygons."""
    return np.array([regularize_polygon(g, cell) for g in geoms], dtype=object)
