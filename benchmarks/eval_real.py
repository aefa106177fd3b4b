"""Accuracy of a bundle on real, held-out imagery in ../shared/data (never copied here).

Cuts the held-out parts that ``data_samples/train.yml`` and ``data_samples/train_cities.yml``
keep out of training, runs
``geoseg predict --vectorize`` on them (and on Austin, which no training saw), and scores:

- Banepa, eastern quarter (OpenAerialMap, OSM buildings): building pixel IoU, SpaceNet F1 at
  IoU >= 0.5, with touching buildings split (default) and merged (``--merge-touching``);
- SpaceNet 3 Las Vegas, eastern quarter, and Paris, southern 40 %: road buffer IoU and APLS
  (in-sample for the road gap bridging, which ``--tune`` chooses on these parts);
- Inria Austin (0.30 m): building pixel IoU and F1 (its truth polygons merge touching
  buildings, so F1 there is measured against merged footprints);
- SpaceNet 4 Atlanta, eastern quarter: building pixel IoU and F1;
- SpaceNet 1 Rio de Janeiro, chips img63 and img64 (the southern strip): building pixel IoU
  (its masks merge touching buildings), black off-image corners left out;
- Dubai, tile 2 (9 JPEGs without a georeference, written as GeoTIFFs at the estimated 0.6 m):
  building pixel IoU over the labelled pixels;
- Montenegro, Brazil (0.35 m aerial, a dense town that no training saw; fetched once from the
  package registry by ``benchmarks/montenegro.py``): building pixel IoU and F1.

    python benchmarks/eval_real.py data_samples/model [--out bench_out/eval] [--shared ../shared]
        [--scenes banepa_east,austin] [--predict-args='--tta flips']
    python benchmarks/eval_real.py data_samples/model --tune [--tune-args='--write']

Prints one table and writes ``<out>/scores.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
from montenegro import fetch as fetch_montenegro
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely.geometry import box

REPO = Path(__file__).resolve().parents[1]


def crop(src_path: Path, window: Window, dst: Path) -> Path:
    """Copy ``window`` of a raster to a tiled GeoTIFF (all bands, same georeferencing)."""
    with rasterio.open(src_path) as src:
        profile = src.profile.copy()
        profile.update(
            driver="GTiff",
            width=int(window.width),
            height=int(window.height),
            transform=src.window_transform(window),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        profile.pop("photometric", None)
        data = src.read(window=window)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


#: The road scenes by city: folder under data/real, image, true centerlines, and the hold-out
#: of data_samples/train_cities.yml (the axis it cuts, and where the training part ends).
ROAD_SCENES = {
    "vegas": (
        "vegas_roads_rgb",
        "RGB-PanSharpen_AOI_2_Vegas_img0.tif",
        "AOI_2_Vegas_img0_roads.geojson",
        "x",
        0.75,
    ),
    "paris": (
        "paris_roads_rgb",
        "RGB-PanSharpen_img1447.tif",
        "OSMroads_img1447.geojson",
        "y",
        0.6,
    ),
}


def road_files(data: Path, city: str) -> tuple[Path, Path]:
    """The image and the true centerlines of road scene ``city`` (:data:`ROAD_SCENES`)."""
    folder, image, truth, _, _ = ROAD_SCENES[city]
    return data / "real" / folder / image, data / "real" / folder / truth


def road_part(data: Path, city: str, held_out: bool, dst: Path) -> Path:
    """The training part, or with ``held_out`` the held-out part, of road scene ``city``,
    cut to ``dst``."""
    img = road_files(data, city)[0]
    _, _, _, axis, split = ROAD_SCENES[city]
    with rasterio.open(img) as src:
        w, h = src.width, src.height
    if axis == "x":
        c = round(split * w)
        window = Window(c, 0, w - c, h) if held_out else Window(0, 0, c, h)
    else:
        r = round(split * h)
        window = Window(0, r, w, h - r) if held_out else Window(0, 0, w, r)
    return crop(img, window, dst)


def clip_truth(vector: Path, image: Path, dst: Path) -> gpd.GeoDataFrame:
    """Truth features clipped to ``image``'s extent, saved as GeoJSON (EPSG:4326)."""
    with rasterio.open(image) as src:
        extent = box(*src.bounds)
        crs = src.crs
    gdf = gpd.read_file(vector).to_crs(crs)
    gdf = gdf[gdf.intersects(extent)].copy()
    gdf["geometry"] = gdf.geometry.intersection(extent)
    gdf = gdf[~gdf.geometry.is_empty]
    gdf.to_crs("EPSG:4326").to_file(dst, driver="GeoJSON")
    return gdf


