"""``geoseg changes``: the four classes on hand-made layers, the compared area, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin
from shapely.geometry import LineString, box

from geoseg.changes import (
    ChangeOptions,
    NoOverlapError,
    compare_buildings,
    compare_files,
    read_area,
)
from geoseg.cli import cli
from geoseg.errors import InputError

UTM = "EPSG:32633"
X0, Y0 = 500_000.0, 5_000_000.0  # metres, UTM zone 33N


def _sq(x0: float, y0: float, x1: float, y1: float) -> object:
    return box(X0 + x0, Y0 + y0, X0 + x1, Y0 + y1)


def _before() -> gpd.GeoDataFrame:
    """A (same after), B (extended after), C (gone after), E (outside the new scene)."""
    geoms = [_sq(0, 0, 10, 10), _sq(20, 0, 30, 10), _sq(40, 0, 50, 10), _sq(200, 0, 210, 10)]
    return gpd.GeoDataFrame({"name": ["A", "B", "C", "E"]}, geometry=geoms, crs=UTM)


def _after() -> gpd.GeoDataFrame:
    """A unchanged, B extended by half (IoU 100/150), D new."""
    geoms = [_sq(0, 0, 10, 10), _sq(20, 0, 35, 10), _sq(60, 0, 70, 10)]
    return gpd.GeoDataFrame({"name": ["A", "B", "D"]}, geometry=geoms, crs=UTM)


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    """BEFORE as a GeoPackage in UTM, AFTER as GeoJSON in EPSG:4326."""
    before, after = tmp_path / "before.gpkg", tmp_path / "after.geojson"
    _before().to_file(before, driver="GPKG")
    _after().to_crs("EPSG:4326").to_file(after, driver="GeoJSON")
    return before, after


def _by_class(frame: gpd.GeoDataFrame) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    rows = zip(frame["change"], frame["before_index"], frame["after_index"], strict=True)
    for kind, bi, ai in rows:
        out.setdefault(kind, []).append((int(bi), int(ai)))
    return {k: sorted(v) for k, v in out.items()}


def test_four_classes_on_hand_made_layers() -> None:
    result = compare_buildings(_before(), _after())
    assert result.counts == {"added": 1, "removed": 2, "changed": 1, "unchanged": 1}
    # (before row, after row): each building of either layer in exactly one class
    assert _by_class(result.features) == {
        "unchanged": [(0, 0)],
        "changed": [(1, 1)],
        "added": [(-1, 2)],
        "removed": [(2, -1), (3, -1)],
    }
    f = result.features.set_index("change")
    assert f.loc["changed", "iou"] == pytest.approx(100 / 150, abs=1e-6)
    assert f.loc["changed", "area_before_m2"] == pytest.approx(100, rel=1e-6)
    assert f.loc["changed", "area_after_m2"] == pytest.approx(150, rel=1e-6)
    assert np.isnan(f.loc["added", "area_before_m2"]) and np.isnan(f.loc["added", "iou"])
    assert f.loc["unchanged", "iou"] == pytest.approx(1.0)


def test_thresholds_decide_changed_and_matched() -> None:
    loose = compare_buildings(_before(), _after(), options=ChangeOptions(unchanged_iou=0.6))
    assert loose.counts["changed"] == 0 and loose.counts["unchanged"] == 2
    strict = compare_buildings(_before(), _after(), options=ChangeOptions(match_iou=0.7))
    # B's extension is no match at 0.7: the old B is removed and the new one added
    assert strict.counts == {"added": 2, "removed": 3, "changed": 0, "unchanged": 1}
    with pytest.raises(InputError, match="unchanged_iou"):
        ChangeOptions(match_iou=0.6, unchanged_iou=0.5)


def test_area_keeps_buildings_outside_the_scene_out(tmp_path: Path) -> None:
    area = gpd.GeoSeries([_sq(-5, -5, 100, 20)], crs=UTM).to_crs("EPSG:4326")
    result = compare_buildings(_before(), _after(), area)
    assert result.counts == {"added": 1, "removed": 1, "changed": 1, "unchanged": 1}
    # a building cut by the area is compared by its part inside it, on both sides
    half = gpd.GeoSeries([_sq(-5, -5, 25, 20)], crs=UTM)
    cut = compare_buildings(_before(), _after(), half)
    assert cut.counts == {"added": 0, "removed": 0, "changed": 0, "unchanged": 2}


def _raster(path: Path, valid_until_m: float) -> Path:
    """A 1 m raster over x 0..250, y -50..50 (UTM), nodata from x = ``valid_until_m`` on."""
    data = np.ones((1, 100, 250), np.uint8)
    data[:, :, int(valid_until_m) :] = 0
    profile = {
        "driver": "GTiff",
        "width": 250,
        "height": 100,
        "count": 1,
        "dtype": "uint8",
        "crs": UTM,
        "transform": from_origin(X0, Y0 + 50, 1.0, 1.0),
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_area_from_a_rasters_valid_data_outline(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    before, after = layers
    scene = _raster(tmp_path / "scene.tif", 100)  # E (x 200..210) is inside the bounds
    outline = read_area(scene)
    assert outline.to_crs(UTM).area.iloc[0] == pytest.approx(100 * 100, rel=1e-6)
    result = compare_files(before, after, [scene])
    assert result.counts["removed"] == 1  # C only; E lies on nodata
    everywhere = compare_files(before, after)
    assert everywhere.counts["removed"] == 2


def test_cli_writes_layer_and_json(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    before, after = layers
    area = tmp_path / "area.geojson"
    gpd.GeoDataFrame(geometry=[_sq(-5, -5, 100, 20)], crs=UTM).to_file(area, driver="GeoJSON")
    out, counts = tmp_path / "res" / "changes.geojson", tmp_path / "counts.json"
    args = ["changes", str(before), str(after), "--out", str(out), "--json", str(counts)]
    r = CliRunner().invoke(cli, [*args, "--area", str(area)])
    assert r.exit_code == 0, r.output
    got = gpd.read_file(out)
    assert got.crs.to_epsg() == 4326
    assert sorted(got["change"]) == ["added", "changed", "removed"]
    assert {"area_before_m2", "area_after_m2", "iou"} <= set(got.columns)
    data = json.loads(counts.read_text())
    assert data == {"added": 1, "removed": 1, "changed": 1, "unchanged": 1}
    assert all(type(v) is int for v in data.values())
    assert not list(out.parent.glob(".*"))  # no temporary file left
    r = CliRunner().invoke(cli, [*args, "--all"])
    assert r.exit_code == 0, r.output
    assert sorted(gpd.read_file(out)["change"]) == [
        "added",
        "changed",
        "removed",
        "removed",
        "unchanged",
    ]


def test_a_layer_of_lines_is_refused(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    before, _ = layers
    lines = tmp_path / "roads.geojson"
    gpd.GeoDataFrame(geometry=[LineString([(15.0, 45.1), (15.001, 45.1)])], crs=4326).to_file(
        lines, driver="GeoJSON"
    )
    r = CliRunner().invoke(
        cli, ["changes", str(before), str(lines), "-o", str(tmp_path / "c.gpkg")]
    )
    assert r.exit_code == 2
    assert "roads.geojson" in r.output and "must hold polygons" in r.output


def test_layers_without_overlap_are_refused(tmp_path: Path) -> None:
    far = _after().translate(xoff=10_000)
    with pytest.raises(NoOverlapError, match="do not overlap"):
        compare_buildings(_before(), far)
    area = gpd.GeoSeries([_sq(5000, 5000, 5100, 5100)], crs=UTM)
    with pytest.raises(NoOverlapError, match="outside the compared area"):
        compare_buildings(_before(), _after(), area)


def test_missing_crs_inferred_or_refused(tmp_path: Path, layers: tuple[Path, Path]) -> None:
    before, _ = layers
    bare = tmp_path / "bare.shp"
    _after().to_file(bare)
    bare.with_suffix(".prj").unlink()
    # the same coordinates as the UTM layer: its CRS is taken
    assert compare_files(before, bare).counts["unchanged"] == 1
    far = tmp_path / "far.shp"
    _after().translate(xoff=10_000_000).to_file(far)
    far.with_suffix(".prj").unlink()
    r = CliRunner().invoke(cli, ["changes", str(before), str(far), "-o", str(tmp_path / "c.gpkg")])
    assert r.exit_code == 2
    assert "far.shp" in r.output and "no CRS" in r.output


# --- pipeline settings -------------------------------------------------------------------------

PIPELINE = """\
schema_version: 1
name: roads-a
inputs:
  paths: ["scenes/*.tif"]
