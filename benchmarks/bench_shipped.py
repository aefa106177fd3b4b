"""The shipped model end to end on a CPU: wall time and peak memory per process, per backend
and chunk, beside the common whole-scene loop.

Usage: python benchmarks/bench_shipped.py [--size 3072] [--model data_samples/model]
       [--variants torch:1024 openvino:1024 openvino:auto naive] [--vectorize/--no-vectorize]

The scene is real imagery: Banepa (``../shared/data/open``, 15 cm) read at 0.30 m, the model's
GSD, and mirror-tiled to ``--size``² px (so every chunk holds real roofs and roads), in
EPSG:32645. Each variant runs ``geoseg predict`` (``--vectorize`` by default) in its own
process, one after another in one run; ``auto`` is the chunk geoseg picks itself. Peak RSS is
the kernel's high-water mark (``VmHWM``) of every process of the run's tree, polled every
0.2 s (the main process's from ``wait4``, exact): the main process and the largest worker are
reported apart. ``naive``: the whole scene in RAM, 512 px tiles with a 64 px overlap, torch
fp32, averaged, one GeoTIFF mask (the issue's common approach).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine

BANEPA = ROOT.parent / "shared" / "data" / "open" / "banepa_buildings_rgb" / "banepa_train_rgb.tif"
OUT = ROOT / "bench_out" / "shipped"
PY = sys.executable

NAIVE = r"""
import sys
from geoseg.runtime import tune_allocator; tune_allocator()
import numpy as np, rasterio, torch
from geoseg.models.bundle import load_bundle, load_module
from geoseg.predict import TorchPredictor
model, path, out = sys.argv[1:4]
b = load_bundle(model); s = b.spec
pred = TorchPredictor(load_module(b), "cpu", "fp32")
with rasterio.open(path) as src:
    img = src.read(s.bands); profile = src.profile          # whole scene in RAM
x = s.normalization.apply(img)                              # whole scene as float32
h, w = img.shape[1:]; tile, lap = 512, 64
acc = np.zeros((len(s.classes), h, w), np.float32)          # full-scene accumulator
cnt = np.zeros((h, w), np.float32)
step = tile - lap
for r in range(0, max(h - lap, 1), step):
    for c in range(0, max(w - lap, 1), step):
        r0, c0 = min(r, h - tile), min(c, w - tile)
        p = pred(x[None, :, r0:r0 + tile, c0:c0 + tile])[0]
        acc[:, r0:r0 + tile, c0:c0 + tile] += p
        cnt[r0:r0 + tile, c0:c0 + tile] += 1
mask = (acc / cnt).argmax(0).astype(np.uint8)
profile.update(count=1, dtype="uint8", compress="deflate", tiled=True, photometric="minisblack")
with rasterio.open(out, "w", **profile) as dst:
    dst.write(mask, 1)
"""


def make_scene(size: int) -> Path:
    """Banepa at 0.30 m, mirror-tiled to ``size``² px (cached under bench_out)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    path = OUT / f"banepa_{size}.tif"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    with rasterio.open(BANEPA) as src:
        h, w = src.height // 2, src.width // 2
        img = src.read(out_shape=(3, h, w), resampling=Resampling.average)
    reps = (1, -(-size // h) + 1, -(-size // w) + 1)
    tiles = np.concatenate([img, img[:, ::-1]], axis=1)  # mirror: no seams in the content
    tiles = np.concatenate([tiles, tiles[:, :, ::-1]], axis=2)
    big = np.tile(tiles, (1, -(-reps[1] // 2), -(-reps[2] // 2)))[:, :size, :size]
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32645",
        "transform": from_origin(340000.0, 3060000.0, 0.3, 0.3),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "photometric": "rgb",
    }
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(big))
    os.replace(tmp, path)
    return path


def _hwm(pid: int) -> int:
    """VmHWM of ``pid`` in KiB (0 when gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def run_tree(cmd: list[str]) -> tuple[float, float, float, int]:
    """Run ``cmd``; (wall s, main process peak MiB, largest other process peak MiB, number of
    other processes seen)."""
    peaks: dict[int, int] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for pid in _descendants(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
            done.wait(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    t.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(out.decode(errors="replace"))
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    others = [v for v in peaks.values() if v]
    # wait4's figure is the largest of the process and its reaped children: the main process's
    # own peak unless a child was larger, which the poll then shows
    main = usage.ru_maxrss
    if others and max(others) >= main:
        main = 0  # unknown apart from the child's: reported as such
    return wall, main / 1024, (max(others) / 1024 if others else 0.0), len(others)


def predict_cmd(scene: Path, model: str, out: Path, *extra: str) -> list[str]:
    """``geoseg predict`` of ``scene`` with ``model`` into ``out``, in this interpreter."""
    return [PY, "-m", "geoseg", "predict", str(scene), "-m", model, "-o", str(out), *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--model", default=str(ROOT / "data_samples" / "model"))
    ap.add_argument(
        "--variants", nargs="+", default=["torch:1024", "openvino:1024", "openvino:auto", "naive"]
    )
    ap.add_argument("--vectorize", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--extra", default="", help="more geoseg predict arguments, one string")
    args = ap.parse_args()
    scene = make_scene(args.size)
    print(f"{machine()}; scene {args.size}² px at 0.30 m ({scene.name}); model {args.model}")
    env_cache = OUT / "cache"
    os.environ["GEOSEG_CACHE"] = str(env_cache)  # conversion once, before the timed runs
    for v in args.variants:
        if v.startswith("openvino"):
            warm = predict_cmd(scene, args.model, OUT / "warm", "--backend", "openvino")
            subprocess.run([*warm, "--chunk", "256", "--outputs", "mask"], check=True)
            break
    print(f"{'variant':<16} {'wall s':>8} {'main MiB':>9} {'worker MiB':>11} {'workers':>8}")
    for v in args.variants:
        if v == "naive":
            cmd = [PY, "-c", NAIVE, args.model, str(scene), str(OUT / "naive_mask.tif")]
        else:
            backend, chunk = v.split(":")
            cmd = predict_cmd(scene, args.model, OUT / v.replace(":", "-"), "--backend", backend)
            if chunk != "auto":
                cmd += ["--chunk", chunk]
            if args.vectorize:
                cmd.append("--vectorize")
            cmd += args.extra.split()
        wall, main_mib, worker_mib, n = run_tree(cmd)
        print(f"{v:<16} {wall:8.1f} {main_mib:9.0f} {worker_mib:11.0f} {n:8d}", flush=True)


if __name__ == "__main__":
    main()
