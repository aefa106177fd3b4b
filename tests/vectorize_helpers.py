"""Small prediction rasters for the vectorize tests, written like ``geoseg predict`` does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from tests.conftest import write_tif

CLASSES = ["background", "building", "road"]
#: GeoTIFF creation options (rasterio profile keys) for 256 px internal tiles.
TILED: dict[str, Any] = {"tiled": True, "blockxsize": 256, "blockysize": 256}
UTM = "EPSG:32614"
#: 0.5 m pixels in UTM zone 14N (Austin).
UTM_TRANSFORM = Affine(0.5, 0, 620000.0, 0, -0.5, 3350000.0)
#: About 0.5 m pixels in longitude/latitude near Austin.
LONLAT_TRANSFORM = Affine(5.2e-6, 0, -97.74, 0, -4.5e-6, 30.27)

_ROOT = Path(__file__).resolve().parents[1]
#: ``<repo>/../shared/data`` (a worktree one level deeper also finds it).
DATA = next(
    (p / "shared" / "data" for p in (_ROOT.parent, _ROOT.parent.parent) if (p / "shared").is_dir()),
    _ROOT.parent / "shared" / "data",
)


def tags(stem: str, model: str = "unet@0123456789ab") -> dict[str, str]:
    return {
        "GEOSEG_CLASSES": json.dumps(CLASSES),
        "GEOSEG_MODEL": model,
        "GEOSEG_SCENE": f"{stem}.tif",
    }


def write_mask(
    path: Path, classes: np.ndarray, crs: str | None = UTM, transform: Affine = UTM_TRANSFORM
) -> Path:
    """A ``<stem>.mask.tif``: uint8 class ids, nodata 255, class names in the tags."""
    return write_tif(
        path,
        classes.astype(np.uint8)[None],
        crs=crs,
        transform=transform,
        nodata=255,
        tags=tags(path.name.split(".")[0]),
        **TILED,
    )


def write_probs(
    path: Path, probs: np.ndarray, crs: str | None = UTM, transform: Affine = UTM_TRANSFORM
) -> Path:
    """A ``<stem>.probs.tif``: uint8 0–255 per class, one band per class."""
    return write_tif(
        path,
        probs.astype(np.uint8),
        crs=crs,
        transform=transform,
        tags=tags(path.name.split(".")[0]),
        descriptions=CLASSES,
        **TILED,
    )


def probs_from_classes(classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """Plausible probabilities whose argmax is ``classes`` (confidence 0.6–1.0)."""
    rng = np.random.default_rng(seed)
    h, w = classes.shape
    top = rng.integers(153, 256, size=(h, w))
    probs = np.zeros((len(CLASSES), h, w), dtype=np.int64)
    rest = (255 - top) // 2
    for k in range(len(CLASSES)):
        probs[k] = np.where(classes == k, top, rest)
    return probs.astype(np.uint8)


def road_grid(size: int, spacing: int, width: int, offset: int = 0) -> np.ndarray:
    """A boolean grid of straight roads ``width`` px wide every ``spacing`` px."""
    m = np.zeros((size, size), bool)
    for start in range(offset, size, spacing):
        m[start : start + width, 8 : size - 8] = True
        m[8 : size - 8, start : start + width] = True
    return m


def square_footprints(path: Path, corners: list[tuple[int, int]], side: int = 20) -> Path:
    """True footprints: a ``side`` px square from each (row, col) corner of a 100 x 100 px
    grid at :data:`UTM_TRANSFORM`, each a polygon of its own, written to ``path``."""
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    ids = np.zeros((100, 100), np.uint8)
    for r, c in corners:
        ids[r : r + side, c : c + side] = 1
    polys = [shape(g) for g, v in shapes(ids, mask=ids == 1, transform=UTM_TRANSFORM) if v == 1]
    gpd.GeoDataFrame(geometry=polys, crs=UTM).to_file(path)
    return path
