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
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from eval_real import (
    DUBAI_GSD_M,
    REPO,
    RIO_HOLDOUT,
    building_truth,
    clip_truth,
    cut_scenes,
    dubai_truth,
    polygon_source,
    rio_truth,
    truth_mask,
)
from scipy import ndimage
from skimage.morphology import disk

from geoseg.io.raster import ground_resolution

#: The outline errors compared, in metres.
ERRORS_M = (0.5, 1.0)


def ground_px(src: rasterio.DatasetReader) -> float:
    """Ground metres per pixel along y (rows) of an open raster, at its centre."""
    return ground_resolution(src.crs, src.transform, src.width, src.height)[1]


def masks(data: Path, out: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """Each building scene's (truth, scored pixels, pixel size in metres), one per image."""
    scenes = cut_scenes(
        data,
        out,
        ("banepa_east", "austin", "atlanta_east", "rio_holdout", "dubai_tile2", "montenegro"),
    )
    found: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    with rasterio.open(data / "real" / "austin_buildings_rgb" / "aerial_sample_gt_mask.tif") as src:
        found["austin"] = [
            (src.read(1) > 0, np.ones((src.height, src.width), bool), ground_px(src))
        ]
    for name in ("banepa_east", "atlanta_east", "montenegro"):
        image = scenes[name]
        if name == "montenegro":
            truth = gpd.read_file(building_truth(data, out, name))
        else:  # clipped to the held-out part, as eval_real does
            truth = clip_truth(polygon_source(data, name), image, building_truth(data, out, name))
        with rasterio.open(image) as src:
            truth = truth.to_crs(src.crs)
            px = ground_px(src)
            shape = (src.height, src.width)
        found[name] = [(truth_mask(truth, image), np.ones(shape, bool), px)]
    found["rio_holdout"] = []
    for stem in RIO_HOLDOUT:
        image = scenes[f"rio_holdout/{stem}"]
        with rasterio.open(image) as src:
            px = ground_px(src)
        found["rio_holdout"].append((*rio_truth(data, stem, image), px))
    found["dubai_tile2"] = [
        (*dubai_truth(data, key.split("/", 1)[1]), DUBAI_GSD_M)
        for key in sorted(k for k in scenes if k.startswith("dubai_tile2/"))
    ]
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
