"""Training sets as users have them: folders of PNG/JPEG chips, colour-coded masks, no
georeference, unlabelled colours, fill pixels, whole-image hold-outs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rasterio.windows import Window

from geoseg.errors import ConfigError, InputError
from geoseg.train.chips import load_chip, read_chip
from geoseg.train.config import parse_config
from geoseg.train.dataset import prepare
from geoseg.train.labels import IGNORE
from geoseg.train.loop import train
from geoseg.train.scenes import LOCAL_CRS, expand_scene, open_image, pair_paths

BUILDING, ROAD, LAND, WATER, UNLABELLED = "#3C1098", "#6EC1E4", "#8429F6", "#E2A929", "#9B9B9B"
CLASSES = ["background", "building", "road"]


def _rgb(colour: str) -> tuple[int, int, int]:
    v = int(colour[1:], 16)
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def _tile(root: Path, tile: str, name: str, size: tuple[int, int], seed: int) -> None:
    """One chip: a JPEG-free RGB PNG image (lossless, so pixel tests are exact) and its colour
    mask: land, a building block, a road strip, a patch of unlabelled pixels, and black fill
    in the top-left corner of the image."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 90, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w, 3), dtype=np.uint8)
    mask[:] = _rgb(LAND)
    img[10:30, 20:44] = rng.integers(190, 230, (20, 24, 3))
    mask[10:30, 20:44] = _rgb(BUILDING)
    img[40:46, :] = 130
    mask[40:46, :] = _rgb(ROAD)
    mask[50:56, 50:60] = _rgb(UNLABELLED)
    img[:6, :6] = 0  # off-image corner
    for folder, arr, ext in (("images", img, "png"), ("masks", mask, "png")):
        (root / tile / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / tile / folder / f"{name}.{ext}")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "chips"
    for t, tile in enumerate(("tile_1", "tile_2")):
        for i, name in enumerate(("part_001", "part_002")):
            _tile(root, tile, name, (80 + 8 * i, 72), seed=10 * t + i)
    return root


