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


# --- changes in pipelines ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.pipeline_support import make_model

    return make_model(tmp_path_factory.mktemp("model") / "model")


def _change_pipeline(tmp: Path, model: Path, **changes: object) -> Path:
    """One 96 px scene; the random model's building probabilities (about 0.33 everywhere)
    cut at 0.34 give a few hundred small buildings that follow the scene's pixels."""
    from tests.pipeline_support import make_scene, write_pipeline

    (tmp / "scenes").mkdir()
    make_scene(tmp / "scenes" / "s0.tif", 0, 0, 96)
    (tmp / "model").symlink_to(model)
    return write_pipeline(
        tmp / "p.yml",
        outputs={"dir": "out", "vectors": True, "quicklook_px": 64},
        vectorize={"threshold": 0.34, "min_area_m2": 0.5, "simplify_m": 0.0},
        changes={"reference": "previous", **changes},
    )


def _rebuild_left_half(scene: Path) -> None:
    """New imagery of the same ground: the scene's left half mirrored, same georeference."""
    from rasterio.windows import Window

    with rasterio.open(scene, "r+") as ds:
        w = Window(0, 0, ds.width // 2, ds.height)
        ds.write(ds.read(window=w)[:, :, ::-1].copy(), window=w)


def test_pipeline_compares_each_scene_with_its_previous_run(
    tmp_path: Path, tiny_model: Path
) -> None:
    import shutil

    from geoseg.pipeline import Ledger, load_pipeline, run_pipeline

    job = _change_pipeline(tmp_path, tiny_model, living="living.gpkg")
    config = load_pipeline(job)
    scene_dir = tmp_path / "out" / "s0"
    layer, changes = scene_dir / "s0.buildings.geojson", scene_dir / "s0.changes.geojson"
    living = tmp_path / "living.gpkg"

    first = run_pipeline(config)
    assert first.ok and first.results[0].changes is None  # nothing to compare with yet
    assert not changes.exists()
    n_first = len(gpd.read_file(layer))
    assert n_first > 10
    kept = tmp_path / "run1.geojson"
    shutil.copy(layer, kept)
    first_living = gpd.read_file(living)
    assert len(first_living) == n_first and first_living["building_id"].is_unique

    _rebuild_left_half(tmp_path / "scenes" / "s0.tif")
    second = run_pipeline(config)
    assert second.ok and second.results[0].status == "done"
    counts = second.results[0].changes
    assert counts is not None and second.change_counts() == counts
    # the counts are those of the two layers compared within the scene's valid data
    want = compare_files(kept, layer, [tmp_path / "scenes" / "s0.tif"]).counts
    assert counts == want
    assert counts["added"] + counts["removed"] + counts["changed"] > 0
    assert counts["unchanged"] > 0  # the right half did not change
    got = gpd.read_file(changes)
    assert sorted(set(got["change"])) <= ["added", "changed", "removed"]
    assert len(got) == counts["added"] + counts["removed"] + counts["changed"]
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        row = ledger.scenes(second.run_id)[0]
    assert row.outputs["changes"] == counts
    assert row.outputs["change_reference"] == f"run {first.run_id}"
    assert row.outputs["files"]["changes"] == str(changes)
    n_second = len(gpd.read_file(layer))
    second_living = gpd.read_file(living)
    assert len(second_living) == n_first + row.outputs["living"]["new"]
    assert row.outputs["living"]["new"] > 0
    assert row.outputs["living"]["seen_again"] + row.outputs["living"]["new"] == n_second

    # rerun with nothing new: every building unchanged, none counted twice
    third = run_pipeline(config, force=True)
    again = third.results[0].changes
    assert again == {"added": 0, "removed": 0, "changed": 0, "unchanged": n_second}
    assert len(gpd.read_file(changes)) == 0
    third_living = gpd.read_file(living)
    assert len(third_living) == len(second_living)
    old = first_living.set_index("building_id")["first_seen"]
    assert (third_living.set_index("building_id")["first_seen"].loc[old.index] == old).all()
    assert (third_living["last_seen"] >= second_living["last_seen"]).all()

    # a skipped scene keeps what its run found; the summary then compares nothing
    fourth = run_pipeline(config)
    assert fourth.results[0].status == "skipped" and fourth.change_counts() is None


def test_pipeline_compares_with_a_reference_file(tmp_path: Path, tiny_model: Path) -> None:
    """A reference layer in another CRS and format, wider than the scene: buildings outside
    the scene's footprint are never called removed."""
    from geoseg.pipeline import load_pipeline, run_pipeline

    job = _change_pipeline(tmp_path, tiny_model)
    config = load_pipeline(job)
    assert run_pipeline(config).ok
    built = gpd.read_file(tmp_path / "out" / "s0" / "s0.buildings.geojson")
    utm = built.estimate_utm_crs()
    far = built.to_crs(utm).translate(xoff=200.0)  # beyond the 96 px scene
    reference = gpd.GeoDataFrame(geometry=[*built.to_crs(utm).geometry, *far], crs=utm)
    reference.to_file(tmp_path / "city.gpkg", driver="GPKG")
    text = job.read_text().replace("reference: previous", "reference: city.gpkg")
    job.write_text(text)
    second = run_pipeline(load_pipeline(job))  # settings changed: the scene runs again
    counts = second.results[0].changes
    assert counts == {"added": 0, "removed": 0, "changed": 0, "unchanged": len(built)}
