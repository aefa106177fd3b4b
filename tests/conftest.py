"""Shared fixtures: real data paths, tiny model bundles, small GeoTIFFs written with rasterio."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real imagery; never copied into it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


TINY = {
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
    "chunk": 64,
    "halo": 16,
}

#: a full-depth U-Net (ModelSpec overrides), for tests of seamlessness
FULL = {"encoder_depth": 5, "decoder_channels": [256, 128, 64, 32, 16]}


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """Build (and cache) a random-weight bundle; keyword arguments override ModelSpec fields."""
    import torch

    from geoseg.models.bundle import ModelSpec, build_module, save_bundle

    cache: dict[str, Any] = {}

    def make(seed: int = 0, **overrides: Any) -> Any:
        fields = {**TINY, **overrides}
        key = repr((seed, sorted(fields.items())))
        if key not in cache:
            spec = ModelSpec(**fields)
            torch.manual_seed(seed)
            path = tmp_path_factory.mktemp("bundle")
            cache[key] = save_bundle(spec, build_module(spec).state_dict(), path / "model")
        return cache[key]

    return make


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform: Affine | None = None,
    nodata: float | None = None,
    tags: dict[str, str] | None = None,
    descriptions: list[str] | None = None,
    **profile: Any,
) -> Path:
    """Write ``data`` (bands, h, w) as a GeoTIFF with a 1 m UTM grid unless told otherwise."""
    count, h, w = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=count,
        dtype=data.dtype,
        crs=crs,
        transform=transform or Affine(1.0, 0, 500_000, 0, -1.0, 5_000_000),
        nodata=nodata,
        **profile,
    ) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)
        for i, name in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, name)
    return path


@pytest.fixture
def rgb_scene(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a random uint8 RGB scene of a given size (pixels)."""

    def make(width: int, height: int, seed: int = 0, **kw: Any) -> Path:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)
        return write_tif(tmp_path / f"scene_{width}x{height}_{seed}.tif", data, **kw)

    return make


def raw_pixels(dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two raw (3, 37, 41) chunks of ``dtype`` over its whole range, and their validity."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        data = rng.integers(info.min, info.max, size=(2, 3, 37, 41), endpoint=True, dtype=dtype)
    else:
        data = (rng.standard_normal((2, 3, 37, 41)) * 1e3).astype(dtype)
        data[1, 2, 5:9, 7] = np.nan
    valid = np.ones((2, 37, 41), bool)
    valid[0, :4, :6] = False
    if info is None:
        valid &= np.isfinite(data).all(axis=1)
    return data, valid
