"""The COG tile codecs side by side: throughput and ratio on probability-like tiles.

Compresses 512² tiles of smooth 3-band uint8 "probabilities" (blurred noise) after TIFF's
horizontal differencing (predictor 2), as the writer does, with each codec at the writer's
level, on one thread and on every core:

    python benchmarks/bench_codecs.py
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np
from _common import machine
from scipy.ndimage import gaussian_filter

from geoseg.runtime import cpu_cores


def tiles(n: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    field = gaussian_filter(rng.standard_normal((512, 512 * n)).astype(np.float32), 6)
    field = (field - field.min()) / (field.max() - field.min())
    probs = (np.stack([field, 1 - field, field / 2]) * 255).round().astype(np.uint8)
    out = []
    for i in range(n):
        t = np.ascontiguousarray(probs[:, :, i * 512 : (i + 1) * 512].transpose(1, 2, 0))
        d = t.copy()
        d[:, 1:] -= t[:, :-1]
        out.append(d)
    return out


CODECS: dict[str, Callable[[np.ndarray], bytes]] = {
    "zlib deflate level 1 (stdlib)": lambda a: zlib.compress(a.tobytes(), 1),
    "libdeflate level 1 (imagecodecs; the default)": lambda a: imagecodecs.deflate_encode(
        a, level=1
    ),
    "zstd level 1 (imagecodecs)": lambda a: imagecodecs.zstd_encode(a, level=1),
    "lzw (imagecodecs)": lambda a: imagecodecs.lzw_encode(a),
}


def main() -> None:
    data = tiles()
    raw = sum(t.nbytes for t in data)
    cores = cpu_cores()
    print(machine())
    print(f"{'codec':48} {'1 thread MB/s':>14} {f'{cores} threads MB/s':>15} {'ratio':>6}")
    for name, fn in CODECS.items():
        rounds = 4
        t = time.perf_counter()
        size = sum(len(fn(x)) for _ in range(rounds) for x in data)
        one = rounds * raw / (time.perf_counter() - t) / 1e6
        with ThreadPoolExecutor(cores) as pool:
            t = time.perf_counter()
            list(pool.map(fn, [x for _ in range(rounds) for x in data]))
            many = rounds * raw / (time.perf_counter() - t) / 1e6
        print(f"{name:48} {one:14.0f} {many:15.0f} {rounds * raw / size:6.2f}")


if __name__ == "__main__":
    main()