model: model
outputs:
  dir: out
"""


def test_pipelines_without_changes_keep_their_config_hash() -> None:
    from geoseg.pipeline.config import parse_pipeline

    # the hash of this file before changes and report existed
    before = "fd944b2ad4a497428eea2d513f6c4fa5bc84fa3b8f4f9f8456a311ddd9d1d8a1"
    assert parse_pipeline(PIPELINE, "p.yml").config_hash() == before
    no_report = PIPELINE + "  report: false\n"
    assert parse_pipeline(no_report, "p.yml").config_hash() == before
    changes = PIPELINE + "changes:\n  reference: previous\n"
    assert parse_pipeline(changes, "p.yml").config_hash() != before
    stricter = changes + "  unchanged_iou: 0.9\n"
    assert (
        parse_pipeline(stricter, "p.yml").config_hash()
        != parse_pipeline(changes, "p.yml").config_hash()
    )


def test_change_settings_are_validated() -> None:
    from geoseg.errors import ConfigError
    from geoseg.pipeline.config import parse_pipeline

    with pytest.raises(ConfigError, match="changes.refrence: unknown field"):
        parse_pipeline(PIPELINE + "changes:\n  refrence: previous\n", "p.yml")
    no_vectors = PIPELINE + "  vectors: false\nchanges:\n  reference: previous\n"
    with pytest.raises(ConfigError, match="outputs.vectors"):
        parse_pipeline(no_vectors, "p.yml")
    with pytest.raises(ConfigError, match="unchanged_iou"):
        parse_pipeline(PIPELINE + "changes:\n  reference: previous\n  match_iou: 0.9\n", "p.yml")
