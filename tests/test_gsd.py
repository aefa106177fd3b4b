"""Ground sample distance in ground metres, not CRS units: scale factors and geodesics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyproj
import pytest
from affine import Affine
from rasterio.crs import CRS

from geoseg.io.raster import ground_resolution, open_scene
from tests.conftest import write_tif


def _tif(tmp: Path, crs: str, transform: Affine, size: int = 8) -> Path:
    return write_tif(
        tmp / "g.tif", np.zeros((1, size, size), np.uint8), crs=crs, transform=transform
    )


def _geodesic_res(crs: str, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Independent check: geodesic length of the scene's middle row and column, per pixel."""
    c = pyproj.CRS.from_user_input(crs)
    to_lonlat = pyproj.Transformer.from_crs(c, c.geodetic_crs, always_xy=True)
    geod = c.get_geod()
    assert geod is not None

    def dist(p: tuple[float, float], q: tuple[float, float]) -> float:
        (lon1, lat1), (lon2, lat2) = to_lonlat.transform(*p), to_lonlat.transform(*q)
        return float(geod.inv(lon1, lat1, lon2, lat2)[2])

    def at(col: float, row: float) -> tuple[float, float]:
        return (transform.c + transform.a * col, transform.f + transform.e * row)

    gx = dist(at(0, height / 2), at(width, height / 2)) / width
    gy = dist(at(width / 2, 0), at(width / 2, height)) / height
    return gx, gy


def test_banepa_web_mercator_is_ground_metres(shared_data: Path) -> None:
    """0.149 m in EPSG:3857 units at 27.6° N is 0.132 m on the ground."""
    scene = open_scene(shared_data / "open/banepa_buildings_rgb/banepa_train_rgb.tif")
    assert scene.res[0] == pytest.approx(0.1493, abs=1e-4)
    assert scene.gsd_m == pytest.approx(0.132, abs=0.001)
    gx, gy = scene.ground_res
    assert gx == pytest.approx(scene.res[0] * math.cos(math.radians(27.63)), rel=0.01)
    assert gy == pytest.approx(gx, rel=0.01)


@pytest.mark.parametrize("lat", [0.0, 27.6, 60.0])
def test_web_mercator_scales_with_latitude(tmp_path: Path, lat: float) -> None:
    x, y = pyproj.Transformer.from_crs(4326, 3857, always_xy=True).transform(85.5, lat)
    t = Affine(0.5, 0, x, 0, -0.5, y + 2.0)  # an 8 x 8 px scene centred near (85.5, lat)
    scene = open_scene(_tif(tmp_path, "EPSG:3857", t))
    assert scene.gsd_m == pytest.approx(0.5 * math.cos(math.radians(lat)), rel=0.005)
    for got, want in zip(scene.ground_res, _geodesic_res("EPSG:3857", t, 8, 8), strict=True):
        assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("easting", [500_000.0, 300_000.0, 700_000.0])
def test_utm_is_unchanged(tmp_path: Path, easting: float) -> None:
    t = Affine(0.3, 0, easting, 0, -0.3, 5_000_000)
    scene = open_scene(_tif(tmp_path, "EPSG:32633", t))
    assert scene.gsd_m == pytest.approx(0.3, rel=0.001)
    for got, want in zip(scene.ground_res, _geodesic_res("EPSG:32633", t, 8, 8), strict=True):
        assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("lat", [0.0, 36.1, 60.0, -45.0])
def test_geographic_agrees_with_geodesics(tmp_path: Path, lat: float) -> None:
    t = Affine(2.7e-6, 0, -115.2, 0, -2.7e-6, lat)
    scene = open_scene(_tif(tmp_path, "EPSG:4326", t, size=400))
    gx, gy = scene.ground_res
    wx, wy = _geodesic_res("EPSG:4326", t, 400, 400)
    assert gx == pytest.approx(wx, rel=0.005) and gy == pytest.approx(wy, rel=0.005)
    assert gx / gy == pytest.approx(math.cos(math.radians(lat)), rel=0.01)
    assert scene.gsd_m == pytest.approx(math.sqrt(wx * wy), rel=0.005)


@pytest.mark.parametrize(
    "crs, lon, lat",
    [
        ("EPSG:5070", -120.0, 47.0),  # Albers equal-area, far from its central meridian
        ("ESRI:54008", 100.0, 50.0),  # sinusoidal: sheared far from its central meridian
        ("EPSG:3035", 30.0, 60.0),  # LAEA Europe
        ("EPSG:2263", -74.0, 40.7),  # US survey feet
    ],
)
def test_projections_that_are_not_conformal_or_not_metres(crs: str, lon: float, lat: float) -> None:
    x, y = pyproj.Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    t = Affine(1.0, 0, x, 0, -1.0, y)
    got = ground_resolution(CRS.from_user_input(crs), t, 4, 4)
    want = _geodesic_res(crs, t, 4, 4)
    assert got == pytest.approx(want, rel=1e-4)


def test_unknown_crs_falls_back_to_its_units() -> None:
    local = CRS.from_wkt(
        'LOCAL_CS["local",LOCAL_DATUM["d",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
    )
    assert ground_resolution(local, Affine(0.25, 0, 0, 0, -0.5, 0), 10, 10) == (0.25, 0.5)