def _cfg(root: Path, tmp: Path, **scene: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image": str(root / "tile_*/images/*.png"),
        "gsd_m": 0.5,
        "labels": [
            {
                "kind": "raster",
                "path": str(root / "tile_*/masks/*.png"),
                "colors": {BUILDING: "building", ROAD: "road", LAND: "background"},
                "unlabelled": [UNLABELLED],
            }
        ],
        "holdout": {"images": "tile_2/images/*"},
    }
    base.update(scene)
    return {
        "model": {
            "name": "tiny",
            "encoder": "tu-resnet18",
            "encoder_depth": 3,
            "decoder_channels": [16, 8, 8],
            "bands": [1, 2, 3],
            "dtype": "uint8",
            "normalization": {"scale": 255},
            "classes": CLASSES,
            "chunk": 64,
            "halo": 16,
        },
        "scenes": [base],
        "chips": {"size": 32, "stride": 16, "block": 64},
        "optim": {"epochs": 1, "batch_size": 4, "lr": 0.01, "device": "cpu", "threads": 1},
        "out": str(tmp / "model"),
    }


def test_glob_pairs_images_and_masks_by_their_wildcards(folder: Path) -> None:
    pairs = pair_paths(str(folder / "tile_*/images/*.png"), str(folder / "tile_*/masks/*.png"))
    assert len(pairs) == 4
    for image, mask in pairs.items():  # same stems in two tiles: paired within the tile
        assert Path(image).parts[-3] == Path(mask).parts[-3]
        assert Path(image).stem == Path(mask).stem


def test_image_without_mask_and_mask_without_image_are_named(folder: Path) -> None:
    images, masks = str(folder / "tile_*/images/*.png"), str(folder / "tile_*/masks/*.png")
    lone = folder / "tile_1/masks/part_001.png"
    lone.rename(folder / "tile_1/masks/other.png")
    with pytest.raises(InputError, match=r"tile_1/images/part_001\.png: no label file"):
        pair_paths(images, masks)
    (folder / "tile_1/masks/other.png").rename(lone)
    (folder / "tile_2/images/part_002.png").unlink()
    with pytest.raises(InputError, match=r"tile_2/masks/part_002\.png: label file without"):
        pair_paths(images, masks)


def test_a_glob_that_matches_nothing_is_an_error_before_training(
    folder: Path, tmp_path: Path
) -> None:
    raw = _cfg(folder, tmp_path, image=str(folder / "tile_*/imgs/*.png"))
    with pytest.raises(InputError, match=r"imgs/\*\.png: the image glob matches no file"):
        prepare(parse_config(raw, "t.yml"))


def test_an_image_without_georeference_needs_gsd_m(folder: Path, tmp_path: Path) -> None:
    image = folder / "tile_1/images/part_001.png"
    with pytest.raises(InputError, match=r"part_001\.png: has no georeference; declare .*gsd_m"):
        open_image(str(image), None)
    scene = open_image(str(image), 0.5)
    assert scene.crs == LOCAL_CRS
    assert scene.gsd_m == pytest.approx(0.5)
    assert (scene.width, scene.height) == (80, 72)


def test_chip_folder_scenes_are_read_at_the_model_gsd_with_colour_classes(
    folder: Path, tmp_path: Path
) -> None:
    raw = _cfg(folder, tmp_path)
    raw["model"]["gsd_m"] = 0.25  # the images are 0.5 m: read at twice their size
    prep = prepare(parse_config(raw, "t.yml"))
    assert len(prep.chips.labels) == 4
    lab = prep.chips.labels[0]
    assert (lab.scene.width, lab.scene.height) == (160, 144)
    _, y = load_chip(lab, Window(0, 0, 160, 144), prep.spec)
    assert (y[20:60, 40:88] == 1).all()  # the building block, twice the size
    assert (y[80:92, 20:140] == 2).all()  # the road strip
    assert (y[100:112, 100:120] == IGNORE).all()  # unlabelled: ignored, not background
    assert (y[120:140, 100:150] == 0).all()  # land is background


def test_unlabelled_colours_are_ignored_never_background(folder: Path, tmp_path: Path) -> None:
    prep = prepare(parse_config(_cfg(folder, tmp_path), "t.yml"))
    _, y = load_chip(prep.chips.labels[0], Window(0, 0, 80, 72), prep.spec)
    assert (y[50:56, 50:60] == IGNORE).all()
    assert (y[60:70, 60:70] == 0).all()


def test_fill_pixels_are_ignored_by_the_loss(folder: Path, tmp_path: Path) -> None:
    prep = prepare(parse_config(_cfg(folder, tmp_path, fill=[0]), "t.yml"))
    lab = prep.chips.labels[0]
    _, valid = read_chip(lab, Window(0, 0, 80, 72), [1, 2, 3])
    assert not valid[:6, :6].any() and valid[6:, 6:].all()
    _, y = load_chip(lab, Window(0, 0, 80, 72), prep.spec)
    assert (y[:6, :6] == IGNORE).all()
    without = prepare(parse_config(_cfg(folder, tmp_path), "t.yml"))
    _, y = load_chip(without.chips.labels[0], Window(0, 0, 80, 72), without.spec)
    assert (y[:6, :6] == 0).all()  # without fill the black corner is taught as background
    # the band statistics leave the fill out too
    assert all(
        a > b
        for a, b in zip(prep.spec.normalization.mean, without.spec.normalization.mean, strict=True)
    )


def test_fill_on_a_resampled_grid_is_exact_at_the_edge(folder: Path, tmp_path: Path) -> None:
    raw = _cfg(folder, tmp_path, fill=[0, 0, 0])
    raw["model"]["gsd_m"] = 0.25
    prep = prepare(parse_config(raw, "t.yml"))
    _, valid = read_chip(prep.chips.labels[0], Window(0, 0, 40, 40), [1, 2, 3])
    assert not valid[:12, :12].any() and valid[12:, 12:].all()


def test_an_unmapped_colour_is_an_error_naming_the_file(folder: Path, tmp_path: Path) -> None:
    raw = _cfg(folder, tmp_path)
    raw["scenes"][0]["labels"][0]["unlabelled"] = []
    with pytest.raises(InputError, match=r"part_00\d\.png: colour #9B9B9B \(60 px"):
        prepare(parse_config(raw, "t.yml"))


def test_a_mask_of_another_size_is_an_error_naming_both(folder: Path, tmp_path: Path) -> None:
    mask = folder / "tile_2/masks/part_001.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(mask)
    with pytest.raises(InputError, match=r"tile_2/masks/part_001\.png: label mask is 10x10 px"):
        prepare(parse_config(_cfg(folder, tmp_path), "t.yml"))


def test_colour_keys_and_tables_are_checked_in_the_config(folder: Path, tmp_path: Path) -> None:
    raw = _cfg(folder, tmp_path)
    raw["scenes"][0]["labels"][0]["colors"] = {"red": "building"}
    with pytest.raises(ConfigError, match="'red' is not of the form '#RRGGBB'"):
        parse_config(raw, "t.yml")
    raw["scenes"][0]["labels"][0]["colors"] = {BUILDING: "building"}
    raw["scenes"][0]["labels"][0]["values"] = {255: "building"}
    with pytest.raises(ConfigError, match="either values .* or colors"):
        parse_config(raw, "t.yml")


def test_a_palette_mask_maps_its_indices_through_the_colour_map(
    folder: Path, tmp_path: Path
) -> None:
    for mask in folder.glob("tile_*/masks/*.png"):
        rgb = Image.open(mask).convert("RGB")
        rgb.quantize(colors=8, method=Image.Quantize.MEDIANCUT).save(mask)
    prep = prepare(parse_config(_cfg(folder, tmp_path), "t.yml"))
    _, y = load_chip(prep.chips.labels[0], Window(0, 0, 80, 72), prep.spec)
    assert (y[10:30, 20:44] == 1).all() and (y[40:46, :] == 2).all()
    assert (y[50:56, 50:60] == IGNORE).all()


def test_whole_images_are_held_out_by_glob(folder: Path, tmp_path: Path) -> None:
    cfg = parse_config(_cfg(folder, tmp_path), "t.yml")
    items = expand_scene(cfg.scenes[0])
    assert [i.holdout for i in items] == ["none", "none", "all", "all"]
    prep = prepare(cfg)
    splits = {i: {c.split for c in prep.chips.chips if c.scene == i} for i in range(4)}
    assert splits[2] == splits[3] == {"val"}
    assert prep.weights[2] == prep.weights[3] == 0.0
    assert prep.weights[0] + prep.weights[1] == pytest.approx(1.0)
    raw = _cfg(folder, tmp_path, holdout={"images": "tile_9/*"})
    with pytest.raises(InputError, match="matches none of its 4 image"):
        prepare(parse_config(raw, "t.yml"))


def test_a_scene_labelling_only_buildings_leaves_roads_unknown(
    folder: Path, tmp_path: Path
) -> None:
    raw = _cfg(folder, tmp_path, classes=["building"])
    raw["scenes"][0]["labels"][0]["colors"] = {
        BUILDING: "building",
        ROAD: "background",
        LAND: "background",
    }
    prep = prepare(parse_config(raw, "t.yml"))
    lab = prep.chips.labels[0]
    assert lab.labelled == frozenset({1})
    _, y = load_chip(lab, Window(0, 0, 80, 72), prep.spec)
    assert (y[40:46, :] == 0).all()  # unburned: "background or road" in the loss


def test_training_runs_on_a_chip_folder(folder: Path, tmp_path: Path) -> None:
    raw = _cfg(folder, tmp_path, fill=[0])
    raw["chips"].update(sampling="random", chips_per_epoch=8)
    result = train(parse_config(raw, "t.yml"))
    assert (tmp_path / "model" / "model.json").exists()
    assert result.val_chips > 0 and result.history[0].val_iou["building"] >= 0.0


def test_validation_iou_weighs_every_scene_the_same(folder: Path, tmp_path: Path) -> None:
    """One scene with one all-building chip (IoU 1) and one with three building-free chips
    (IoU 0) average to 0.5; pooling their pixels would give 0.25."""
    import dataclasses

    import torch

    from geoseg.train.chips import Chip
    from geoseg.train.step import PartialLoss, evaluate_chips

    prep = prepare(parse_config(_cfg(folder, tmp_path), "t.yml"))
    prep = dataclasses.replace(prep, groups=(0, 1, 1, 1), group_names=("one", "three"))
    chips = [Chip(0, Window(20, 10, 16, 16), "val")]
    chips += [Chip(i, Window(60, 56, 16, 16), "val") for i in (1, 2, 3)]

    class AllBuilding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((x.shape[0], 3, *x.shape[2:]))
            out[:, 1] = 5.0
            return out + self.w.sum()

    _, iou, per_scene = evaluate_chips(
        AllBuilding(), prep, chips, 1, torch.device("cpu"), PartialLoss(0.0)
    )
    assert per_scene["one"][1] == pytest.approx(1.0)
    assert per_scene["three"][1] == pytest.approx(0.0)
    assert iou[1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name",
    [
        "train_cities.yml",
        "train_cities_aerial.yml",
        "train_cities_lite2.yml",
        "train_cities_lite2_finetune.yml",
        "train_cities_lite2_decoder.yml",
        "train_cities_lite2_finetune_seed1.yml",
    ],
)
def test_the_cities_config_reads_every_scene_and_never_austin(name: str) -> None:
    """data_samples/train_cities.yml (and its variant with Banepa drawn more often, and the
    shipped model's two Lite2 stages) is valid;
    where ../shared/data is present its globs pair every image with its mask, and no scene
    reads Austin, the unseen-city check."""
    from geoseg.train.config import load_config

    path = Path(__file__).resolve().parents[1] / "data_samples" / name
    cfg = load_config(path)
    names = [s.display_name() for s in cfg.scenes]
    assert names == ["banepa", "atlanta", "rio", "dubai", "vegas", "paris"]
    assert all(s.holdout is not None for s in cfg.scenes)
    assert not any("austin" in s.image.lower() for s in cfg.scenes)
    if not Path(cfg.scenes[0].image).exists():
        pytest.skip("../shared/data is not beside the repository")
    items = [i for s in cfg.scenes for i in expand_scene(s)]
    assert len(items) == 1 + 1 + 15 + 72 + 1 + 1
    assert not any("austin" in i.image.lower() for i in items)
    assert sum(i.holdout == "all" for i in items) == 2 + 9  # Rio img63-64, Dubai tile 2


def test_an_empty_label_file_is_refused_before_training(tmp_path: Path) -> None:
    """A building layer with no features would teach buildings as background everywhere and
    keep IoU 0 as the best epoch: refused up front, naming the file; a scene whose mask shows
    no building (water) beside others that do is fine."""
    import geopandas as gpd

    from .test_train import _config

    raw = _config(tmp_path)
    empty = tmp_path / "empty.geojson"
    gpd.GeoDataFrame(geometry=[], crs="EPSG:4326").to_file(empty)
    raw["scenes"][0]["labels"][1]["path"] = str(empty)
    with pytest.raises(InputError, match=r"class 'building': no label source \(.*empty\.geojson"):
        prepare(parse_config(raw, "t.yml"))


def test_a_colour_table_that_matches_no_pixel_of_a_class_is_refused(
    folder: Path, tmp_path: Path
) -> None:
    raw = _cfg(folder, tmp_path)
    colours = raw["scenes"][0]["labels"][0]["colors"]
    colours[BUILDING] = "background"  # the building colour mapped away by mistake
    colours["#010203"] = "building"  # a colour no mask holds
    with pytest.raises(
        InputError, match=r"class 'building': no label source \(.*masks/part_00\d\.png"
    ):
        prepare(parse_config(raw, "t.yml"))
