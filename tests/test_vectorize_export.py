"""Output formats and standards: RFC 7946 GeoJSON, GDAL read-back, empty, no CRS, atomic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from click.testing import CliRunner
from pyproj import CRS

import geoseg.vectorize.run as run_module
from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.vectorize_helpers import probs_from_classes, road_grid, write_mask, write_probs


def scene(size: int = 200) -> np.ndarray:
    classes = road_grid(size, 100, 7, offset=40).astype(np.uint8) * 2
    classes[5:30, 5:30] = 1
    classes[10:20, 10:20] = 0  # a courtyard: a hole
    classes[60:90, 120:135] = 1
    return classes


def test_every_format_reads_back_with_gdal(tmp_path: Path) -> None:
    classes = scene()
    path = write_probs(tmp_path / "s.probs.tif", probs_from_classes(classes))
    opts = VectorizeOptions(formats=("gpkg", "fgb", "parquet"), chunk=64, workers=2)
    outs = vectorize_prediction(path, tmp_path / "out", opts)
    assert outs.counts["buildings"] == 2
    assert outs.counts["roads"] > 0
    for name, layer in outs.layers.items():
        assert set(layer.paths) == {"geojson", "gpkg", "fgb", "parquet"}
        for fmt, p in layer.paths.items():
            # This GDAL build has no Parquet driver, so GeoParquet is read by geopandas.
            df = gpd.read_parquet(p) if fmt == "parquet" else pyogrio.read_dataframe(p)
            assert len(df) == layer.count, (name, fmt)
            want = "EPSG:4326" if fmt == "geojson" else "EPSG:32614"
            assert CRS.from_user_input(df.crs).equals(CRS.from_user_input(want)), (name, fmt)
            assert shapely.is_valid(np.asarray(df.geometry.values)).all(), (name, fmt)
            assert (df["model"] == "unet@0123456789ab").all()
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if "partial" in p.name]
    assert leftovers == []


def test_geojson_follows_rfc7946(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "s.mask.tif", scene())
    outs = vectorize_prediction(path, tmp_path / "out", VectorizeOptions(workers=1))
    doc = json.loads(outs.layers["buildings"].paths["geojson"].read_text())
    assert doc["type"] == "FeatureCollection"
    assert "crs" not in doc
    holes = 0
    for feat in doc["features"]:
        poly = shapely.geometry.shape(feat["geometry"])
        assert poly.is_valid
        assert poly.exterior.is_ccw
        assert all(not ring.is_ccw for ring in poly.interiors)
        holes += len(poly.interiors)
        lon, lat = poly.exterior.coords[0]
        assert -98 < lon < -97 and 30 < lat < 31  # UTM 14N near Austin, lon/lat order
        assert set(feat["properties"]) == {
            "id",
            "class",
            "area_m2",
            "perimeter_m",
            "confidence_mean",
            "confidence_max",
            "scene",
            "model",
        }
        assert feat["properties"]["confidence_mean"] is None  # a mask alone has no confidence
    assert holes == 1
    text = outs.layers["roads"].paths["geojson"].read_text()
    assert max(len(d) for d in re.findall(r"\.(\d+)", text)) <= 7


def test_precision_is_configurable(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "s.mask.tif", scene())
    outs = vectorize_prediction(path, tmp_path, VectorizeOptions(workers=1, precision=4))
    text = outs.layers["buildings"].paths["geojson"].read_text()
    geometry = "".join(re.findall(r'"coordinates":[^}]*', text))
    assert max(len(d) for d in re.findall(r"\.(\d+)", geometry)) <= 4


def test_empty_mask_gives_valid_empty_collection(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "e.mask.tif", np.zeros((100, 100), np.uint8))
    outs = vectorize_prediction(path, tmp_path, VectorizeOptions(workers=1, formats=("gpkg",)))
    for layer in outs.layers.values():
        assert layer.count == 0
        doc = json.loads(layer.paths["geojson"].read_text())
        assert doc["type"] == "FeatureCollection" and doc["features"] == []
        assert len(pyogrio.read_dataframe(layer.paths["geojson"])) == 0
        assert len(pyogrio.read_dataframe(layer.paths["gpkg"])) == 0


def test_raster_without_crs_is_refused(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "n.mask.tif", scene(), crs=None)
    with pytest.raises(InputError, match="no CRS"):
        vectorize_prediction(path, tmp_path / "out", VectorizeOptions(workers=1))
    result = CliRunner().invoke(cli, ["vectorize", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no CRS" in result.output


def test_failure_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_mask(tmp_path / "s.mask.tif", scene())
    out = tmp_path / "out"

    def broken(*_: object) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(run_module, "build_centerlines", broken)
    with pytest.raises(RuntimeError, match="^disk gone$"):
        vectorize_prediction(path, out, VectorizeOptions(workers=1, formats=("gpkg",)))
    assert list(out.iterdir()) == []


def test_cli_writes_layers(tmp_path: Path) -> None:
    """The CLI writes each layer in each format; --regularize turns a slanted building (a
    parallelogram) into a right-angled outline."""
    from rasterio.features import rasterize
    from shapely.geometry import Polygon

    classes = scene()
    slanted = Polygon([(60, 162), (110, 162), (122, 186), (72, 186)])  # corners 63° and 117°
    classes[rasterize([(slanted, 1)], out_shape=classes.shape).astype(bool)] = 1
    path = write_mask(tmp_path / "s.mask.tif", classes)

    def run(out: str, *extra: str) -> gpd.GeoDataFrame:
        args = ["vectorize", str(path), "--out", str(tmp_path / out), "--format", "fgb"]
        result = CliRunner().invoke(cli, [*args, "--min-area", "5", "--workers", "1", *extra])
        assert result.exit_code == 0, result.output
        assert (tmp_path / out / "s.buildings.geojson").exists()
        assert (tmp_path / out / "s.roads.fgb").exists()
        return pyogrio.read_dataframe(tmp_path / out / "s.buildings.fgb").to_crs(3857)

    def corners(layer: gpd.GeoDataFrame) -> np.ndarray:
        """Angles (degrees) at the corners of the largest building's outline."""
        xy = np.asarray(layer.geometry.iloc[int(layer.area.argmax())].exterior.coords)[:-1]
        a, b = np.roll(xy, 1, axis=0) - xy, np.roll(xy, -1, axis=0) - xy
        cos = (a * b).sum(axis=1) / np.hypot(*a.T) / np.hypot(*b.T)
        return np.degrees(np.arccos(np.clip(cos, -1, 1)))

    # simplified beyond the pixel steps, the outline keeps its slanted corners; regularized,
    # every corner is a right angle (to the coordinates' rounding in the written files)
    plain, straight = run("o", "--simplify", "1.5"), run("r", "--simplify", "1.5", "--regularize")
    assert len(plain) == len(straight) == 3
    assert np.abs(corners(plain) - 90).max() > 20
    assert np.abs(corners(straight) - 90).max() < 2
    bad = CliRunner().invoke(
        cli, ["vectorize", str(path), "--out", str(tmp_path / "o"), "--layer", "building"]
    )
    assert bad.exit_code == 2


