"""The valley cut: touching buildings told apart where the building probability dips along a
shared wall that the contact class misses, the same in tiles as in one piece."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import predict_scene
from geoseg.io.raster import open_scene
from geoseg.pipeline.config import parse_pipeline
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.conftest import write_tif
from tests.test_model_vectorize import PIPELINE
from tests.test_predict import IdentityFactory
from tests.test_vectorize_stream import features, probability_scene
from tests.vectorize_helpers import TILED, UTM, UTM_TRANSFORM, tags


def _terrace(tmp: Path, model: str = "m@0123456789ab") -> Path:
    """Three 20 px (10 m) houses in a row at 0.5 m, sharing walls one pixel wide where the
    building probability dips from 0.9 to 0.7: still a building at the 0.5 threshold, and no
    contact class to split them. A detached house beside them has no dip."""
    building = np.zeros((60, 120), np.float32)
    building[20:40, 10:70] = 0.9
    building[20:40, 30] = 0.7
    building[20:40, 50] = 0.7
    building[20:40, 85:105] = 0.9
    probs = np.stack([1 - building, building, np.zeros_like(building)])
    path = tmp / "terrace.probs.tif"
    return write_tif(
        path,
        np.round(probs * 255).astype(np.uint8),
        crs=UTM,
        transform=UTM_TRANSFORM,
        tags=tags("terrace", model),
        **TILED,
    )


def _buildings(probs: Path, out: Path, **given: Any) -> Any:
    options = VectorizeOptions(layers={"building": "polygons"}, min_area_m2=0, **given)
    outs = vectorize_prediction(probs, out, options)
    return pyogrio.read_dataframe(outs.layers["buildings"].paths["geojson"])


def test_a_dip_along_a_shared_wall_splits_touching_buildings(tmp_path: Path) -> None:
    probs = _terrace(tmp_path)
    assert len(_buildings(probs, tmp_path / "off")) == 2
    split = _buildings(probs, tmp_path / "on", valley_m=2.0)
    assert len(split) == 4
    # only the walls are cut: each house keeps its 19-20 px wide footprint (about 100 m²)
    areas = sorted(split.to_crs(UTM).area)
    assert areas[0] > 85 and areas[-1] <= 100.5
    # a dip shallower than the depth asked for stays
    assert len(_buildings(probs, tmp_path / "deep", valley_m=2.0, valley_depth=0.3)) == 2
    # a wider square finds the same walls, and nothing else (the houses are rectangles)
    assert len(_buildings(probs, tmp_path / "wide", valley_m=5.0)) == 4


def _field(tmp: Path, seed: int = 0) -> Path:
    """Smooth random building probabilities: blobs with dips of every depth and width."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(230, 300)), 3)
    building = np.clip(0.5 + noise / noise.std() * 0.25, 0, 1)
    probs = np.stack([1 - building, building, np.zeros_like(building)])
    return write_tif(
        tmp / "field.probs.tif",
        np.round(probs * 255).astype(np.uint8),
        crs=UTM,
        transform=UTM_TRANSFORM,
        tags=tags("field"),
        **TILED,
    )


@pytest.mark.parametrize("chunk", [64, 100])
def test_the_valley_cut_is_the_same_in_tiles_as_in_one_piece(tmp_path: Path, chunk: int) -> None:
    probs = _field(tmp_path)
    opts: dict[str, Any] = {
        "layers": {"building": "polygons"},
        "min_area_m2": 0,
        "valley_m": 3.0,
        "valley_depth": 0.05,
    }
    whole = vectorize_prediction(probs, tmp_path / "whole", VectorizeOptions(**opts, chunk=2048))
    tiled = vectorize_prediction(
        probs, tmp_path / "tiled", VectorizeOptions(**opts, chunk=chunk, workers=1)
    )
    plain = vectorize_prediction(
        probs, tmp_path / "plain", VectorizeOptions(**{**opts, "valley_m": 0.0}, chunk=2048)
    )
    a = whole.layers["buildings"].paths["geojson"]
    b = tiled.layers["buildings"].paths["geojson"]
    assert features(a) == features(b)
    assert whole.counts["buildings"] > plain.counts["buildings"] + 10  # the cut did cut