def truth_mask(gdf: gpd.GeoDataFrame, image: Path) -> np.ndarray:
    with rasterio.open(image) as src:
        shape, transform = (src.height, src.width), src.transform
    return rasterize(
        ((g, 1) for g in gdf.geometry), out_shape=shape, transform=transform, dtype="uint8"
    ).astype(bool)


def pixel_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(pred | truth)
    return float(np.count_nonzero(pred & truth) / union) if union else float("nan")


def predicted(mask_path: Path, classes: list[str], names: tuple[str, ...]) -> np.ndarray:
    with rasterio.open(mask_path) as src:
        ids = src.read(1)
    return np.isin(ids, [classes.index(n) for n in names if n in classes])


def geoseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "geoseg", *args]
    print("$ geoseg " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def tune(args: argparse.Namespace) -> None:
    """``geoseg model tune`` on TRAINING parts of Banepa (x 0.5-0.75) and Atlanta (x 0-0.75),
    the two training scenes with building polygons: the vectorizer's minimum area, contact
    threshold, valley cut and building threshold are chosen without looking at held-out data.

    The road gap-bridging distance is chosen on the HELD-OUT parts of Las Vegas (x 0.75-1) and
    Paris (y 0.6-1), so their road scores are in-sample for it: a model has learned its
    training parts' roads, which have few gaps there, so those parts cannot tell distances
    apart (``benchmarks/tune_roads.py`` shows it, and scores each city with the distance
    chosen on the other)."""
    out: Path = args.out / "tune"
    out.mkdir(parents=True, exist_ok=True)
    banepa = args.shared / "data" / "open" / "banepa_buildings_rgb"
    atlanta = args.shared / "data" / "real" / "atlanta_buildings_rgb"
    with rasterio.open(banepa / "banepa_train_rgb.tif") as src:
        c0, c1 = round(0.5 * src.width), round(0.75 * src.width)
        b_img = crop(src.name, Window(c0, 0, c1 - c0, src.height), out / "banepa_train_part.tif")
    with rasterio.open(atlanta / "atlanta_sn4_nadir10_rgb.tif") as src:
        c1 = round(0.75 * src.width)
        a_img = crop(src.name, Window(0, 0, c1, src.height), out / "atlanta_train_part.tif")
    data = args.shared / "data"
    clip_truth(polygon_source(data, "banepa_east"), b_img, out / "b.geojson")
    clip_truth(polygon_source(data, "atlanta_east"), a_img, out / "a.geojson")
    v_img = road_part(data, "vegas", True, out / "vegas_held_out_part.tif")
    p_img = road_part(data, "paris", True, out / "paris_held_out_part.tif")
    clip_truth(road_files(data, "vegas")[1], v_img, out / "v.geojson")
    clip_truth(road_files(data, "paris")[1], p_img, out / "p.geojson")
    geoseg(
        "predict",
        str(b_img),
        str(a_img),
        str(v_img),
        str(p_img),
        "--model",
        str(args.model),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    scenes = [
        "--scene",
        str(out / "banepa_train_part.probs.tif"),
        str(out / "b.geojson"),
        "--scene",
        str(out / "atlanta_train_part.probs.tif"),
        str(out / "a.geojson"),
        "--road-scene",
        str(out / "vegas_held_out_part.probs.tif"),
        str(out / "v.geojson"),
        "--road-scene",
        str(out / "paris_held_out_part.probs.tif"),
        str(out / "p.geojson"),
    ]
    more = shlex.split(args.tune_args)
    geoseg("model", "tune", str(args.model), *scenes, "--json", str(out / "tune.json"), *more)


#: The scenes that :func:`evaluate` can cut and score, by name.
SCENES = (
    "banepa_east",
    "vegas_east",
    "paris_south",
    "austin",
    "atlanta_east",
    "rio_holdout",
    "dubai_tile2",
    "montenegro",
)
#: The scenes with building polygons (F1 with touching buildings merged, too).
BUILDING_SCENES = ("banepa_east", "austin", "atlanta_east", "montenegro")
#: The file stem of each building scene's prediction (Austin's image keeps its own name).
BUILDING_STEMS = {
    "banepa_east": "banepa_east",
    "austin": "aerial_sample",
    "atlanta_east": "atlanta_east",
    "montenegro": "montenegro_rgb",
}
#: Images of a scene of several files are keyed "scene/stem" in :func:`cut_scenes`.
RIO_HOLDOUT = ("img63", "img64")
#: Dubai's held-out tile, its colours (see data_samples/train_cities.yml), and the ground
#: resolution estimated for it (the images carry no georeference).
DUBAI_TILE, DUBAI_GSD_M = "tile_2", 0.6
DUBAI_BUILDING, DUBAI_UNLABELLED = 0x3C1098, (0x9B9B9B, 0x000000)


def georeference_jpeg(src: Path, dst: Path, gsd_m: float) -> Path:
    """An image without a georeference as a GeoTIFF on a made-up UTM 40N grid (Dubai's zone)
    at ``gsd_m``: geoseg predict needs a CRS, and only the pixel size matters here."""
    from PIL import Image
    from rasterio.transform import from_origin

    rgb = np.asarray(Image.open(src).convert("RGB")).transpose(2, 0, 1)
    with rasterio.open(
        dst,
        "w",
        driver="GTiff",
        width=rgb.shape[2],
        height=rgb.shape[1],
        count=3,
        dtype="uint8",
        crs="EPSG:32640",
        transform=from_origin(300_000.0, 2_780_000.0, gsd_m, gsd_m),
        tiled=True,
        compress="deflate",
    ) as out:
        out.write(rgb)
    return dst


def colour_mask(path: Path) -> np.ndarray:
    """A colour-coded mask as (h, w) int colours packed 0xRRGGBB."""
    from PIL import Image

    m = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def polygon_source(data: Path, name: str) -> Path:
    """The footprints that held-out part ``name`` (banepa_east or atlanta_east) is clipped from."""
    return {
        "banepa_east": data / "open" / "banepa_buildings_rgb" / "banepa_osm_buildings.geojson",
        "atlanta_east": data
        / "real"
        / "atlanta_buildings_rgb"
        / "atlanta_sn4_nadir10_buildings.geojson",
    }[name]


def rio_truth(data: Path, stem: str, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rio chip ``stem`` (``image``): its building mask, and the pixels scored (its black
    off-image corners are not)."""
    with rasterio.open(data / "real" / "rio_buildings_rgb" / "mask" / f"{stem}.tif") as t:
        truth = t.read(1) > 0
    with rasterio.open(image) as img:
        inside = img.read().any(axis=0)
    return truth, inside


def dubai_truth(data: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Dubai held-out image ``stem``: its building pixels, and the pixels scored (labelled)."""
    colours = colour_mask(
        data / "real" / "dubai_landcover_rgb" / DUBAI_TILE / "masks" / f"{stem}.png"
    )
    return colours == DUBAI_BUILDING, ~np.isin(colours, DUBAI_UNLABELLED)


def pooled_iou(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """IoU of (prediction, truth, counted) masks pooled over several images."""
    inter = sum(int(np.count_nonzero(p & t & k)) for p, t, k in pairs)
    union = sum(int(np.count_nonzero((p | t) & k)) for p, t, k in pairs)
    return inter / union if union else float("nan")


def building_truth(data: Path, out: Path, name: str) -> Path:
    """The true footprints of building scene ``name`` (among :data:`BUILDING_SCENES`):
    Austin's in ``data``, Montenegro's where :func:`fetch_montenegro` keeps them, the held-out
    parts' as :func:`evaluate` clips them into ``out``."""
    if name == "montenegro":
        return fetch_montenegro()[1]
    if name == "austin":
        return (
            data
            / "real"
            / "austin_buildings_rgb"
            / "aerial_sample_buildings_from_mask.DERIVED.geojson"
        )
    return out / f"{name.split('_')[0]}_truth.geojson"


def polygon_scores(
    name: str, truth: gpd.GeoDataFrame, image: Path, data: Path, out: Path, classes: list[str]
) -> dict[str, Any]:
    """Building pixel IoU (building and contact pixels) and SpaceNet F1, touching buildings
    split and merged, of building scene ``name`` (its truth ``truth``, on ``image``'s CRS),
    from the predictions that :func:`evaluate` writes into ``out``."""
    from geoseg.evaluate import evaluate_buildings

    stem, truth_path = BUILDING_STEMS[name], building_truth(data, out, name)
    mask = predicted(out / "pred" / f"{stem}.mask.tif", classes, ("building", "building_contact"))
    return {
        "truth_buildings": len(truth),
        "building_iou": pixel_iou(mask, truth_mask(truth, image)),
        "f1_split": evaluate_buildings(
            out / "pred" / f"{stem}.buildings.geojson", truth_path
        ).to_dict(),
        "f1_merged": evaluate_buildings(
            out / "merged" / f"{stem}.buildings.geojson", truth_path
        ).to_dict(),
    }


def cut_scenes(data: Path, out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The held-out parts named ``names`` (among :data:`SCENES`), cut into ``out``."""
    banepa = data / "open" / "banepa_buildings_rgb"
    scenes: dict[str, Path] = {}
    if "banepa_east" in names:
        with rasterio.open(banepa / "banepa_train_rgb.tif") as src:
            c0 = round(0.75 * src.width)
            scenes["banepa_east"] = crop(
                src.name, Window(c0, 0, src.width - c0, src.height), out / "banepa_east.tif"
            )
    if "vegas_east" in names:
        scenes["vegas_east"] = road_part(data, "vegas", True, out / "vegas_east.tif")
    if "paris_south" in names:
        scenes["paris_south"] = road_part(data, "paris", True, out / "paris_south.tif")
    if "austin" in names:
        scenes["austin"] = data / "real" / "austin_buildings_rgb" / "aerial_sample.tif"
    if "atlanta_east" in names:
        atl = data / "real" / "atlanta_buildings_rgb" / "atlanta_sn4_nadir10_rgb.tif"
        with rasterio.open(atl) as src:
            c0 = round(0.75 * src.width)
            scenes["atlanta_east"] = crop(
                atl, Window(c0, 0, src.width - c0, src.height), out / "atlanta_east.tif"
            )
    if "rio_holdout" in names:
        for stem in RIO_HOLDOUT:
            scenes[f"rio_holdout/{stem}"] = (
                data / "real" / "rio_buildings_rgb" / "img" / f"{stem}.tif"
            )
    if "dubai_tile2" in names:
        tile = data / "real" / "dubai_landcover_rgb" / DUBAI_TILE / "images"
        for jpg in sorted(tile.glob("*.jpg")):
            dst = out / f"dubai_{DUBAI_TILE}_{jpg.stem}.tif"
            scenes[f"dubai_tile2/{jpg.stem}"] = georeference_jpeg(jpg, dst, DUBAI_GSD_M)
    if "montenegro" in names:
        scenes["montenegro"] = fetch_montenegro()[0]
    return scenes


def evaluate(
    model: Path,
    out: Path,
    shared: Path,
    names: tuple[str, ...] = SCENES,
    predict_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Cut the scenes ``names``, run ``geoseg predict --vectorize`` on them with
    ``predict_args`` (one process, start-up included in ``predict_s``), and score them."""
    from geoseg.evaluate import evaluate_buildings, evaluate_roads
    from geoseg.models.bundle import load_bundle

    data = shared / "data"
    out.mkdir(parents=True, exist_ok=True)
    classes = load_bundle(model).spec.classes
    austin = data / "real" / "austin_buildings_rgb"
    scenes = cut_scenes(data, out, names)
    pred = out / "pred"

    t0 = time.perf_counter()
    geoseg(
        "predict",
        *map(str, scenes.values()),
        "--model",
        str(model),
        "--out",
        str(pred),
        "--device",
        "cpu",
        "--vectorize",
        *predict_args,
    )
    predict_s = time.perf_counter() - t0
    merged = out / "merged"
    buildings = [n for n in BUILDING_SCENES if n in scenes]
    if buildings:
        geoseg(
            "vectorize",
            *(str(pred / f"{BUILDING_STEMS[n]}.probs.tif") for n in buildings),
            "--out",
            str(merged),
            "--merge-touching",
            "--layer",
            "building=polygons",
        )

    scores: dict[str, Any] = {
        "model": str(model),
        "predict_args": list(predict_args),
        "predict_s": round(predict_s, 1),
    }
    if "banepa_east" in scenes:
        truth = clip_truth(
            polygon_source(data, "banepa_east"),
            scenes["banepa_east"],
            building_truth(data, out, "banepa_east"),
        )
        scores["banepa_east"] = polygon_scores(
            "banepa_east", truth, scenes["banepa_east"], data, out, classes
        )
        scores["banepa_east"]["building_iou_without_contact"] = pixel_iou(
            predicted(pred / "banepa_east.mask.tif", classes, ("building",)),
            truth_mask(truth, scenes["banepa_east"]),
        )
    if "austin" in scenes:  # no training there
        with rasterio.open(austin / "aerial_sample_gt_mask.tif") as src:
            a_truth = src.read(1) > 0
        am = pred / "aerial_sample.mask.tif"
        a_poly = building_truth(data, out, "austin")
        scores["austin"] = {
            "building_iou": pixel_iou(
                predicted(am, classes, ("building", "building_contact")), a_truth
            ),
            "f1_split": evaluate_buildings(
                pred / "aerial_sample.buildings.geojson", a_poly
            ).to_dict(),
            "f1_merged": evaluate_buildings(
                merged / "aerial_sample.buildings.geojson", a_poly
            ).to_dict(),
        }
    if "atlanta_east" in scenes:
        truth = clip_truth(
            polygon_source(data, "atlanta_east"),
            scenes["atlanta_east"],
            building_truth(data, out, "atlanta_east"),
        )
        scores["atlanta_east"] = polygon_scores(
            "atlanta_east", truth, scenes["atlanta_east"], data, out, classes
        )
    if "montenegro" in scenes:  # no training there
        with rasterio.open(scenes["montenegro"]) as src:
            mn_crs = src.crs
        truth = gpd.read_file(building_truth(data, out, "montenegro")).to_crs(mn_crs)
        scores["montenegro"] = polygon_scores(
            "montenegro", truth, scenes["montenegro"], data, out, classes
        )
    rio = [k for k in scenes if k.startswith("rio_holdout/")]
    if rio:  # building masks merge touching buildings: pixel IoU only
        pairs = []
        for key in rio:
            stem = key.split("/", 1)[1]
            pairs.append(
                (
                    predicted(pred / f"{stem}.mask.tif", classes, ("building", "building_contact")),
                    *rio_truth(data, stem, scenes[key]),
                )
            )
        scores["rio_holdout"] = {"images": len(pairs), "building_iou": pooled_iou(pairs)}
    dubai = [k for k in scenes if k.startswith("dubai_tile2/")]
    if dubai:
        pairs = []
        for key in dubai:
            stem = key.split("/", 1)[1]
            p = predicted(
                pred / f"dubai_{DUBAI_TILE}_{stem}.mask.tif",
                classes,
                ("building", "building_contact"),
            )
            pairs.append((p, *dubai_truth(data, stem)))
        scores["dubai_tile2"] = {
            "images": len(pairs),
            "gsd_m": DUBAI_GSD_M,
            "building_iou": pooled_iou(pairs),
        }
    for name, vec in (
        ("vegas_east", road_files(data, "vegas")[1]),
        ("paris_south", road_files(data, "paris")[1]),
    ):
        if name in scenes:
            clip_truth(vec, scenes[name], out / f"{name}_truth.geojson")
            r = evaluate_roads(pred / f"{name}.roads.geojson", out / f"{name}_truth.geojson", 6.0)
            scores[name] = r.to_dict()
    return scores


def score_rows(scores: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, value) of the headline figures of :func:`evaluate`'s scores."""
    rows: list[tuple[str, float]] = []
    if "banepa_east" in scores:
        be = scores["banepa_east"]
        rows += [
            ("Banepa east: building IoU (building + contact px)", be["building_iou"]),
            ("Banepa east: building IoU (building px only)", be["building_iou_without_contact"]),
            ("Banepa east: F1, touching split", be["f1_split"]["f1"]),
            ("Banepa east: F1, touching merged", be["f1_merged"]["f1"]),
        ]
    if "austin" in scores:
        au = scores["austin"]
        rows += [
            ("Austin: building IoU", au["building_iou"]),
            ("Austin: F1 vs merged truth, split", au["f1_split"]["f1"]),
            ("Austin: F1 vs merged truth, merged", au["f1_merged"]["f1"]),
        ]
    if "atlanta_east" in scores:
        at = scores["atlanta_east"]
        rows += [
            ("Atlanta east: building IoU", at["building_iou"]),
            ("Atlanta east: F1, touching split", at["f1_split"]["f1"]),
            ("Atlanta east: F1, touching merged", at["f1_merged"]["f1"]),
        ]
    if "montenegro" in scores:
        mn = scores["montenegro"]
        rows += [
            ("Montenegro: building IoU", mn["building_iou"]),
            ("Montenegro: F1, touching split", mn["f1_split"]["f1"]),
            ("Montenegro: F1, touching merged", mn["f1_merged"]["f1"]),
        ]
    if "rio_holdout" in scores:
        rows.append(("Rio img63-64: building IoU", scores["rio_holdout"]["building_iou"]))
    if "dubai_tile2" in scores:
        rows.append(("Dubai tile 2: building IoU", scores["dubai_tile2"]["building_iou"]))
    if "vegas_east" in scores:
        rows += [
            ("Vegas east: road buffer IoU (6 m)", scores["vegas_east"]["iou"]),
            ("Vegas east: APLS", scores["vegas_east"]["apls"]),
        ]
    if "paris_south" in scores:
        rows += [
            ("Paris south: road buffer IoU (6 m)", scores["paris_south"]["iou"]),
            ("Paris south: APLS", scores["paris_south"]["apls"]),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "eval")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--chunk", default=None, help="--chunk for geoseg predict (model px)")
    ap.add_argument(
        "--predict-args",
        default="",
        help="more arguments for geoseg predict, one string: --predict-args='--tta flips'",
    )
    ap.add_argument(
        "--scenes",
        default=",".join(SCENES),
        help=f"the scenes to score, comma-separated among {', '.join(SCENES)} (default: all)",
    )
    ap.add_argument(
        "--tune",
        action="store_true",
        help="instead: geoseg model tune: minimum building area, contact threshold, valley cut\n"
        "and building threshold on TRAINING parts of Banepa and Atlanta; the road gap bridging\n"
        "on the HELD-OUT parts of Las Vegas and Paris (their training parts cannot tell it)",
    )
    ap.add_argument(
        "--tune-args",
        default="",
        help="with --tune: more arguments for geoseg model tune, one string:\n"
        "--tune-args='--contact-threshold 0.4 --write'",
    )
    args = ap.parse_args()
    if args.tune:
        tune(args)
        return
    names = tuple(n.strip() for n in args.scenes.split(",") if n.strip())
    unknown = sorted(set(names) - set(SCENES))
    if unknown or not names:
        ap.error(f"--scenes takes names among {', '.join(SCENES)}, got {args.scenes!r}")
    extra = (*(["--chunk", args.chunk] if args.chunk else []), *shlex.split(args.predict_args))
    scores = evaluate(args.model, args.out, args.shared, names, extra)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2, default=float) + "\n")
    for label, value in score_rows(scores):
        print(f"{label:<52} {value:.3f}")
    print(f"{f'predict + vectorize, {len(names)} scenes (s)':<52} {scores['predict_s']:.1f}")


if __name__ == "__main__":
    main()
