"""Vectorize benchmark: chunked geoseg vectorize against whole-mask rasterio/skimage calls.

Usage: python benchmarks/bench_vectorize.py [--sizes 8192 16384] [--roads 8192] [--workers 2]

Each measurement runs in its own subprocess; its peak memory is the largest sum of the
proportional set size (PSS, resident memory with shared pages split) of that process and its
children, sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from affine import Affine
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "building", "road"]
CELL = 64  # one building candidate per 64 x 64 px cell: about 50,000 in 16384²
BLOCK = 1024


def _cells(size: int, seed: int) -> np.ndarray:
    """Per cell: present, row, col, height, width of its building (pixels)."""
    n = size // CELL
    rng = np.random.default_rng(seed)
    present = rng.random((n, n)) < 0.78
    h = rng.integers(8, 40, (n, n))
    w = rng.integers(8, 40, (n, n))
    r = rng.integers(0, CELL - 8, (n, n))
    c = rng.integers(0, CELL - 8, (n, n))
    return np.stack([present, r, c, h, w])


def _block(size: int, cells: np.ndarray, win: Window) -> np.ndarray:
    r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    out = np.zeros((h, w), np.uint8)
    yy = np.arange(r0, r0 + h)[:, None]
    xx = np.arange(c0, c0 + w)[None, :]
    for cr in range(max(0, r0 // CELL - 1), min(size // CELL, (r0 + h) // CELL + 1)):
        for cc in range(max(0, c0 // CELL - 1), min(size // CELL, (c0 + w) // CELL + 1)):
            p, r, c, bh, bw = cells[:, cr, cc]
            if not p:
                continue
            top, left = cr * CELL + r - r0, cc * CELL + c - c0
            out[max(top, 0) : max(top + bh, 0), max(left, 0) : max(left + bw, 0)] = 1
    road = ((yy - 500) % 1024 < 14) | ((xx - 300) % 1024 < 14)
    diag = np.abs((yy - xx) % 2048 - 1024) < 6
    out[road | diag] = 2
    return out


def make_scene(size: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``scene<size>.mask.tif`` and ``.probs.tif`` window by window (UTM, 0.5 m)."""
    mask_p, probs_p = out / f"scene{size}.mask.tif", out / f"scene{size}.probs.tif"
    if mask_p.exists() and probs_p.exists():
        return mask_p, probs_p
    cells = _cells(size, seed)
    prof = dict(
        driver="GTiff",
        width=size,
        height=size,
        dtype="uint8",
        crs="EPSG:32614",
        transform=Affine(0.5, 0, 600000.0, 0, -0.5, 3400000.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    )
    tags = {
        "GEOSEG_CLASSES": json.dumps(CLASSES),
        "GEOSEG_MODEL": "bench@000000000000",
        "GEOSEG_SCENE": f"scene{size}.tif",
    }
    with (
        rasterio.open(mask_p, "w", count=1, nodata=255, **prof) as m,
        rasterio.open(probs_p, "w", count=3, **prof) as p,
    ):
        m.update_tags(**tags)
        p.update_tags(**tags)
        for r in range(0, size, BLOCK):
            for c in range(0, size, BLOCK):
                win = Window(c, r, min(BLOCK, size - c), min(BLOCK, size - r))
                cls = _block(size, cells, win)
                m.write(cls, 1, window=win)
                probs = np.where(cls[None] == np.arange(3)[:, None, None], 220, 17)
                p.write(probs.astype(np.uint8), window=win)
    return mask_p, probs_p


REFERENCE = """
import sys, rasterio, numpy as np
from rasterio.features import shapes
with rasterio.open(sys.argv[1]) as src:
    m = src.read(1); t = src.transform
fg = m == 1
print(sum(1 for _ in shapes(fg.astype(np.uint8), mask=fg, transform=t)))
"""

VECTORIZE = """
import sys
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
layers = {sys.argv[3]: "polygons" if sys.argv[3] == "building" else "centerlines"}
o = vectorize_prediction(sys.argv[1], sys.argv[2], VectorizeOptions(workers=int(sys.argv[4]),
                         layers=layers))
print(sum(o.counts.values()))
"""

STARTUP = """
import sys, time
from geoseg.vectorize.run import local_client
t0 = time.perf_counter()
with local_client(int(sys.argv[1])) as client:
    t1 = time.perf_counter()
    client.submit(sum, [1, 2]).result()
print(f"{t1 - t0:.2f} {time.perf_counter() - t1:.2f}")
"""

SKELETON = """
import sys, rasterio
from skimage.morphology import skeletonize
with rasterio.open(sys.argv[1]) as src:
    fg = src.read(1) == 2
print(int(skeletonize(fg).sum()))
"""


def measure(code: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak memory MiB of the process tree, stdout) of ``python -c code args``.

    Memory is the sum of proportional set sizes (PSS), so pages that forked workers share
    with their parent are counted once.
    """
    t0 = time.perf_counter()
    proc = psutil.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read().decode().strip() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"measurement failed: {args}")
    return time.perf_counter() - t0, peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--roads", type=int, default=8192, help="Road mask size for centerlines.")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "vectorize")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    _, _, started = measure(STARTUP, str(a.workers))
    up, down = started.split()
    print(f"local Dask cluster, {a.workers} worker processes: start {up} s, task + close {down} s")
    rows = []
    for size in a.sizes:
        mask_p, probs_p = make_scene(size, a.out)
        rt, rm, rn = measure(REFERENCE, str(mask_p))
        vt, vm, vn = measure(
            VECTORIZE, str(probs_p), str(a.out / f"v{size}"), "building", str(a.workers)
        )
        rows.append((size, rt, rm, rn, vt, vm, vn))
        print(
            f"{size}²: reference shapes {rt:.1f} s {rm:.0f} MiB ({rn} polygons) | "
            f"vectorize {vt:.1f} s {vm:.0f} MiB ({vn} buildings) | "
            f"time ratio {vt / rt:.2f}, RSS ratio {vm / rm:.2f}",
            flush=True,
        )
    if len(rows) > 1:
        a0, b0 = rows[0], rows[-1]
        print(
            f"peak RSS growth {a0[0]}² → {b0[0]}²: vectorize {b0[5] / a0[5]:.2f}x, "
            f"reference {b0[2] / a0[2]:.2f}x"
        )
    mask_p, probs_p = make_scene(a.roads, a.out)
    st, sm, sn = measure(SKELETON, str(mask_p))
    ct, cm, cn = measure(
        VECTORIZE, str(probs_p), str(a.out / f"r{a.roads}"), "road", str(a.workers)
    )
    print(
        f"centerlines {a.roads}²: skeletonize alone {st:.1f} s {sm:.0f} MiB ({sn} px) | "
        f"vectorize roads {ct:.1f} s {cm:.0f} MiB ({cn} lines) | time ratio {ct / st:.2f}"
    )


if __name__ == "__main__":
    main()
