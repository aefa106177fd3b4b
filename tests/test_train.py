"""Training: labels onto chips, spatial split, shared normalization with predict, loss, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import LineString, box

from geoseg.cli import cli
from geoseg.errors import ConfigError, InputError
from geoseg.io.raster import open_scene
from geoseg.io.reader import read_padded
from geoseg.models.bundle import load_bundle
from geoseg.train.chips import chip_windows, load_chip, split_regions
from geoseg.train.config import load_config, parse_config
from geoseg.train.dataset import prepare
from geoseg.train.labels import IGNORE, load_scene_labels
from geoseg.train.loop import EpochReport, train

DATA = Path(__file__).resolve().parents[1] / "data_samples"
ORIGIN = (733600.0, 3725200.0)  # UTM 16N, metres
W, H = 192, 160


def _scene(path: Path) -> Path:
    """A 1 m uint8 scene: bright buildings, a mid-grey road, nodata in the top-left corner."""
    rng = np.random.default_rng(0)
    img = rng.normal(60, 8, (H, W)).clip(1, 255)
    for r, c in [(20, 100), (90, 30), (100, 130), (40, 160), (120, 80)]:
        img[r : r + 14, c : c + 18] = rng.normal(200, 8, (14, 18)).clip(1, 255)
    img[70:76, :] = rng.normal(130, 6, (6, W)).clip(1, 255)
    img[:40, :40] = 0
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=W,
        height=H,
        count=1,
        dtype="uint8",
        crs="EPSG:32616",
        transform=from_origin(*ORIGIN, 1.0, 1.0),
        nodata=0,
        tiled=True,
        blockxsize=64,
        blockysize=64,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(img.astype(np.uint8), 1)
    return path


def _labels(tmp: Path) -> tuple[Path, Path]:
    x0, y0 = ORIGIN
    buildings = [
        box(x0 + c, y0 - r - 14, x0 + c + 18, y0 - r)
        for r, c in [(20, 100), (90, 30), (100, 130), (40, 160), (120, 80)]
    ]
    b = tmp / "buildings.geojson"  # stored in EPSG:4326, as GeoJSON must be
    gpd.GeoDataFrame(geometry=buildings, crs="EPSG:32616").to_crs("EPSG:4326").to_file(b)
    road = tmp / "roads.gpkg"
    line = LineString([(x0 - 5, y0 - 73), (x0 + W + 5, y0 - 73)])
    gpd.GeoDataFrame(geometry=[line], crs="EPSG:32616").to_file(road)
    return b, road


def tiny_model() -> dict[str, Any]:
    """The model section of a small, fast training config (1-band uint8, 3 classes)."""
    return {
        "name": "tiny",
        "encoder": "tu-resnet18",
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 8],
        "bands": [1],
        "dtype": "uint8",
        "normalization": {"scale": 255},
        "classes": ["background", "building", "road"],
        "chunk": 64,
        "halo": 16,
    }


def _config(tmp: Path, **optim: Any) -> dict[str, Any]:
    scene = _scene(tmp / "scene.tif")
    b, road = _labels(tmp)
    return {
        "model": tiny_model(),
        "scenes": [
            {
                "image": str(scene),
                "labels": [
                    {"kind": "vector", "path": str(road), "class": "road", "width_m": 6},
                    {"kind": "vector", "path": str(b), "class": "building"},
                ],
            }
        ],
        "chips": {"size": 32, "stride": 16, "block": 64, "val_fraction": 0.34},
        "optim": {
            "epochs": 3,
            "batch_size": 8,
            "lr": 0.01,
            "seed": 0,
            "device": "cpu",
            "threads": 1,
            **optim,
        },
        "out": str(tmp / "model"),
    }


@pytest.fixture()
def cfg_raw(tmp_path: Path) -> dict[str, Any]:
    return _config(tmp_path)


def test_regions_partition_scene_and_split_is_seeded() -> None:
    regions = split_regions(900, 900, 448, 256, 0.25, seed=3)
    cover = np.zeros((900, 900), int)
    for w, _ in regions:
        cover[
            int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)
        ] += 1
    assert (cover == 1).all()
    assert [s for _, s in regions].count("val") == 1
    assert regions == split_regions(900, 900, 448, 256, 0.25, seed=3)
    for region, _ in regions:
        for chip in chip_windows(region, 256, 128):
            assert (
                region.col_off <= chip.col_off
                and chip.col_off + 256 <= region.col_off + region.width
            )
            assert (
                region.row_off <= chip.row_off
                and chip.row_off + 256 <= region.row_off + region.height
            )


def test_validation_chips_share_no_pixels_with_training_chips(cfg_raw: dict) -> None:
    prep = prepare(parse_config(cfg_raw, "test"))
    train_px = np.zeros((H, W), bool)
    val_px = np.zeros((H, W), bool)
    for c in prep.chips.chips:
        w = c.window
        target = train_px if c.split == "train" else val_px
        target[
            int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)
        ] = True
    assert train_px.any() and val_px.any()
    assert not (train_px & val_px).any()
    assert prep.chips.skipped >= 1  # the all-nodata corner chip


def test_labels_are_burned_from_reprojected_vectors(cfg_raw: dict) -> None:
    cfg = parse_config(cfg_raw, "test")
    scene = open_scene(cfg.scenes[0].image)
    labels = load_scene_labels(cfg.scenes[0], scene, cfg.model.classes)
    y = labels.burn(Window(0, 0, W, H))
    assert (y[20:34, 100:118] == 1).all()  # building, from EPSG:4326 GeoJSON
    assert (y[71:75, 50] == 2).all() and y[66, 50] == 0 and y[80, 50] == 0  # 6 m road on row 73
    assert ((y[:, 50] == 2).sum()) in (6, 7)
    _, y_chip = load_chip(labels, Window(0, 0, 32, 32), cfg.model)
    assert (y_chip == IGNORE).all()  # nodata corner


def test_a_training_scene_may_be_a_url(cfg_raw: dict, tmp_path: Path) -> None:
    """The same chips and labels from the scene served over HTTP as from the file."""
    from tests.http_support import serve

    local = parse_config(cfg_raw, "test", tmp_path)
    with serve(tmp_path) as server:
        raw = json.loads(json.dumps(cfg_raw))
        raw["scenes"][0]["image"] = f"{server.url}/scene.tif"
        cfg = parse_config(raw, "test", tmp_path)  # a URL is not made relative to the file
        assert cfg.scenes[0].image == f"{server.url}/scene.tif"
        a, b = prepare(local), prepare(cfg)
        assert [c.window for c in a.chips.chips] == [c.window for c in b.chips.chips]
        scene = open_scene(cfg.scenes[0].image)
        labels = load_scene_labels(cfg.scenes[0], scene, cfg.model.classes)
        x, y = load_chip(labels, Window(64, 64, 32, 32), cfg.model)
        ref = load_scene_labels(
            local.scenes[0], open_scene(local.scenes[0].image), cfg.model.classes
        )
        x_ref, y_ref = load_chip(ref, Window(64, 64, 32, 32), cfg.model)
        assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


def test_road_width_is_metric_on_a_geographic_scene(tmp_path: Path) -> None:
    scene_path = DATA / "road_mask_input.tif"
    raw = {
        "model": {"bands": [1], "dtype": "uint16", "normalization": {"scale": 2047}},
        "scenes": [
            {
                "image": str(scene_path),
                "labels": [
                    {
                        "kind": "vector",
                        "path": str(DATA / "sample_roads_for_masking.geojson"),
                        "class": "road",
                        "width_m": 6,
                    },
                ],
            }
        ],
        "out": str(tmp_path / "m"),
    }
    cfg = parse_config(raw, "test")
    scene = open_scene(scene_path)
    y = load_scene_labels(cfg.scenes[0], scene, cfg.model.classes).burn(Window(0, 0, 1300, 1300))
    length_m = (
        gpd.read_file(DATA / "sample_roads_for_masking.geojson").to_crs("EPSG:32611").length.sum()
    )
    pixel_m2 = (scene.res[0] * 111_320 * np.cos(np.radians(36.14))) * (scene.res[1] * 110_950)
    width_m = (y == 2).sum() * pixel_m2 / length_m
    assert 4.5 < width_m < 6.5  # clipped ends and overlaps make it a little under 6 m


def test_raster_labels_match_vector_labels(tmp_path: Path) -> None:
    raw = {
        "model": {"bands": [1], "dtype": "uint16", "normalization": {"scale": 2047}},
        "scenes": [
            {
                "image": str(DATA / "road_mask_input.tif"),
                "labels": [
                    {
                        "kind": "raster",
                        "path": str(DATA / "sample_road_raster_mask.tif"),
                        "values": {255: "road"},
                    },
                ],
            }
        ],
        "out": str(tmp_path / "m"),
    }
    cfg = parse_config(raw, "test")
    labels = load_scene_labels(
        cfg.scenes[0], open_scene(DATA / "road_mask_input.tif"), cfg.model.classes
    )
    window = Window(450, 0, 400, 400)
    y = labels.burn(window)
    with rasterio.open(DATA / "sample_road_raster_mask.tif") as src:
        expected = src.read(1, window=window) == 255
    assert ((y == 2) == expected).all() and expected.any()


def test_label_file_with_inconsistent_crs_is_refused(cfg_raw: dict, tmp_path: Path) -> None:
    x0, y0 = ORIGIN
    bad = tmp_path / "utm_coordinates.geojson"  # GeoJSON means degrees, but these are metres
    bad.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": box(x0 + 10, y0 - 30, x0 + 30, y0 - 10).__geo_interface__,
                    }
                ],
            }
        )
    )
    cfg_raw["scenes"][0]["labels"] = [{"kind": "vector", "path": str(bad), "class": "building"}]
    with pytest.raises(InputError, match="utm_coordinates.geojson.*not degrees"):
        prepare(parse_config(cfg_raw, "test"))


def test_labels_elsewhere_are_refused(cfg_raw: dict, tmp_path: Path) -> None:
    far = tmp_path / "far.gpkg"
    gpd.GeoDataFrame(geometry=[box(0, 0, 10, 10)], crs="EPSG:32616").to_file(far)
    cfg_raw["scenes"][0]["labels"] = [{"kind": "vector", "path": str(far), "class": "building"}]
    with pytest.raises(InputError, match="none of its 1 features overlap"):
        prepare(parse_config(cfg_raw, "test"))


def test_config_typos_fail_loudly(cfg_raw: dict, tmp_path: Path) -> None:
    cfg_raw["optim"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(cfg_raw, "test")
    p = tmp_path / "c.yml"
    p.write_text("model: {classes: [background, road]}\nscenes: []\nout: m\n")
    with pytest.raises(ConfigError, match="scenes"):
        load_config(p)


def test_normalization_statistics_are_per_scene_band_not_per_chip(cfg_raw: dict) -> None:
    prep = prepare(parse_config(cfg_raw, "test"))
    with rasterio.open(cfg_raw["scenes"][0]["image"]) as src:
        data = src.read(1)
    valid = data[data > 0] / 255.0
    assert prep.spec.normalization.mean == [pytest.approx(valid.mean(), abs=1e-5)]
    assert prep.spec.normalization.std == [pytest.approx(valid.std(), abs=1e-5)]
    assert prep.spec.gsd_m == pytest.approx(1.0, rel=1e-3)  # UTM scale factor: ground metres


def test_training_reduces_loss_and_its_bundle_predicts_with_the_same_normalization(
    cfg_raw: dict, tmp_path: Path
) -> None:
    import torch

    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene
    from geoseg.models.bundle import load_module
    from geoseg.train.chips import load_chip

    reports: list[EpochReport] = []
    result = train(parse_config(cfg_raw, "test"), on_epoch=reports.append)
    assert len(reports) == 3
    assert reports[-1].train_loss < reports[0].train_loss
    bundle = load_bundle(cfg_raw["out"])
    spec = bundle.spec
    assert spec.normalization.mean and spec.normalization.std
    assert spec.gsd_m == pytest.approx(1.0, rel=1e-3)
    assert result.bundle.sha256 == bundle.sha256

    scene = open_scene(cfg_raw["scenes"][0]["image"])
    prep = prepare(parse_config(cfg_raw, "test"))
    assert prep.spec.normalization == spec.normalization
    # predict one whole-scene chunk, and compare with the module on the training chip
    options = PredictOptions(chunk=W, halo=0, device="cpu", precision="fp32", workers=1)
    with open_client(options) as client:
        out = predict_scene(scene, bundle, tmp_path / "pred", options, client)
    window = Window(0, 0, W, H)
    x, _ = load_chip(prep.chips.labels[0], window, spec)
    data, valid = read_padded(scene, window, spec.bands)
    assert np.array_equal(x, spec.normalization.apply(data, valid))
    with torch.no_grad():
        probs = torch.softmax(load_module(bundle)(torch.from_numpy(x[None])), 1)[0].numpy()
    with rasterio.open(out.probs) as src:
        written = src.read()
    expected = np.rint(probs * 255).astype(np.uint8)
    expected[:, ~valid] = 0
    assert np.abs(written.astype(int) - expected).max() <= 1


def test_resume_after_interruption_gives_identical_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (tmp_path / "a").mkdir()
    a = _config(tmp_path / "a", epochs=2)
    train(parse_config(a, "a"))

    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = _config(b_dir, epochs=2)

    class Stop(Exception):
        pass

    def stop(report: EpochReport) -> None:
        raise Stop

    with pytest.raises(Stop):
        train(parse_config(b, "b"), on_epoch=stop)
    state = json.loads((b_dir / "model.checkpoint" / "state" / "state.json").read_text())
    assert state["epoch"] == 0
    resumed = train(parse_config(b, "b"))
    assert resumed.resumed_from == 1
    assert [h.epoch for h in resumed.history] == [0, 1]
    wa = load_file(str(tmp_path / "a" / "model.checkpoint" / "state" / "weights.safetensors"))
    wb = load_file(str(b_dir / "model.checkpoint" / "state" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    raw = _config(tmp_path, epochs=1)
    train(parse_config(raw, "x"))
    raw["optim"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="different training config"):
        train(parse_config(raw, "x"))


def test_cli_train_from_yaml(tmp_path: Path) -> None:
    raw = _config(tmp_path, epochs=1)
    raw["out"] = "model-out"  # relative to the config file
    cfg = tmp_path / "train.yml"
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "best epoch 1" in res.output
    assert load_bundle(tmp_path / "model-out").spec.name == "tiny"
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "missing.yml")])
    assert res.exit_code == 2 and "cannot read config" in res.output


def test_demo_config_is_valid() -> None:
    cfg = load_config(DATA / "train.yml")
    assert cfg.model.bands == [1, 2, 3] and cfg.model.dtype == "uint8"
    assert cfg.model.encoder_weights == "lite0-imagenet" and cfg.model.gsd_m == 0.3
    assert cfg.out == (DATA / "model").resolve()
    labelled = [s.labelled() for s in cfg.scenes]
    assert labelled == [["building", "building_contact"], ["road"], ["road"]]
    assert all(s.holdout for s in cfg.scenes)


def test_model_halo_measures_on_a_training_configs_scenes(tmp_path: Path) -> None:
    """`geoseg model halo --samples-from CONFIG` measures on a window of each training scene,
    as `geoseg train` does after training; a config with a missing scene is refused by name."""
    from geoseg.train.loop import halo_samples

    raw = _config(tmp_path)
    config = tmp_path / "train.yml"
    config.write_text(yaml.safe_dump(raw))
    bundle = tmp_path / "bundle"
    init = ["model", "init", str(bundle), "--encoder", "tu-resnet18", "--encoder-depth", "3"]
    init += ["--decoder-channels", "16,8,8", "--bands", "1", "--dtype", "uint8", "--halo", "0"]
    init += ["--classes", "background,building,road", "--scale", "255", "--chunk", "64"]
    runner = CliRunner()
    res = runner.invoke(cli, init)
    assert res.exit_code == 0, res.output

    samples = halo_samples(load_config(config), load_bundle(bundle).spec)
    assert len(samples) == 1 and samples[0].shape == (1, 1152, 1152)
    assert samples[0].dtype == np.float32 and np.isfinite(samples[0]).all()
    assert np.ptp(samples[0]) > 0  # the scene's pixels, normalized, not an empty window

    res = runner.invoke(cli, ["model", "halo", str(bundle), "--samples-from", str(config)])
    assert res.exit_code == 0, res.output
    found = re.search(r": seamless halo (\d+) px", res.output)
    assert found, res.output
    halo = int(found.group(1))
    assert halo > 0 and halo % load_bundle(bundle).spec.stride == 0
    res = runner.invoke(
        cli, ["model", "halo", str(bundle), "--samples-from", str(config), "--write"]
    )
    assert res.exit_code == 0 and load_bundle(bundle).spec.halo == halo

    raw["scenes"][0]["image"] = str(tmp_path / "missing.tif")
    config.write_text(yaml.safe_dump(raw))
    res = runner.invoke(cli, ["model", "halo", str(bundle), "--samples-from", str(config)])
    assert res.exit_code != 0 and "missing.tif" in res.output, res.output


def test_a_config_extends_another(tmp_path: Path) -> None:
    """`extends: OTHER.yml` lays a config over another: mappings key by key, lists replaced,
    `null` clears a key, each file's relative paths taken from its own folder; the result is
    the same config as the written-out one, so a run's fingerprint does not change."""
    raw = _config(tmp_path)
    raw["snapshot"] = "snap.safetensors"
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    raw["out"] = "model"  # relative to base/
    (base_dir / "base.yml").write_text(yaml.safe_dump(raw))
    child = tmp_path / "child.yml"
    child.write_text(
        "extends: base/base.yml\n"
        "model: {name: child, halo: 32}\n"
        "optim: {epochs: 5}\n"
        "chips: {size: 48}\n"
        "snapshot: null\n"
        "checkpoint: ckpt\n"  # relative to the child's folder
    )
    cfg = load_config(child)
    assert (cfg.model.name, cfg.model.halo, cfg.model.encoder) == ("child", 32, "tu-resnet18")
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size) == (5, 0.01, 8)
    assert (cfg.chips.size, cfg.chips.stride) == (48, 16)
    assert cfg.snapshot is None
    assert cfg.out == base_dir / "model" and cfg.checkpoint == tmp_path / "ckpt"
    assert cfg.scenes[0].image == str(tmp_path / "scene.tif")
    written = dict(raw, snapshot=None, checkpoint=str(tmp_path / "ckpt"))
    written["out"] = str(base_dir / "model")
    written["model"] = {**raw["model"], "name": "child", "halo": 32}
    written["optim"] = {**raw["optim"], "epochs": 5}
    written["chips"] = {**raw["chips"], "size": 48}
    assert cfg.fingerprint() == parse_config(written, "written").fingerprint()


