"""A threshold of the building class's own: buildings narrowed to their surest pixels, which
parts neighbours that a yard barely separates, while roads keep the vectorizer's threshold;
set by a user, by a model (``geoseg model tune``), or in a pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.models.bundle import load_bundle
from geoseg.pipeline.config import parse_pipeline
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.conftest import write_tif
from tests.test_model_vectorize import PIPELINE
from tests.vectorize_helpers import TILED, UTM, UTM_TRANSFORM, square_footprints, tags

#: Two 20 px (10 m) houses at 0.5 m, 6 px (3 m) apart, with a yard between them where the
#: building probability is 0.55: one building at the 0.5 threshold, two at 0.6.
HOUSES = [(20, 10), (20, 36)]


def _scene(tmp: Path, model: str = "m@0123456789ab", **extra: str) -> Path:
    """The two houses and their yard, and a road 4 px wide whose probability is 0.55 too."""
    building = np.zeros((100, 100), np.float32)
    building[20:40, 30:36] = 0.55
    for r, c in HOUSES:
        building[r : r + 20, c : c + 20] = 0.9
    road = np.zeros_like(building)
    road[70:74, 5:95] = 0.55
    probs = np.stack([1 - building - road, building, road])
    return write_tif(
        tmp / "town.probs.tif",
        np.round(probs * 255).astype(np.uint8),
        crs=UTM,
        transform=UTM_TRANSFORM,
        tags={**tags("town", model), **extra},
        **TILED,
    )


def _truth(path: Path) -> Path:
    """The two houses, each on its own."""
    return square_footprints(path, HOUSES)


def _layers(probs: Path, out: Path, **given: Any) -> tuple[Any, Any]:
    options = VectorizeOptions(min_area_m2=0, simplify_m=0, regularize=False, **given)
    outs = vectorize_prediction(probs, out, options)
    buildings = pyogrio.read_dataframe(outs.layers["buildings"].paths["geojson"])
    roads = pyogrio.read_dataframe(outs.layers["roads"].paths["geojson"])
    return buildings, roads


def test_a_building_threshold_parts_houses_and_leaves_roads_alone(tmp_path: Path) -> None:
    probs = _scene(tmp_path)
    buildings, roads = _layers(probs, tmp_path / "plain")
    assert len(buildings) == 1 and len(roads) == 1  # the yard joins the houses
    buildings, roads = _layers(probs, tmp_path / "own", building_threshold=0.6)
    assert len(buildings) == 2 and len(roads) == 1
    # each house whole (10 x 10 m), nothing of the yard (to the coordinates' rounding)
    assert np.allclose(buildings.to_crs(UTM).area, 100.0, atol=0.1)
    # the vectorizer's threshold at 0.6 would have lost the road too
    buildings, roads = _layers(probs, tmp_path / "all", threshold=0.6)
    assert len(buildings) == 2 and len(roads) == 0


def test_a_models_building_threshold_is_used_unless_a_user_gives_one(tmp_path: Path) -> None:
    probs = _scene(tmp_path, GEOSEG_VECTORIZE='{"building_threshold": 0.6}')
    assert len(_layers(probs, tmp_path / "model")[0]) == 2
    assert len(_layers(probs, tmp_path / "user", building_threshold=0.5)[0]) == 1
    args = ["vectorize", str(probs), "-o", str(tmp_path / "cli"), "--min-area", "0"]
    res = CliRunner().invoke(cli, [*args, "--building-threshold", "0.5"])
    assert res.exit_code == 0, res.output
    assert "buildings: 1 features" in res.output
    res = CliRunner().invoke(cli, [*args, "--building-threshold", "0"])
    assert res.exit_code != 0


def test_tune_chooses_a_building_threshold_and_writes_it(tmp_path: Path, make_bundle: Any) -> None:
    src = make_bundle()
    bundle = tmp_path / "model"
    shutil.copytree(src.path, bundle)
    probs = _scene(tmp_path, model=src.ident)
    truth = _truth(tmp_path / "truth.gpkg")
    args = ["model", "tune", str(bundle), "--scene", str(probs), str(truth), "--min-area", "2"]
    args += ["--valley", "0", "--write"]
    # only the vectorizer's own threshold tried: the model's setting is left unset
    res = CliRunner().invoke(cli, [*args, "--building-threshold", "0.5"])
    assert res.exit_code == 0, res.output
    written = load_bundle(bundle).spec.vectorize
    assert written is not None and written.building_threshold is None
    report = tmp_path / "tune.json"
    res = CliRunner().invoke(cli, [*args, "--building-threshold", "0.5,0.6", "--json", str(report)])
    assert res.exit_code == 0, res.output
    rows = {r["building_threshold"]: r for r in json.loads(report.read_text())["rows"]}
    assert (rows[0.5]["tp"], rows[0.5]["fp"], rows[0.5]["fn"]) == (0, 1, 2)
    assert (rows[0.6]["tp"], rows[0.6]["fp"], rows[0.6]["fn"]) == (2, 0, 0)
    written = load_bundle(bundle).spec.vectorize
    assert written is not None and written.settings()["building_threshold"] == 0.6
    assert load_bundle(bundle).sha256 == src.sha256


#: ``PIPELINE``'s hash before building_threshold existed.
BEFORE = "fd944b2ad4a497428eea2d513f6c4fa5bc84fa3b8f4f9f8456a311ddd9d1d8a1"


def test_pipelines_take_a_building_threshold_and_keep_their_hash_without() -> None:
    plain = parse_pipeline(PIPELINE, "p.yml")
    own = parse_pipeline(PIPELINE + "vectorize: {building_threshold: 0.6}\n", "p.yml")
    assert own.vectorize_options().building_threshold == 0.6
    assert plain.vectorize_options().building_threshold is None
    # pipelines without one keep the hash they had before the setting existed; one changes it
    assert plain.config_hash() == BEFORE
    assert own.config_hash() != BEFORE
