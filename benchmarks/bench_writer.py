"""The writer alone: stream an existing prediction back through ``RasterWriter``, timed.

Reads ``PREFIX.probs.tif`` and ``PREFIX.mask.tif`` (the outputs of an earlier run, e.g. of
``bench_phases.py``) chunk by chunk, writes them as ``geoseg predict`` would, and prints the
streaming time, the time spent reading the sources, and each output's COG conversion with the
process's CPU time during it (CPU ≈ cores × wall means the conversion is compression-bound):

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
from typing import Any

import rasterio
from rasterio.windows import Window

from geoseg import writer as raster
from geoseg.raster import open_scene
from geoseg.writer import RasterWriter


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
    parser.add_argument("--scratch", choices=("auto", "none", "zstd"), default="auto")
    args = parser.parse_args()
    raster.SCRATCH_COMPRESSION = args.scratch

    publish: dict[str, dict[str, float]] = {}
    original = RasterWriter._publish

    def timed_publish(self: RasterWriter, out: Any, tmp: Path) -> None:
        t, c = time.perf_counter(), cpu_seconds()
        original(self, out, tmp)
        publish[out.final.name] = {
            "wall_s": round(time.perf_counter() - t, 3),
            "process_cpu_s_meanwhile": round(cpu_seconds() - c, 3),
        }

    RasterWriter._publish = timed_publish  # type: ignore[method-assign]
    probs_path, mask_path = f"{args.prefix}.probs.tif", f"{args.prefix}.mask.tif"
    scene = open_scene(probs_path)  # its grid
    with (
        rasterio.open(probs_path) as probs,
        rasterio.open(mask_path) as mask,
        tempfile.TemporaryDirectory(dir=Path(args.prefix).parent) as tmp,
    ):
        writer = RasterWriter(scene, background=not args.foreground)
        writer.add("probs", Path(tmp) / "probs.tif", probs.count, resampling="average")
        writer.add("mask", Path(tmp) / "mask.tif", 1, nodata=255)
        reading = 0.0
        t0 = time.perf_counter()
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
            streaming = time.perf_counter() - t0
            t1 = time.perf_counter()
        commit = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "prefix": args.prefix,
                "size": [scene.width, scene.height],
                "background": not args.foreground,
                "scratch": args.scratch,
                "streaming_s": round(streaming, 3),
                "reading_sources_s": round(reading, 3),
                "commit_s": round(commit, 3),
                "publish": publish,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
