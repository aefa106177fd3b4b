"""What a small outline error costs in building pixel IoU on each held-out scene of eval_real.

A model's building IoU on a scene is bounded by how exactly its outlines can follow the truth's:
on small buildings a uniform error of half a metre already costs much of the IoU. For each
scene that ``benchmarks/eval_real.py`` scores for buildings, this compares the truth mask on
the scored grid with itself grown, shrunk and shifted by 0.5 m and 1 m (a disk of that radius,
or a shift along x, rounded to whole pixels of the grid and at least one), over the pixels
that eval_real scores, and gives the median footprint (touching buildings counted as one). It
needs no model: it reads the truth the way eval_real does.

    python benchmarks/label_tolerance.py [--shared ../shared] [--out bench_out/label-tolerance]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from eval_real import (
    DUBAI_BUILDING,
    DUBAI_GSD_M,
    DUBAI_TILE,
    DUBAI_UNLABELLED,
    REPO,
    RIO_HOLDOUT,
    building_truth,
    clip_truth,
    colour_mask,
    cut_scenes,
    truth_mask,
)
from rasterio.warp import transform
from scipy import ndimage
from skimage.morphology import disk

#: The outline errors compared, in metres.
ERRORS_M = (0.5, 1.0)


def ground_px(src: rasterio.DatasetReader) -> float:
    """Metres on the ground per pixel (along y) of an open raster: its own unit in a projected
    CRS, corrected by the latitude's scale in Web Mercator, converted in a geographic one."""
    res = abs(src.transform.e)
    middle = (src.bounds.bottom + src.bounds.top) / 2
    lat = transform(src.crs, "EPSG:4326", [src.bounds.left], [middle])[1][0]
    if src.crs.is_geographic:
        return res * 111_320
    if src.crs.to_epsg() == 3857:
        return res * math.cos(math.radians(lat))
    return res


def masks(data: Path, out: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """Each building scene's (truth, scored pixels, pixel size in metres), one per image."""
    scenes = cut_scenes(
        data,
        out,
        ("banepa_east", "austin", "atlanta_east", "rio_holdout", "dubai_tile2", "montenegro"),
    )
    found: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    polygons = {
        "banepa_east": data / "open" / "banepa_buildings_rgb" / "banepa_osm_buildings.geojson",
        "atlanta_east": data
        / "real"
        / "atlanta_buildings_rgb"
        / "atlanta_sn4_nadir10_buildings.geojson",
    }
    with rasterio.open(data / "real" / "austin_buildings_rgb" / "aerial_sample_gt_mask.tif") as src:
        found["austin"] = [
            (src.read(1) > 0, np.ones((src.height, src.width), bool), ground_px(src))
        ]
    for name in ("banepa_east", "atlanta_east", "montenegro"):
        image = scenes[name]
        if name in polygons:  # eval_real clips these to the held-out part
            truth = clip_truth(polygons[name], image, out / f"{name.split('_')[0]}_truth.geojson")
        else:
            truth = gpd.read_file(building_truth(data, out, name))
        with rasterio.open(image) as src:
            truth = truth.to_crs(src.crs)
            px = ground_px(src)
            shape = (src.height, src.width)
        found[name] = [(truth_mask(truth, image), np.ones(shape, bool), px)]
    found["rio_holdout"] = []
    for stem in RIO_HOLDOUT:
        with rasterio.open(data / "real" / "rio_buildings_rgb" / "mask" / f"{stem}.tif") as t:
            truth_px = t.read(1) > 0
        with rasterio.open(scenes[f"rio_holdout/{stem}"]) as img:
            inside = img.read().any(axis=0)
            px = ground_px(img)
        found["rio_holdout"].append((truth_px, inside, px))
    found["dubai_tile2"] = []
    for key in sorted(k for k in scenes if k.startswith("dubai_tile2/")):
        stem = key.split("/", 1)[1]
        colours = colour_mask(
            data / "real" / "dubai_landcover_rgb" / DUBAI_TILE / "masks" / f"{stem}.png"
        )
        found["dubai_tile2"].append(
            (colours == DUBAI_BUILDING, ~np.isin(colours, DUBAI_UNLABELLED), DUBAI_GSD_M)
        )
    return found


def tolerance(images: list[tuple[np.ndarray, np.ndarray, float]]) -> dict[str, float]:
    """Pooled IoU of the truth with itself grown, shrunk and shifted by each of ERRORS_M."""
    row: dict[str, float] = {}
    areas = []
    for truth, _, px in images:
        labels, _ = ndimage.label(truth)
        areas.extend((np.bincount(labels.ravel())[1:] * px * px).tolist())
    row["grid_m"] = images[0][2]
    row["buildings"] = len(areas)
    row["median_m2"] = float(np.median(areas))
    for err in ERRORS_M:
        for how in ("grown", "shrunk", "shifted"):
            inter = union = 0
            for truth, scored, px in images:
                k = max(1, round(err / px))
                if how == "grown":
                    moved = ndimage.binary_dilation(truth, structure=disk(k))
                elif how == "shrunk":
                    moved = ndimage.binary_erosion(truth, structure=disk(k))
                else:
                    moved = np.zeros_like(truth)
                    moved[:, k:] = truth[:, :-k]
                inter += np.count_nonzero(moved & truth & scored)
                union += np.count_nonzero((moved | truth) & scored)
            row[f"{how} {err:g} m"] = inter / union
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "label-tolerance")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {
        name: tolerance(images) for name, images in masks(args.shared / "data", args.out).items()
    }
    cols = list(next(iter(rows.values())))
    print("| scene | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        digits = {"buildings": 0, "median_m2": 0, "grid_m": 2}
        cells = [f"{v:.{digits.get(c, 3)}f}" for c, v in row.items()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
