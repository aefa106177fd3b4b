"""Vectorizing large ragged building regions that cross chunk seams, against another checkout.

Usage: python benchmarks/bench_vectorize_ragged.py [--size 3072] [--chunk 1024] [--rounds 2]
       [--other CHECKOUT]

The mask: smoothed noise thresholded near percolation, so a few building regions span many
chunks with ragged edges and thousands of holes (what a noisy scene through the shipped model
gives). ``vectorize_prediction`` (one process, defaults but the chunk) runs in a subprocess of
this tree and, with ``--other``, of that checkout, alternately; prints the median seconds of
each and rasterio.features.shapes over the whole mask for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
from affine import Affine
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "building", "road"]

RUN = """
import sys, time
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
t = time.perf_counter()
vectorize_prediction(sys.argv[1], sys.argv[2], VectorizeOptions(chunk=int(sys.argv[3]), workers=1,
                     layers={"building": "polygons"}))
print(time.perf_counter() - t)
"""


def write_mask(path: Path, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 3)
    mask = (noise > 0.0).astype(np.uint8)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="uint8",
        crs="EPSG:32645",
        transform=Affine(0.3, 0, 300000, 0, -0.3, 3000000),
        tiled=True,
        nodata=255,
    ) as dst:
        dst.write(mask, 1)
        dst.update_tags(
            GEOSEG_CLASSES=json.dumps(CLASSES), GEOSEG_MODEL="m", GEOSEG_SCENE="ragged.tif"
        )
    return mask


def run(tree: Path, mask: Path, out: Path, chunk: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run(
        [sys.executable, "-c", RUN, str(mask), str(out), str(chunk)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--other", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="geoseg-ragged-"))
    path = tmp / "ragged.mask.tif"
    mask = write_mask(path, args.size)
    labels, n = ndimage.label(mask)
    big = np.sort(np.bincount(labels.ravel())[1:])[-3:]
    t = time.perf_counter()
    count = sum(1 for _ in rasterio.features.shapes(mask, mask=mask.astype(bool)))
    shapes_s = time.perf_counter() - t
    trees = {"this": ROOT} | ({"other": args.other.resolve()} if args.other else {})
    times: dict[str, list[float]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name, tree in trees.items():
            times[name].append(run(tree, path, tmp / f"{name}-{i}", args.chunk))
    row = {
        "size": args.size,
        "chunk": args.chunk,
        "components": n,
        "largest_px": big.tolist(),
        "polygons": count,
        "rasterio_shapes_s": round(shapes_s, 2),
    }
    row |= {f"{k}_median_s": round(statistics.median(v), 2) for k, v in times.items()}
    row |= {f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