def test_extends_errors_name_the_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text("extends: b.yml\n")
    b.write_text("extends: a.yml\n")
    with pytest.raises(ConfigError, match=r"a\.yml: extends b\.yml: .*b\.yml: extends a\.yml"):
        load_config(a)
    a.write_text("extends: missing.yml\n")
    with pytest.raises(ConfigError, match=r"a\.yml: extends missing\.yml: .*cannot read config"):
        load_config(a)
    a.write_text("extends: [b.yml]\n")
    with pytest.raises(ConfigError, match=r"a\.yml: extends must be the path of another"):
        load_config(a)
    b.write_text("- just a list\n")
    a.write_text("extends: b.yml\n")
    with pytest.raises(ConfigError, match=r"a\.yml: extends b\.yml, which is not a mapping"):
        load_config(a)


def test_the_shipped_models_configs_extend_the_six_city_config() -> None:
    """train_cities_lite2.yml is train_cities.yml with the Lite2 encoder, and its second stage
    starts from its bundle at a third of the learning rate, for 20 epochs."""
    six = load_config(DATA / "train_cities.yml")
    lite2 = load_config(DATA / "train_cities_lite2.yml")
    second = load_config(DATA / "train_cities_lite2_finetune.yml")
    assert lite2.model.encoder == "tu-tf_efficientnet_lite2" and lite2.snapshot is None
    assert lite2.scenes == six.scenes and lite2.chips == six.chips
    assert lite2.optim == six.optim and lite2.model.classes == six.model.classes
    assert second.init == lite2.out and second.model == lite2.model
    assert (second.optim.epochs, second.optim.lr) == (20, 0.0003)
