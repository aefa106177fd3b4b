"""Training across datasets: partial labels, contact zones, chips at the model's GSD, hold-outs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import box

from geoseg.errors import ConfigError
from geoseg.io.raster import open_scene
from geoseg.models.bundle import load_bundle
from geoseg.train.chips import read_resampled, virtual_grid
from geoseg.train.config import parse_config
from geoseg.train.dataset import prepare
from geoseg.train.labels import contact_zone
from geoseg.train.loop import train
from geoseg.train.step import PartialLoss, chip_tensors, random_chips

from .test_train import ORIGIN, _labels, _scene, tiny_model

CLASSES = ["background", "building", "road", "building_contact"]


def test_unlabelled_class_is_never_taught_as_background() -> None:
    """On an unburned pixel of a buildings-only chip, raising the road logit never costs."""
    logits = torch.tensor([[0.5, -1.0, 0.2, -2.0]])[:, :, None, None].repeat(1, 1, 2, 2)
    y = torch.zeros((1, 2, 2), dtype=torch.long)
    loss = PartialLoss(0.0)
    partial = torch.tensor([[False, False, True, False]])  # road unknown here

    grads = {}
    for name, unknown in (("partial", partial), ("full", None)):
        x = logits.clone().requires_grad_(True)
        loss(x, y, unknown).backward()
        assert x.grad is not None
        grads[name] = x.grad[0, :, 0, 0]
    assert grads["partial"][2] <= 0  # road is pushed up or left alone, never down
    assert grads["full"][2] > 0  # a fully labelled chip teaches "not road"
    # the loss is -log(p_background + p_road) on such pixels
    p = torch.softmax(logits[0, :, 0, 0], 0)
    expect = -torch.log(p[0] + p[2])
    assert float(loss(logits, y, partial)) == pytest.approx(float(expect), rel=1e-5)
    # labelled pixels keep plain cross-entropy
    y1 = torch.ones((1, 2, 2), dtype=torch.long)
    assert float(loss(logits, y1, partial)) == pytest.approx(float(-torch.log(p[1])), rel=1e-5)


def test_dice_skips_classes_a_chip_does_not_label() -> None:
    """Chip 0 labels every class and is predicted perfectly; chip 1's scene does not label
    roads, and the model calls all of chip 1 road. Dice must ignore chip 1's road (unknown
    there) and its background (which may be road): the loss stays chip 0's, about 0. Counting
    every class on every chip would give road and background a Dice of 0.5 each."""
    logits = torch.full((2, 3, 4, 4), -10.0)
    y = torch.zeros((2, 4, 4), dtype=torch.long)
    y[0, :2] = 2  # chip 0: road in its top half, background below
    logits[0, 2, :2] = 10.0
    logits[0, 0, 2:] = 10.0
    logits[1, 2] = 10.0  # chip 1: road everywhere, unknown there
    unknown = torch.tensor([[False, False, False], [False, False, True]])
    dice_only = float(PartialLoss(1.0)(logits, y, unknown)) - float(
        PartialLoss(0.0)(logits, y, unknown)
    )
    assert abs(dice_only) < 0.01, dice_only
    alone = float(PartialLoss(1.0)(logits[:1], y[:1], unknown[:1]))
    assert float(PartialLoss(1.0)(logits, y, unknown)) == pytest.approx(alone, abs=0.01)
    # chip 1's confident road is unknown there: its cross-entropy does not punish it either
    assert float(PartialLoss(0.0)(logits[1:], y[1:], unknown[1:])) < 0.01


def test_contact_zone_marks_shared_walls_only() -> None:
    ids = np.zeros((20, 30), np.int32)
    ids[2:10, 2:10] = 1
    ids[2:10, 10:18] = 2  # shares a wall with 1
    ids[12:18, 22:28] = 3  # alone
    zone = contact_zone(ids, 1)
    assert zone[2:10, 9:11].all()
    assert not zone[:, 20:].any()
    assert not zone[2:10, 2:8].any() and not zone[2:10, 12:18].any()


def test_contact_class_is_burned_between_touching_buildings(tmp_path: Path) -> None:
    raw = _partial_config(tmp_path)
    x0, y0 = ORIGIN
    touching = [box(x0 + 10, y0 - 30, x0 + 20, y0 - 10), box(x0 + 20, y0 - 30, x0 + 30, y0 - 10)]
    path = tmp_path / "touching.geojson"
    gpd.GeoDataFrame(geometry=touching, crs="EPSG:32616").to_crs("EPSG:4326").to_file(path)
    raw["scenes"][0]["labels"][0]["path"] = str(path)
    raw["scenes"][0].pop("holdout")
    raw["chips"] = {"size": 32, "stride": 16, "block": 64, "val_fraction": 0.34}
    prep = prepare(parse_config(raw, "t"))
    y = prep.chips.labels[0].burn(Window(0, 0, 40, 40))
    assert (y[12:28, 19:21] == 3).all()  # the shared wall
    assert (y[12:28, 12:17] == 1).all() and (y[12:28, 23:28] == 1).all()
    assert prep.chips.labels[0].labelled == frozenset({1, 3})


def _partial_config(tmp: Path) -> dict[str, Any]:
    """Scene A labels buildings (and contacts) only, scene B (a copy) roads only."""
    a = _scene(tmp / "a.tif")
    b_img = _scene(tmp / "b.tif")
    buildings, roads = _labels(tmp)
    return {
        "model": {**tiny_model(), "name": "partial", "classes": CLASSES},
        "scenes": [
            {
                "image": str(a),
                "labels": [
                    {
                        "kind": "vector",
                        "path": str(buildings),
                        "class": "building",
                        "contact_class": "building_contact",
                    }
                ],
                "holdout": {"x": [0.0, 0.4], "y": [0.6, 1.0]},
            },
            {
                "image": str(b_img),
                "labels": [{"kind": "vector", "path": str(roads), "class": "road", "width_m": 6}],
                "holdout": {"x": [0.6, 1.0]},
                "weight": 2.0,
            },
        ],
        "chips": {"size": 32, "sampling": "random", "chips_per_epoch": 16, "scale_jitter": 0.2},
        "optim": {"epochs": 1, "batch_size": 8, "seed": 0, "device": "cpu", "threads": 1},
        "out": str(tmp / "model"),
    }


def test_random_chips_avoid_the_holdout_and_labels_are_partial(tmp_path: Path) -> None:
    cfg = parse_config(_partial_config(tmp_path), "t")
    prep = prepare(cfg)
    assert prep.chips.labels[0].labelled == frozenset({1, 3})
    assert prep.chips.labels[1].labelled == frozenset({2})
    val = prep.chips.split("val")
    assert val and not prep.chips.split("train")
    for chip in val:
        held = prep.holdouts[chip.scene]
        assert held is not None
        assert held.col_off <= chip.window.col_off
        assert chip.window.col_off + chip.window.width <= held.col_off + held.width
    chips = random_chips(cfg, prep, 0)
    assert len(chips) == 16 and {c.scene for c in chips} <= {0, 1}
    sides = {int(c.window.width) for c in chips}
    assert min(sides) >= 27 and max(sides) <= 38 and len(sides) > 1
    for chip in chips:
        held = prep.holdouts[chip.scene]
        w = chip.window
        assert held is not None
        inside = (
            w.col_off < held.col_off + held.width
            and held.col_off < w.col_off + w.width
            and w.row_off < held.row_off + held.height
            and held.row_off < w.row_off + w.height
        )
        assert not inside
    assert random_chips(cfg, prep, 0) == chips  # seeded
    x, y, unknown = chip_tensors(prep, chips[:4], torch.device("cpu"), 32)
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 32, 32)
    for chip, row in zip(chips[:4], unknown.tolist(), strict=True):
        expect = [False, False, True, False] if chip.scene == 0 else [False, True, False, True]
        assert row == expect


def test_random_sampling_needs_a_holdout(tmp_path: Path) -> None:
    raw = _partial_config(tmp_path)
    for s in raw["scenes"]:
        s.pop("holdout")
    with pytest.raises(ConfigError, match="holdout"):
        parse_config(raw, "t")
    raw = _partial_config(tmp_path)
    raw["scenes"][0]["classes"] = ["building", "tree"]
    with pytest.raises(ConfigError, match="tree"):
        parse_config(raw, "t")


def _mercator_scene(path: Path, lat: float, res: float) -> Path:
    """A uint8 RGB scene in EPSG:3857 at latitude ``lat``: ``res`` CRS units per pixel."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, lat)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (3, 96, 128), dtype=np.uint8)
    profile = dict(
        driver="GTiff",
        width=128,
        height=96,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(x, y, res, res),
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_chips_are_read_at_the_models_ground_resolution(tmp_path: Path) -> None:
    """At 60° N a Web Mercator metre is half a ground metre: 0.6 units = 0.3 m on the ground."""
    scene = open_scene(_mercator_scene(tmp_path / "m.tif", 60.0, 0.6))
    assert scene.gsd_m == pytest.approx(0.3, rel=0.01)
    assert virtual_grid(scene, 0.3) is None  # within tolerance: read as it is
    grid = virtual_grid(scene, 0.6)
    assert grid is not None and (grid.width, grid.height) == (64, 48)
    data, valid = read_resampled(scene, grid, Window(8, 4, 16, 8), [1, 2, 3])
    with rasterio.open(scene.path) as src:
        full = src.read().astype(np.float64)
    block = full[:, 8:24, 16:48].reshape(3, 8, 2, 16, 2).mean(axis=(2, 4))
    assert data.shape == (3, 8, 16) and valid.all()
    assert np.abs(data.astype(np.float64) - block).max() <= 1.0  # 2x2 averages, rounded


def test_partial_training_runs_end_to_end_and_records_its_start(tmp_path: Path) -> None:
    raw = _partial_config(tmp_path)
    raw["model"]["gsd_m"] = 2.0  # the 1 m scenes are read at 2 m
    raw["chips"]["size"] = 32
    raw["model"]["encoder_weights"] = None
    res = train(parse_config(copy.deepcopy(raw), "t"))
    bundle = load_bundle(tmp_path / "model")
    assert bundle.spec.gsd_m == 2.0 and bundle.spec.classes == CLASSES
    assert bundle.spec.encoder_weights is None
    assert set(res.history[0].val_iou) == set(CLASSES)
    # float16 storage halves the weights and still loads
    raw["weights_dtype"] = "float16"
    raw["out"] = str(tmp_path / "model16")
    train(parse_config(raw, "t"), restart=True)
    half = load_bundle(tmp_path / "model16")
    size16 = half.weights_path.stat().st_size
    assert size16 < 0.6 * bundle.weights_path.stat().st_size
    from geoseg.models.bundle import load_module

    load_module(half)


def test_line_labels_are_buffered_on_the_virtual_grid(tmp_path: Path) -> None:
    raw = _partial_config(tmp_path)
    raw["model"]["gsd_m"] = 2.0
    prep = prepare(parse_config(raw, "t"))
    lab = prep.chips.labels[1]
    assert (lab.scene.width, lab.scene.height) == (96, 80)
    y = lab.burn(Window(0, 0, 96, 80))
    rows = np.flatnonzero((y == 2).any(axis=1))
    # a 6 m wide road at y = 73 m is 3 px of 2 m around row 36.5
    assert rows.min() >= 34 and rows.max() <= 38
