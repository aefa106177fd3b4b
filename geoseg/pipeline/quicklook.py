"""Quicklook PNGs: the scene, downsampled, with building outlines and roads drawn over it,
and, where a pipeline compares buildings, the added, removed and changed ones in their colours.

Both the image and the class mask are read straight at the quicklook's size (GDAL uses
overviews where the files have them), so no full-resolution array is ever made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.enums import Resampling

from geoseg.errors import OutputError
from geoseg.io.raster import atomic_path, gdal_env
from geoseg.io.remote import gdal_path

if TYPE_CHECKING:
    import geopandas as gpd
    from affine import Affine
    from rasterio.crs import CRS

__all__ = ["BUILDING_RGB", "CHANGE_RGB", "ROAD_RGB", "quicklook_shape", "write_quicklook"]

BUILDING_RGB = (255, 40, 40)
ROAD_RGB = (255, 220, 0)
ROAD_ALPHA = 0.6
#: Colours of changed buildings (filled, half transparent, with a solid outline).
CHANGE_RGB = {"added": (0, 230, 90), "removed": (40, 120, 255), "changed": (255, 140, 0)}
CHANGE_ALPHA = 0.45


def quicklook_shape(width: int, height: int, longest: int) -> tuple[int, int]:
    """(rows, cols) of a quicklook whose longer side is at most ``longest`` pixels."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _stretch(band: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """2–98 % percentile stretch of one band to uint8 (display only)."""
    values = band[valid]
    if values.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(values, [2, 98])
    if hi <= lo:
        hi = lo + 1
    out = (band.astype(np.float32) - lo) / (hi - lo)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _image(scene_path: str, shape: tuple[int, int]) -> np.ndarray:
    with gdal_env(), rasterio.open(gdal_path(scene_path)) as src:
        alpha = [i for i, ci in enumerate(src.colorinterp, 1) if ci.name == "alpha"]
        bands = [b for b in range(1, src.count + 1) if b not in alpha][:3]
        bands = bands if len(bands) == 3 else bands[:1]
        data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average)
        valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    valid &= np.isfinite(data).all(axis=0) if data.dtype.kind == "f" else True
    rgb = np.stack([_stretch(b, valid) for b in data])
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    rgb[:, ~valid] = 0
    return np.moveaxis(rgb, 0, -1)


def _outline(region: np.ndarray) -> np.ndarray:
    """Pixels of ``region`` that touch a pixel outside it (4-connected)."""
    padded = np.pad(region, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & region
    return region & ~inner


def class_ids(classes: Sequence[str], word: str) -> list[int]:
    """Indices of the classes whose name contains ``word`` (case-insensitive)."""
    return [i for i, c in enumerate(classes) if word in c.lower()]


def _draw_changes(rgb: np.ndarray, changes: gpd.GeoDataFrame, transform: Affine, crs: CRS) -> None:
    """Fill and outline each change class of ``changes`` on ``rgb`` (rows, cols, 3; float)."""
    from rasterio.features import rasterize

    if not len(changes):
        return
    frame = changes.to_crs(crs)
    for kind, colour in CHANGE_RGB.items():
        geoms = [g for g in frame.geometry[frame["change"] == kind] if g is not None]
        if not geoms:
            continue
        region = rasterize(geoms, out_shape=rgb.shape[:2], transform=transform, dtype=np.uint8)
        region = region.astype(bool)
        rgb[region] = rgb[region] * (1 - CHANGE_ALPHA) + np.array(colour) * CHANGE_ALPHA
        rgb[_outline(region)] = colour


def write_quicklook(
    scene_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    classes: Sequence[str],
    out: str | os.PathLike[str],
    longest: int = 1024,
    changes: gpd.GeoDataFrame | None = None,
) -> Path:
    """Write the quicklook PNG for a scene and its class mask to ``out``, atomically.

    ``changes`` (a change layer with a ``change`` column and a CRS, see
    :mod:`geoseg.changes`) draws added, removed and changed buildings in :data:`CHANGE_RGB`."""
    from affine import Affine
    from PIL import Image

    out = Path(out)
    with gdal_env(), rasterio.open(mask_path) as msk:
        shape = quicklook_shape(msk.width, msk.height, longest)
        mask = msk.read(1, out_shape=shape, resampling=Resampling.nearest)
        grid = msk.transform @ Affine.scale(msk.width / shape[1], msk.height / shape[0])
        crs = msk.crs
    rgb = _image(str(scene_path), shape).astype(np.float32)
    roads = np.isin(mask, class_ids(classes, "road"))
    rgb[roads] = rgb[roads] * (1 - ROAD_ALPHA) + np.array(ROAD_RGB, np.float32) * ROAD_ALPHA
    buildings = _outline(np.isin(mask, class_ids(classes, "building")))
    rgb[buildings] = BUILDING_RGB
    if changes is not None:
        _draw_changes(rgb, changes, grid, crs)
    tmp = atomic_path(out)
    try:
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(tmp, format="PNG", optimize=True)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write quicklook ({exc.strerror or exc})") from exc
    return out
