"""The writer alone: stream an existing prediction back through ``RasterWriter``, timed.

Reads ``PREFIX.probs.tif`` and ``PREFIX.mask.tif`` (the outputs of an earlier run, e.g. of
``bench_phases.py``) chunk by chunk, writes them as ``geoseg predict`` would, and prints the
streaming time (tiles cut, compressed on every core and stored), the time spent reading the
sources, and the commit (the last tiles and the COG layout), each with the process's CPU time
during it (CPU ≈ cores × wall means the phase is compression-bound):

    python benchmarks/bench_phases.py bench_out/scene_16384.tif bench_out/model_resnet18_512_64 \\
        --null-model --chunk 2048 --halo 64 --out bench_out/phases
    python benchmarks/bench_writer.py bench_out/phases/scene_16384 --chunk 2048
    python benchmarks/bench_writer.py bench_out/phases/scene_16384 --chunk 2048 --foreground
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import rasterio
from rasterio.windows import Window

from geoseg.io.raster import open_scene
from geoseg.io.writer import RasterWriter


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="PREFIX of PREFIX.probs.tif and PREFIX.mask.tif")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="write on the calling thread (the CPU path); default: background threads (GPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="compression threads")
    parser.add_argument("--compress", default="deflate", choices=("deflate", "zstd", "lzw"))
    args = parser.parse_args()
    probs_path, mask_path = f"{args.prefix}.probs.tif", f"{args.prefix}.mask.tif"
    scene = open_scene(probs_path)  # its grid
    with (
        rasterio.open(probs_path) as probs,
        rasterio.open(mask_path) as mask,
        tempfile.TemporaryDirectory(dir=Path(args.prefix).parent) as tmp,
    ):
        writer = RasterWriter(
            scene, background=not args.foreground, compress=args.compress, threads=args.threads
        )
        writer.add("probs", Path(tmp) / "probs.tif", probs.count, resampling="average")
        writer.add("mask", Path(tmp) / "mask.tif", 1, nodata=255)
        reading = 0.0
        t0, c0 = time.perf_counter(), cpu_seconds()
        with writer:
            for col in range(0, scene.width, args.chunk):
                for row in range(0, scene.height, args.chunk):
                    win = Window(
                        col,
                        row,
                        min(args.chunk, scene.width - col),
                        min(args.chunk, scene.height - row),
                    )
                    t = time.perf_counter()
                    p, m = probs.read(window=win), mask.read(window=win)
                    reading += time.perf_counter() - t
                    writer.write("probs", win, p)
                    writer.write("mask", win, m)
            writer._drain()
            streaming, c_streaming = time.perf_counter() - t0, cpu_seconds() - c0
            t1, c1 = time.perf_counter(), cpu_seconds()
        commit, c_commit = time.perf_counter() - t1, cpu_seconds() - c1
    print(
        json.dumps(
            {
                "prefix": args.prefix,
                "size": [scene.width, scene.height],
                "background": not args.foreground,
                "threads": writer.threads,
                "compress": args.compress,
                "streaming_s": round(streaming, 3),
                "streaming_cpu_s": round(c_streaming, 3),
                "reading_sources_s": round(reading, 3),
                "commit_s": round(commit, 3),
                "commit_cpu_s": round(c_commit, 3),
                "mpx_per_s": round(scene.width * scene.height / (streaming + commit) / 1e6, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