def test_options_forbid_unknown_fields() -> None:
    with pytest.raises(ValueError):
        VectorizeOptions(treshold=0.4)  # type: ignore[call-arg]
    assert VectorizeOptions(formats=("gpkg",)).formats == ("geojson", "gpkg")


def test_polygons_geos_cannot_snap_are_made_valid_not_a_crash(tmp_path: Path) -> None:
    """A traced polygon can self-intersect once in lon/lat (near-touching vertices move a
    little differently); GEOS's set_precision then raises "side location conflict". Found by
    benchmarks/bench_outputs.py on a synthetic 8192² scene: the whole vectorize failed. Such a
    polygon was then written with a geometry object in place of its coordinates, which GDAL
    read as a null geometry (found on a dense town, benchmarks/montenegro.py)."""
    import shapely

    from geoseg.vectorize.export import _geometries, snap_to_grid

    wkt = (
        "POLYGON ((15.015890239339006 45.14642235385251, 15.015924588746756 45.146438552119825, "
        "15.015913138942011 45.14643315269852, 15.01592458649107 45.14643045059436, "
        "15.015920766632357 45.1464169485839, 15.015916952787723 45.14642505064129, "
        "15.015905504488392 45.14642505223621, 15.015901686136171 45.1464169512421, "
        "15.015890239339006 45.14642235385251))"
    )
    bad = shapely.from_wkt(wkt)
    with pytest.raises(shapely.errors.GEOSException):
        shapely.set_precision(bad, 1e-7)
    ok = shapely.from_wkt("POLYGON ((15 45, 15.0001 45, 15.0001 45.0001, 15 45))")
    snapped = snap_to_grid(np.array([ok, bad]), 1e-7)
    assert snapped[0].equals(shapely.set_precision(ok, 1e-7))
    assert snapped[1].is_valid and abs(snapped[1].area / bad.area - 1) < 0.05
    geoms = _geometries(np.array([ok, bad]), 7)
    assert geoms is not None and len(geoms) == 2
    assert geoms[0] == {
        "type": "Polygon",
        "coordinates": [[[15.0, 45.0], [15.0001, 45.0], [15.0001, 45.0001], [15.0, 45.0]]],
    }
    # the snapped one is a whole geometry object, valid, with (nearly) the traced area
    written = shapely.from_geojson(json.dumps(geoms[1]))
    assert written.is_valid and abs(written.area / bad.area - 1) < 0.05
    # and GDAL reads both (a geometry object nested in "coordinates" came back as null)
    path = tmp_path / "snapped.geojson"
    features = [
        {"type": "Feature", "properties": {"i": i}, "geometry": g} for i, g in enumerate(geoms)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    back = pyogrio.read_dataframe(path)
    assert len(back) == 2 and back.geometry.notna().all() and back.geometry.is_valid.all()
