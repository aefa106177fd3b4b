"""Where per-chunk time goes: the same chunk work in the main thread, a thread, a Dask task.

Run ``bench_predict.py throughput --size 4096`` first (it makes the scene and the bundle).

    python benchmarks/bench_threads.py
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from _common import ROOT

from geoseg.engine.chunks import ChunkPlan, predict_chunks
from geoseg.engine.cluster import open_client
from geoseg.engine.grid import ChunkGrid
from geoseg.engine.options import PredictOptions
from geoseg.io.raster import open_scene
from geoseg.io.reader import read_padded
from geoseg.models.bundle import load_bundle
from geoseg.models.predictor import BundleFactory, get_predictor

OUT = ROOT / "bench_out"


def main() -> None:
    bundle = load_bundle(OUT / "model_resnet18_512_64")
    scene = open_scene(OUT / "scene_4096.tif")
    factory = BundleFactory(str(bundle.path.resolve()), bundle.sha256, "cpu", "fp32")
    predictor = get_predictor(factory)
    spec = bundle.spec
    chunks = list(ChunkGrid(4096, 4096, spec.chunk, spec.halo, multiple=spec.stride))[9:15]
    plan = ChunkPlan(scene, tuple(spec.bands), spec.normalization, len(spec.classes))
    xs = [spec.normalization.apply(*read_padded(scene, c.padded, spec.bands))[None] for c in chunks]
    predictor(xs[0])

    def per_chunk(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / len(chunks)

    def work() -> None:
        for c in chunks:
            predict_chunks(plan, [c], factory)

    rows = {
        "bare forward, main thread": per_chunk(lambda: [predictor(x) for x in xs]),
        "predict_chunks, main thread": per_chunk(work),
    }
    box: dict[str, float] = {}
    thread = threading.Thread(target=lambda: box.setdefault("t", per_chunk(work)))
    thread.start()
    thread.join()
    rows["predict_chunks, secondary thread"] = box["t"]
    with open_client(PredictOptions(device="cpu")) as client:
        client.submit(predict_chunks, plan, [chunks[0]], factory).result()

        def dask() -> None:
            for c in chunks:
                client.submit(predict_chunks, plan, [c], factory, pure=False).result()

        rows["predict_chunks, Dask task"] = per_chunk(dask)
    base = rows["bare forward, main thread"]
    for name, seconds in rows.items():
        print(f"  {name:34s} {seconds:6.3f} s/chunk  ({seconds / base:.3f}x bare)")
    print(f"  ({len(chunks)} chunks of {int(chunks[0].padded.width)}² px; numpy {np.__version__})")


if __name__ == "__main__":
    main()