def test_streamed_vectors_with_the_valley_cut_equal_those_of_the_finished_raster(
    tmp_path: Path, make_bundle: Any
) -> None:
    """The polygon tasks made while a scene is predicted wait for the chunks their valley cut
    reads around them."""
    scene = probability_scene(tmp_path / "scene.tif", 700, 600)
    bundle = make_bundle(classes=["background", "building", "road"])
    options = PredictOptions(device="cpu", precision="fp32", chunk=128, halo=16)
    vectorize = VectorizeOptions(
        chunk=128, halo=32, workers=1, valley_m=4.0, valley_depth=0.1, min_area_m2=0
    )
    with open_client(options) as client:
        out = predict_scene(
            open_scene(scene),
            bundle,
            tmp_path / "out",
            options,
            client,
            factory=IdentityFactory("stream"),
            vectorize=vectorize,
        )
    assert out.vectors is not None and out.vectors.counts["buildings"] > 50
    assert out.probs is not None
    again = vectorize_prediction(out.probs, tmp_path / "again", vectorize)
    assert again.counts == out.vectors.counts
    path = out.vectors.paths["buildings"]["geojson"]
    assert features(path) == features(again.paths["buildings"]["geojson"])


def test_cli_and_pipelines_take_the_valley_cut(tmp_path: Path) -> None:
    probs = _terrace(tmp_path)
    args = ["vectorize", str(probs), "-o", str(tmp_path / "o"), "--min-area", "0"]
    res = CliRunner().invoke(cli, [*args, "--valley", "2"])
    assert res.exit_code == 0, res.output
    assert "buildings: 4 features" in res.output
    res = CliRunner().invoke(cli, [*args, "--valley", "2", "--valley-depth", "0.3"])
    assert "buildings: 2 features" in res.output
    # merged footprints asked for: no cut either
    res = CliRunner().invoke(cli, [*args, "--valley", "2", "--merge-touching"])
    assert "buildings: 2 features" in res.output
    # a mask alone has no probabilities to find dips in: said, and left uncut
    (tmp_path / "m").mkdir()
    mask = write_tif(
        tmp_path / "m" / "terrace.mask.tif",
        _ids(probs)[None],
        crs=UTM,
        transform=UTM_TRANSFORM,
        nodata=255,
        tags=tags("terrace"),
        **TILED,
    )
    res = CliRunner().invoke(
        cli,
        ["vectorize", str(mask), "-o", str(tmp_path / "mo"), "--min-area", "0", "--valley", "2"],
    )
    assert res.exit_code == 0, res.output
    assert "buildings: 2 features" in res.output and "valley_m needs the class probabilities" in (
        res.output
    )

    plain = parse_pipeline(PIPELINE, "p.yml")
    depth_alone = parse_pipeline(PIPELINE + "vectorize: {valley_depth: 0.3}\n", "p.yml")
    cut = parse_pipeline(PIPELINE + "vectorize: {valley_m: 2}\n", "p.yml")
    # pipelines without the cut keep their hash; the cut changes it
    assert plain.config_hash() == depth_alone.config_hash() != cut.config_hash()


def _ids(probs: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(probs) as src:
        return np.asarray(src.read().argmax(axis=0), np.uint8)


def test_tune_chooses_a_valley_cut_and_keeps_the_models_when_none_is_tried(
    tmp_path: Path, make_bundle: Any
) -> None:
    import shutil

    import geopandas as gpd
    from shapely.geometry import box

    from geoseg.models.bundle import load_bundle

    src = make_bundle()
    bundle = tmp_path / "model"
    shutil.copytree(src.path, bundle)
    probs = _terrace(tmp_path, model=src.ident)
    x0, y0 = UTM_TRANSFORM.c, UTM_TRANSFORM.f  # 0.5 m pixels: houses at columns 10-30, ...
    houses = [(10, 30), (31, 50), (51, 70), (85, 105)]
    truth = gpd.GeoDataFrame(
        geometry=[box(x0 + a * 0.5, y0 - 40 * 0.5, x0 + b * 0.5, y0 - 20 * 0.5) for a, b in houses],
        crs=UTM,
    )
    truth.to_file(tmp_path / "truth.gpkg")
    args = ["model", "tune", str(bundle), "--scene", str(probs), str(tmp_path / "truth.gpkg")]
    # at the vectorizer's threshold: a building threshold of 0.7 would cut these 0.7 walls alone
    args += ["--building-threshold", "0.5"]
    res = CliRunner().invoke(cli, [*args, "--min-area", "10", "--valley", "0,2", "--write"])
    assert res.exit_code == 0, res.output
    assert "2 / 0.1" in res.output
    chosen = load_bundle(bundle).spec.vectorize
    assert chosen is not None and chosen.settings() == {
        "min_area_m2": 10.0,
        "valley_m": 2.0,
        "valley_depth": 0.1,
    }
    assert "F1 1.000" in chosen.chosen_on
    # a tune that tries no valley cut leaves the model's as it was
    res = CliRunner().invoke(cli, [*args, "--min-area", "20", "--valley", "0", "--write"])
    assert res.exit_code == 0, res.output
    kept = load_bundle(bundle).spec.vectorize
    assert kept is not None and (kept.min_area_m2, kept.valley_m) == (20.0, 2.0)
