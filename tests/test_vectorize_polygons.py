"""Building polygons: exact equality with whole-mask polygonization for any chunking."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from geoseg.vectorize.regularize import dominant_angle
from tests.vectorize_helpers import (
    DATA,
    LONLAT_TRANSFORM,
    UTM_TRANSFORM,
    probs_from_classes,
    write_mask,
    write_probs,
)

if TYPE_CHECKING:
    from geopandas import GeoDataFrame

RAW = {"simplify_m": 0.0, "min_area_m2": 0.0, "layers": {"building": "polygons"}}


def reference(classes: np.ndarray, transform: object = UTM_TRANSFORM) -> list[shapely.Polygon]:
    """Polygonize the whole mask at once (the result chunking must reproduce)."""
    fg = classes == 1
    return [
        shapely.geometry.shape(g)
        for g, _ in rasterio.features.shapes(fg.astype(np.uint8), mask=fg, transform=transform)
    ]


def polygons(tmp: Path, path: Path, **opts: object) -> tuple[np.ndarray, GeoDataFrame]:
    outs = vectorize_prediction(path, tmp, VectorizeOptions(formats=("gpkg",), **{**RAW, **opts}))
    df = pyogrio.read_dataframe(outs.layers["buildings"].paths["gpkg"])
    return np.asarray(df.geometry.values), df


def assert_same(ref: list[shapely.Polygon], got: np.ndarray) -> None:
    assert len(got) == len(ref)
    assert shapely.is_valid(got).all()
    tree = shapely.STRtree(got)
    for r in ref:
        hits = tree.query(r.representative_point(), predicate="within")
        assert len(hits) == 1, r.wkt
        g = got[hits[0]]
        assert shapely.symmetric_difference(g, r).area <= 1e-6 * r.area
        assert len(g.interiors) == len(r.interiors)


def shapes_at_corners(size: int, chunk: int, rng: np.random.Generator) -> np.ndarray:
    """Rectangles, rings with holes and L shapes placed over seams and four-chunk corners."""
    m = np.zeros((size, size), np.uint8)
    corners = [(r, c) for r in range(chunk, size, chunk) for c in range(chunk, size, chunk)]
    for r, c in corners:
        dr, dc = rng.integers(-12, 4, 2)
        h, w = rng.integers(3, 20, 2)
        m[max(r + dr, 0) : r + dr + h, max(c + dc, 0) : c + dc + w] = 1
    for _ in range(12):
        r, c = rng.integers(0, size - 24, 2)
        kind = rng.integers(0, 3)
        if kind == 0:
            m[r : r + rng.integers(1, 24), c : c + rng.integers(1, 24)] = 1
        elif kind == 1:  # a ring: one polygon with a hole
            m[r : r + 20, c : c + 20] = 1
            m[r + 5 : r + 15, c + 5 : c + 15] = 0
        else:  # an L
            m[r : r + 20, c : c + 5] = 1
            m[r + 15 : r + 20, c : c + 20] = 1
    return m


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), chunk=st.sampled_from([64, 96, 128]))
def test_chunked_equals_whole_mask(
    tmp_path_factory: pytest.TempPathFactory, seed: int, chunk: int
) -> None:
    tmp = tmp_path_factory.mktemp("seams")
    classes = shapes_at_corners(200, chunk, np.random.default_rng(seed))
    path = write_mask(tmp / "s.mask.tif", classes)
    got, _ = polygons(tmp / "out", path, chunk=chunk, workers=1)
    assert_same(reference(classes), got)


def test_component_across_many_chunks_keeps_hole(tmp_path: Path) -> None:
    """A ring spanning four chunks becomes one polygon with its hole, and a spiral stays one."""
    classes = np.zeros((256, 256), np.uint8)
    classes[40:220, 40:220] = 1
    classes[60:200, 60:200] = 0
    classes[100:160, 100:160] = 1  # island in the hole: its own polygon
    classes[120:140, 120:140] = 0
    path = write_mask(tmp_path / "s.mask.tif", classes)
    got, _ = polygons(tmp_path / "out", path, chunk=64, workers=2)
    ref = reference(classes)
    assert len(ref) == 2
    assert_same(ref, got)


def test_attributes_and_ids_do_not_depend_on_chunking(tmp_path: Path) -> None:
    classes = shapes_at_corners(256, 64, np.random.default_rng(3))
    probs = probs_from_classes(classes)
    path = write_probs(tmp_path / "s.probs.tif", probs)
    cols = ["id", "area_m2", "perimeter_m", "confidence_mean", "confidence_max"]
    _, small = polygons(tmp_path / "a", path, chunk=64, simplify_m=0.5, min_area_m2=1.0)
    _, whole = polygons(tmp_path / "b", path, chunk=4096, simplify_m=0.5, min_area_m2=1.0)
    a = small.sort_values("id")[cols].reset_index(drop=True)
    b = whole.sort_values("id")[cols].reset_index(drop=True)
    assert len(a) > 10
    assert (a["id"] == b["id"]).all()
    np.testing.assert_allclose(a[cols[1:]].to_numpy(float), b[cols[1:]].to_numpy(float))
    # Confidences come from the probability band of the class.
    fg = classes == 1
    assert small["confidence_max"].max() <= probs[1][fg].max() / 255 + 1e-9
    assert small["confidence_mean"].min() >= probs[1][fg].min() / 255 - 1e-9
    assert set(small["class"]) == {"building"}
    assert set(small["model"]) == {"unet@0123456789ab"}
    assert set(small["scene"]) == {"s.tif"}
    assert small["id"].is_unique


def test_area_and_tolerances_in_metres_for_lonlat_rasters(tmp_path: Path) -> None:
    """EPSG:4326 input: areas in m², min area in m², never in square degrees."""
    classes = np.zeros((120, 120), np.uint8)
    classes[10:20, 10:20] = 1  # 10 x 10 px
    classes[50:90, 50:90] = 1  # 40 x 40 px
    path = write_mask(tmp_path / "g.mask.tif", classes, crs="EPSG:4326", transform=LONLAT_TRANSFORM)
    lat = math.radians(30.27 - 4.5e-6 * 60)
    px = 5.2e-6 * 111_320 * math.cos(lat)
    py = 4.5e-6 * 110_850
    small = 100 * px * py
    got, df = polygons(tmp_path / "a", path, min_area_m2=small * 1.5)
    assert len(df) == 1
    assert df["area_m2"].iloc[0] == pytest.approx(1600 * px * py, rel=0.01)
    assert df["perimeter_m"].iloc[0] == pytest.approx(80 * (px + py), rel=0.01)
    _, df2 = polygons(tmp_path / "b", path, min_area_m2=small * 0.5)
    assert len(df2) == 2


@pytest.mark.parametrize("lat", [27.6, 45.0, 60.0])
def test_areas_are_ground_metres_in_web_mercator(tmp_path: Path, lat: float) -> None:
    """EPSG:3857, where a projection metre is 1/cos(latitude) ground metres: areas, lengths and
    the minimum area match geodesic measures of the output polygons within 0.5 %."""
    from affine import Affine
    from pyproj import Geod, Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(85.5, lat)
    transform = Affine(0.15, 0, x, 0, -0.15, y)
    classes = np.zeros((200, 200), np.uint8)
    classes[20:60, 30:110] = 1  # 40 x 80 px, 12 x 6 projection metres
    classes[120:125, 120:125] = 1  # 5 x 5 px
    path = write_mask(tmp_path / "m.mask.tif", classes, crs="EPSG:3857", transform=transform)
    k = 1 / math.cos(math.radians(lat))  # Web Mercator scale factor
    small_ground = 25 * (0.15 / k) ** 2
    _, df = polygons(tmp_path / "a", path, min_area_m2=small_ground * 1.5)
    assert len(df) == 1
    geod = Geod(ellps="WGS84")
    lonlat = df.to_crs("EPSG:4326").geometry.iloc[0]
    area, perimeter = geod.geometry_area_perimeter(lonlat)
    assert df["area_m2"].iloc[0] == pytest.approx(abs(area), rel=0.005)
    assert df["perimeter_m"].iloc[0] == pytest.approx(perimeter, rel=0.005)
    _, df2 = polygons(tmp_path / "b", path, min_area_m2=small_ground * 0.5)
    assert len(df2) == 2


def test_simplification_keeps_polygons_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:300, 0:300]
    classes = np.zeros((300, 300), np.uint8)
    for _ in range(25):  # noisy blobs with holes: hard cases for simplification
        cy, cx, r = rng.integers(20, 280), rng.integers(20, 280), rng.integers(5, 25)
        d = np.hypot(yy - cy, xx - cx) + rng.normal(0, 1.5, (300, 300))
        classes[(d < r) & (d > r / 3)] = 1
    path = write_mask(tmp_path / "s.mask.tif", classes)
    got, _ = polygons(tmp_path / "out", path, chunk=64, simplify_m=2.0, min_area_m2=1.0)
    assert len(got) > 5
    assert shapely.is_valid(got).all()
    assert (shapely.get_type_id(got) == 3).all()
    raw, _ = polygons(tmp_path / "raw", path, chunk=64)
    assert shapely.get_num_coordinates(got).sum() < 0.6 * shapely.get_num_coordinates(raw).sum()


AUSTIN = DATA / "real" / "austin_buildings_rgb" / "aerial_sample_gt_mask.tif"


@pytest.mark.skipif(not AUSTIN.exists(), reason="shared real data not available")
def test_regularize_real_austin_buildings(tmp_path: Path) -> None:
    with rasterio.open(AUSTIN) as src:
        gt = src.read(1)
        crs, transform = src.crs, src.transform
    classes = (gt > 0).astype(np.uint8)
    path = write_mask(
        tmp_path / "austin.mask.tif", classes, crs=crs.to_string(), transform=transform
    )
    plain, _ = polygons(tmp_path / "plain", path, chunk=256, simplify_m=0.3, min_area_m2=20.0)
    reg, _ = polygons(
        tmp_path / "reg", path, chunk=256, simplify_m=0.3, min_area_m2=20.0, regularize=True
    )
    assert len(reg) == len(plain) > 50
    assert shapely.is_valid(reg).all()
    right = 0
    diagonal = 0
    for p in reg:
        xy = shapely.get_coordinates(p.exterior)[:-1]
        d = np.diff(np.vstack([xy, xy[:1]]), axis=0)
        ang = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
        turn = np.abs((np.diff(np.r_[ang, ang[:1]]) + 180) % 360 - 180)
        right += bool(np.all(np.minimum(np.abs(turn - 90), np.abs(turn)) < 1.0))
        a = abs(math.degrees(dominant_angle(p))) % 90
        diagonal += 10 < a < 80
    assert right / len(reg) > 0.95
    assert diagonal >= 3  # Austin has buildings far off the pixel grid
    tree = shapely.STRtree(reg)
    ious = []
    for p in plain:
        hits = tree.query(p, predicate="intersects")
        r = shapely.union_all(reg[hits])
        ious.append(shapely.intersection(p, r).area / shapely.union(p, r).area)
    assert np.median(ious) > 0.85


def test_seam_components_are_emitted_as_soon_as_their_chunks_are_in(tmp_path: Path) -> None:
    """Row by row, a bar across the first chunk row is complete before the next row starts."""
    from geoseg.engine.grid import ChunkGrid
    from geoseg.vectorize.geometry import frames_for
    from geoseg.vectorize.polygons import PolygonJob, polygonize_chunk
    from geoseg.vectorize.seams import SeamMerger
    from geoseg.vectorize.source import open_prediction

    classes = np.zeros((192, 192), np.uint8)
    classes[10:20, 5:190] = 1  # a bar through the three chunks of the first row
    classes[100:180, 100:110] = 1  # a column through the second and third rows
    classes[150:160, 20:30] = 1  # inside one chunk: never a seam piece
    pred = open_prediction(write_mask(tmp_path / "s.mask.tif", classes))
    job = PolygonJob(pred, frames_for(pred), "building", "buildings", 0.5, 0.0, 0.0, False)
    grid = ChunkGrid(192, 192, 64, 0, multiple=1)
    rows, cols = grid.shape
    merger = SeamMerger(rows, cols)
    emitted: dict[tuple[int, int], list[shapely.Geometry]] = {}
    pending: dict[tuple[int, int], int] = {}
    for ch in grid:
        seams = (ch.row > 0, ch.row < rows - 1, ch.col > 0, ch.col < cols - 1)
        pieces = merger.add(polygonize_chunk(job, ch.index, ch.core, seams))
        emitted[ch.index] = list(pieces.geoms)
        pending[ch.index] = merger.pending
    assert len(merger.finish()) == 0
    # The bar is one polygon as soon as the last chunk of its row (0, 2) is in.
    assert [len(emitted[(0, c)]) for c in range(3)] == [0, 0, 1]
    assert shapely.area(emitted[(0, 2)][0]) == 185 * 10
    assert pending[(0, 2)] == 0
    # The column joins (1, 1) and (2, 1); it is held in between, and only it.
    assert pending[(1, 1)] == 1 and pending[(2, 0)] == 1
    assert [len(emitted[(2, c)]) for c in range(3)] == [0, 1, 0]
    assert shapely.area(emitted[(2, 1)][0]) == 80 * 10


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    fill=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**32 - 1),
)
def test_traced_polygons_equal_gdals(h: int, w: int, fill: float, seed: int) -> None:
    """The array tracer gives GDAL's polygons: same point sets, same rings, valid; also for
    components that touch themselves or each other only at corners (dense random masks).
    Its rings keep only corners (``finish_polygons`` relies on that for traced pieces)."""
    from scipy import ndimage

    from geoseg.vectorize.trace import trace_polygons

    fg = np.random.default_rng(seed).random((h, w)) < fill
    labels, n = ndimage.label(fg)
    got = trace_polygons(labels.astype(np.int32), n, (3, 5))
    assert len(got) == n and shapely.is_valid(got).all()
    corners = shapely.get_num_coordinates(shapely.simplify(got, 0.0))
    assert (shapely.get_num_coordinates(got) == corners).all()
    t = rasterio.Affine(1, 0, 5, 0, 1, 3)  # the same origin: x = column + 5, y = row + 3
    for g, value in rasterio.features.shapes(labels.astype(np.int32), mask=fg, transform=t):
        ref = shapely.geometry.shape(g)
        mine = got[int(value) - 1]
        assert shapely.symmetric_difference(mine, ref).area == 0
        assert len(mine.interiors) == len(ref.interiors)
        assert mine.area == ref.area
