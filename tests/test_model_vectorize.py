"""Vectorizer settings chosen for a model: stored in model.json, carried by its predictions,
used in place of the vectorizer's defaults (a user's own setting wins), and chosen on labelled
scenes by ``geoseg model tune``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.errors import InputError, ModelError
from geoseg.models.bundle import VectorizeDefaults, load_bundle, read_spec, spec_json
from geoseg.pipeline.config import parse_pipeline
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.conftest import write_tif
from tests.vectorize_helpers import CLASSES, TILED, UTM, UTM_TRANSFORM, square_footprints

#: Four 20 px (10 m) square buildings and four 4 px (2 m, 4 m²) specks: 0.5 m pixels.
BIG = [(10, 10), (10, 50), (50, 10), (50, 50)]
SPECKS = [(35, 35), (35, 80), (80, 35), (80, 80)]


def _ids() -> np.ndarray:
    ids = np.zeros((100, 100), np.uint8)
    for r, c in BIG:
        ids[r : r + 20, c : c + 20] = 1
    for r, c in SPECKS:
        ids[r : r + 4, c : c + 4] = 1
    return ids


def _probs(path: Path, model: str = "m@0123456789ab", **extra: str) -> Path:
    ids = _ids()
    probs = np.zeros((len(CLASSES), *ids.shape), np.uint8)
    for k in range(len(CLASSES)):
        probs[k][ids == k] = 230
    tags = {
        "GEOSEG_CLASSES": json.dumps(CLASSES),
        "GEOSEG_MODEL": model,
        "GEOSEG_SCENE": "town.tif",
        **extra,
    }
    return write_tif(path, probs, crs=UTM, transform=UTM_TRANSFORM, tags=tags, **TILED)


def _truth(path: Path) -> Path:
    """The four big buildings only: the specks are false positives."""
    return square_footprints(path, BIG)


def _count(probs: Path, out: Path, **given: Any) -> int:
    options = VectorizeOptions(layers={"building": "polygons"}, **given)
    outs = vectorize_prediction(probs, out, options)
    return len(pyogrio.read_dataframe(outs.layers["buildings"].paths["geojson"]))


def test_a_models_settings_replace_only_the_defaults() -> None:
    chosen = {"min_area_m2": 12.0, "contact_threshold": 0.3}
    assert VectorizeOptions().under(chosen).min_area_m2 == 12.0
    assert VectorizeOptions().under(chosen).contact_threshold == 0.3
    mine = VectorizeOptions(min_area_m2=1.0, regularize=True).under(chosen)
    assert (mine.min_area_m2, mine.contact_threshold, mine.regularize) == (1.0, 0.3, True)
    same = VectorizeOptions()
    assert same.under({}) is same


def test_model_json_checks_the_settings_and_omits_them_when_unset(tmp_path: Path) -> None:
    spec = read_spec(Path(__file__).parents[1] / "data_samples" / "model")
    assert '"vectorize"' not in spec_json(spec.model_copy(update={"vectorize": None}))
    raw = json.loads(spec_json(spec))
    raw["vectorize"] = {"min_area": 10}
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"model.json: invalid model spec: vectorize.min_area"):
        read_spec(tmp_path)
    raw["vectorize"] = {"min_area_m2": -1}
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"vectorize.min_area_m2"):
        read_spec(tmp_path)


def test_a_predictions_model_settings_apply_unless_given(tmp_path: Path) -> None:
    plain = _probs(tmp_path / "plain.probs.tif")
    tagged = _probs(tmp_path / "town.probs.tif", GEOSEG_VECTORIZE='{"min_area_m2": 10}')
    assert _count(plain, tmp_path / "a") == 8  # the default (2 m²) keeps the 4 m² specks
    assert _count(tagged, tmp_path / "b") == 4  # the model's 10 m² drops them
    assert _count(tagged, tmp_path / "c", min_area_m2=2.0) == 8  # the user's setting wins
    res = CliRunner().invoke(cli, ["vectorize", str(tagged), "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "buildings: 4 features" in res.output
    args = ["vectorize", str(tagged), "-o", str(tmp_path / "e"), "--min-area", "0"]
    res = CliRunner().invoke(cli, args)
    assert "buildings: 8 features" in res.output


def test_a_broken_settings_tag_names_the_file(tmp_path: Path) -> None:
    bad = _probs(tmp_path / "town.probs.tif", GEOSEG_VECTORIZE='{"min_area_m2": "big"}')
    with pytest.raises(InputError, match=r"town.probs.tif: its GEOSEG_VECTORIZE tag .* not valid"):
        _count(bad, tmp_path / "o")


def test_predict_records_the_models_settings(tmp_path: Path, make_bundle: Any) -> None:
    chosen = VectorizeDefaults(min_area_m2=7.5, chosen_on="a test")
    bundle = make_bundle(vectorize=chosen)
    scene = write_tif(
        tmp_path / "scene.tif",
        np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8),
    )
    args = ["predict", str(scene), "-m", str(bundle.path), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for name in ("scene.probs.tif", "scene.mask.tif"):
        with rasterio.open(tmp_path / "o" / name) as src:
            assert json.loads(src.tags()["GEOSEG_VECTORIZE"]) == {"min_area_m2": 7.5}
    res = CliRunner().invoke(cli, [*args[:3], str(make_bundle().path), "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "p" / "scene.probs.tif") as src:
        assert "GEOSEG_VECTORIZE" not in src.tags()
    res = CliRunner().invoke(cli, ["model", "info", str(bundle.path)])
    assert "min_area_m2 7.5; buildings chosen on: a test" in res.output


def test_predict_vectorize_uses_the_models_settings(tmp_path: Path, make_bundle: Any) -> None:
    """The layers made while a scene is predicted follow the model's settings, as those that
    ``geoseg vectorize`` makes from the finished raster do."""
    chosen = VectorizeDefaults(min_area_m2=1e9)
    bundle = make_bundle(classes=["background", "building"], vectorize=chosen)
    scene = write_tif(
        tmp_path / "scene.tif",
        np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8),
    )
    args = ["predict", str(scene), "-m", str(bundle.path), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu", "--vectorize"])
    assert res.exit_code == 0, res.output
    assert "buildings: 0 features" in res.output
    probs = tmp_path / "o" / "scene.probs.tif"
    res = CliRunner().invoke(cli, ["vectorize", str(probs), "-o", str(tmp_path / "v")])
    assert "buildings: 0 features" in res.output
    args = ["vectorize", str(probs), "-o", str(tmp_path / "w"), "--min-area", "0"]
    res = CliRunner().invoke(cli, args)
    assert "buildings: 0 features" not in res.output  # the random model does find some


PIPELINE = """\
schema_version: 1
name: p
inputs: {paths: ["scenes/*.tif"]}
model: model
outputs: {dir: out}
"""


def test_a_pipeline_uses_the_models_settings_and_its_own_first() -> None:
    # the shipped spec without its input filter, which counts in the hash on its own
    spec = read_spec(Path(__file__).parents[1] / "data_samples" / "model").model_copy(
        update={"input_low_pass_m": None}
    )
    plain = spec.model_copy(update={"vectorize": None})
    chosen = spec.model_copy(update={"vectorize": VectorizeDefaults(min_area_m2=10)})
    other = spec.model_copy(update={"vectorize": VectorizeDefaults(min_area_m2=20)})
    c = parse_pipeline(PIPELINE, "p.yml")
    assert c.vectorize_options(chosen).min_area_m2 == 10
    assert c.config_hash(plain) == c.config_hash()  # pipelines hashed before keep their hash
    assert len({c.config_hash(plain), c.config_hash(chosen), c.config_hash(other)}) == 3
    own = parse_pipeline(PIPELINE + "vectorize: {min_area_m2: 12}\n", "p.yml")
    assert own.vectorize_options(chosen).min_area_m2 == 12
    assert own.config_hash(chosen) == own.config_hash(other) == own.config_hash(plain)


def test_tune_chooses_the_best_settings_and_writes_them(tmp_path: Path, make_bundle: Any) -> None:
    import shutil

    src = make_bundle()
    bundle = tmp_path / "model"
    shutil.copytree(src.path, bundle)
    probs = _probs(tmp_path / "town.probs.tif", model=src.ident)
    truth = _truth(tmp_path / "truth.gpkg")
    report = tmp_path / "tune.json"
    args = ["model", "tune", str(bundle), "--scene", str(probs), str(truth)]
    res = CliRunner().invoke(cli, [*args, "--min-area", "2,10,500", "--json", str(report)])
    assert res.exit_code == 0, res.output
    rows = {r["min_area_m2"]: r for r in json.loads(report.read_text())["rows"]}
    assert (rows[2.0]["tp"], rows[2.0]["fp"], rows[2.0]["fn"]) == (4, 4, 0)
    assert (rows[10.0]["tp"], rows[10.0]["fp"], rows[10.0]["fn"]) == (4, 0, 0)
    assert (rows[500.0]["tp"], rows[500.0]["fn"]) == (0, 4)
    assert json.loads(report.read_text())["best"]["min_area_m2"] == 10.0
    assert load_bundle(bundle).spec.vectorize is None  # not without --write
    res = CliRunner().invoke(cli, [*args, "--min-area", "2,10", "--write"])
    assert res.exit_code == 0, res.output
    written = load_bundle(bundle)  # the weights' hash still holds
    assert written.sha256 == src.sha256
    assert written.spec.vectorize is not None
    # the valley widths and building thresholds tried by default gain nothing on squares:
    # neither is chosen
    settings = written.spec.vectorize.settings()
    assert settings == {"min_area_m2": 10.0, "valley_m": 0.0, "building_threshold": 0.5}
    assert "F1 1.000" in written.spec.vectorize.chosen_on
    assert "town" in written.spec.vectorize.chosen_on


def test_tune_refuses_another_models_prediction(tmp_path: Path, make_bundle: Any) -> None:
    bundle = make_bundle()
    probs = _probs(tmp_path / "town.probs.tif", model="other@0123456789ab")
    truth = _truth(tmp_path / "truth.gpkg")
    args = ["model", "tune", str(bundle.path), "--scene", str(probs), str(truth)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert "town.probs.tif: was made by model other@0123456789ab" in res.output


def test_tune_that_cannot_write_says_so_and_keeps_model_json(
    tmp_path: Path, make_bundle: Any
) -> None:
    import shutil

    src = make_bundle()
    bundle = tmp_path / "model"
    shutil.copytree(src.path, bundle)
    probs = _probs(tmp_path / "town.probs.tif", model=src.ident)
    truth = _truth(tmp_path / "truth.gpkg")
    before = (bundle / "model.json").read_bytes()
    (bundle / ".model.json.partial").mkdir()  # where the new model.json would be written
    args = ["model", "tune", str(bundle), "--scene", str(probs), str(truth), "--write"]
    res = CliRunner().invoke(cli, [*args, "--min-area", "2,10"])
    assert res.exit_code != 0
    assert f"{bundle / 'model.json'}: cannot write" in res.output
    assert (bundle / "model.json").read_bytes() == before


def test_tune_leaves_out_truth_that_only_touches_the_prediction(
    tmp_path: Path, make_bundle: Any
) -> None:
    """A building beside the raster, sharing only its edge, cuts to a line: no building to
    find there, so no false negative."""
    import geopandas as gpd
    from shapely.geometry import box

    from geoseg.tune import tune_buildings

    bundle = make_bundle()
    probs = _probs(tmp_path / "town.probs.tif", model=bundle.ident)
    truth = gpd.read_file(_truth(tmp_path / "truth.gpkg"))
    right = UTM_TRANSFORM.c + 0.5 * 100  # the raster's east edge (100 px of 0.5 m)
    top = UTM_TRANSFORM.f
    beside = box(right, top - 20, right + 10, top - 10)
    with_neighbour = tmp_path / "with_neighbour.gpkg"
    gpd.GeoDataFrame(geometry=[*truth.geometry, beside], crs=truth.crs).to_file(with_neighbour)
    rows = tune_buildings(bundle, [(probs, with_neighbour)], [10.0]).rows
    assert (rows[0].tp, rows[0].fp, rows[0].fn) == (4, 0, 0)


def _broken_road(path: Path, model: str, **extra: str) -> tuple[Path, Any]:
    """Probabilities of a road broken for 12 px (its centerlines 10 m apart) and a crossing
    road, made by ``model``; and the true centerlines (the road unbroken)."""
    import geopandas as gpd
    from shapely.geometry import LineString

    from tests.vectorize_helpers import probs_from_classes

    classes = np.zeros((120, 400), np.uint8)  # 0.5 m pixels
    classes[40:49, 10:190] = 2
    classes[40:49, 202:390] = 2
    classes[44:120, 296:305] = 2  # a road south from it
    probs = probs_from_classes(classes)
    tags = {"GEOSEG_CLASSES": json.dumps(CLASSES), "GEOSEG_MODEL": model, **extra}
    write_tif(path, probs, crs=UTM, transform=UTM_TRANSFORM, tags=tags, **TILED)
    t = UTM_TRANSFORM
    truth = [
        LineString([t @ (10, 44.5), t @ (390, 44.5)]),
        LineString([t @ (300.5, 44.5), t @ (300.5, 120)]),
    ]
    return path, gpd.GeoDataFrame(geometry=truth, crs=UTM)


def test_tune_chooses_the_bridge_for_roads_and_keeps_the_building_settings(
    tmp_path: Path, make_bundle: Any
) -> None:
    import shutil

    src = make_bundle(classes=CLASSES)
    bundle = tmp_path / "model"
    shutil.copytree(src.path, bundle)
    spec = read_spec(bundle).model_copy(
        update={"vectorize": VectorizeDefaults(min_area_m2=12.0, chosen_on="by hand")}
    )
    (bundle / "model.json").write_text(spec_json(spec))
    probs, truth = _broken_road(tmp_path / "road.probs.tif", src.ident)
    truth.to_file(tmp_path / "roads.gpkg")
    report = tmp_path / "tune.json"
    args = ["model", "tune", str(bundle), "--road-scene", str(probs), str(tmp_path / "roads.gpkg")]
    res = CliRunner().invoke(cli, [*args, "--bridge", "0,8,12", "--json", str(report), "--write"])
    assert res.exit_code == 0, res.output
    rows = {r["bridge_m"]: r for r in json.loads(report.read_text())["roads"]["rows"]}
    assert rows[0.0]["mean_apls"] == rows[8.0]["mean_apls"] < rows[12.0]["mean_apls"] - 0.2
    chosen = load_bundle(bundle).spec.vectorize
    assert chosen is not None
    assert chosen.settings() == {"min_area_m2": 12.0, "bridge_m": 12.0}
    assert chosen.chosen_on == "by hand" and "road" in chosen.roads_chosen_on
    res = CliRunner().invoke(cli, ["model", "info", str(bundle)])
    assert "min_area_m2 12, bridge_m 12; buildings chosen on: by hand; roads chosen on: APLS" in (
        res.output
    )
    res = CliRunner().invoke(cli, ["model", "tune", str(bundle)])
    assert res.exit_code != 0 and "give at least one --scene or --road-scene" in res.output


def test_a_models_bridge_reaches_the_vectorizer_and_a_users_wins(tmp_path: Path) -> None:
    from geoseg.vectorize.source import VECTORIZE_TAG

    tag = {VECTORIZE_TAG: json.dumps({"bridge_m": 12.0})}
    probs, _ = _broken_road(tmp_path / "road.probs.tif", "m@0123456789ab", **tag)

    def roads(out: str, **given: Any) -> int:
        options = VectorizeOptions(layers={"road": "centerlines"}, **given)
        outs = vectorize_prediction(probs, tmp_path / out, options)
        return len(pyogrio.read_dataframe(outs.layers["roads"].paths["geojson"]))

    # the junction cuts the east-west road in two, and the south road is the third line; the
    # gap cuts it once more
    assert roads("model") == 3
    assert roads("mine", bridge_m=0.0) == 4  # the user's own setting wins: no bridge
