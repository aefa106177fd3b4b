"""Where the time of one ``geoseg predict`` goes: its phases, timed inside one process.

Runs what ``geoseg predict`` runs (imports, local cluster, one scene, COG publishing) with
timers around each phase, and sums the time spent per chunk in reading, normalizing, the
model (forward and quantization, synchronized by the copy back) and writing each output:

    python benchmarks/bench_phases.py bench_out/scene_8192.tif bench_out/model_resnet18_512_64
    python benchmarks/bench_phases.py SCENE MODEL --device cuda --precision auto

Per-chunk sums are thread time: with several worker or writer threads they overlap, and the
phase spans (first forward to last write, publishing) are what the wall clock sees.

``--null-model`` replaces the model by one that takes no time (its "probabilities" are the
input pixels of the chunk's core, its classes their top bits) and runs the rest as on a GPU
(quantized "on the device", background writers, the GPU's worker threads): what the pipeline
costs around a model that is infinitely fast, the regime of a fast GPU, on any machine:

    python benchmarks/bench_phases.py bench_out/scene_4096.tif bench_out/model_resnet18_512_64 \
        --null-model --chunk 2048

``--repeat N`` predicts the scene N times in one process, as a pipeline does with its scenes,
and prints the anonymous RSS after each.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

SUMS: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)
FIRST: dict[str, float] = {}
LAST: dict[str, float] = {}
LOCK = threading.Lock()


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            e = time.perf_counter()
            with LOCK:
                SUMS[name] += e - t
                COUNTS[name] += 1
                FIRST.setdefault(name, t - T0)
                LAST[name] = e - T0

    return wrapper


class NullPredictor:
    """A predictor that takes no time: "probabilities" are the chunk's input pixels (band k
    is input band k modulo the band count), classes the first band's top two bits."""

    quantizes_on_device = True

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes

    def normalized(self, raw: Any, valid: Any, normalization: Any) -> Any:
        return raw

    def quantized(self, batch: Any, windows: Any) -> list[tuple[Any, Any]]:
        import numpy as np

        out = []
        for raw, (r, c, h, w) in zip(batch, windows, strict=True):
            core = raw[:, r : r + h, c : c + w]
            bands = [k % core.shape[0] for k in range(self.n_classes)]
            q = np.ascontiguousarray(core[bands].astype(np.uint8, copy=False))
            out.append((q, (q[0] >> 6).astype(np.uint8)))
        return out


def install_null_model(n_classes: int) -> int:
    """Replace the engine's model by a :class:`NullPredictor` and run the rest as on a GPU
    (background writers, the GPU's worker threads); returns that worker count."""
    from geoseg import predict as engine
    from geoseg.runtime import cpu_cores

    null = NullPredictor(n_classes)
    engine.get_predictor = lambda factory: null  # type: ignore[assignment]
    engine.write_in_background = lambda options, device: cpu_cores() > 1  # type: ignore[assignment]
    return max(2, min(8, cpu_cores() // 2))


def rss_anon_mib() -> int:
    """This process's anonymous resident memory (heap, not mapped files), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene")
    parser.add_argument("model")
    parser.add_argument("--out", default="bench_out/phases")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--halo", type=int, default=None)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="predict the scene this many times in one process (sums and counts add up); "
        "prints the anonymous RSS after each, to show whether memory is left behind",
    )
    parser.add_argument(
        "--null-model", action="store_true", help="a model that takes no time (see above)"
    )
    args = parser.parse_args()

    from geoseg.runtime import tune_allocator

    tune_allocator()  # as the command line does
    import torch  # noqa: F401

    t_torch = time.perf_counter() - T0
    from geoseg import predict as engine
    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene, warm_up
    from geoseg.io import writer as raster
    from geoseg.io.raster import open_scene
    from geoseg.models.bundle import load_bundle, load_module  # noqa: F401  (smp)

    marks: dict[str, float] = {"imports torch": t_torch}
    marks["imports all"] = time.perf_counter() - T0

    engine.read_padded = timed("read", engine.read_padded)
    spec_norm = type(load_bundle(args.model).spec.normalization)
    spec_norm.apply = timed("normalize", spec_norm.apply)
    engine.TorchPredictor.quantized = timed(
        "model (gpu, quantized)", engine.TorchPredictor.quantized
    )
    engine.TorchPredictor.normalized = timed("normalize (device)", engine.TorchPredictor.normalized)
    engine.TorchPredictor.__call__ = timed("model", engine.TorchPredictor.__call__)
    engine._quantize = timed("quantize (cpu)", engine._quantize)
    engine.get_predictor = timed("get predictor", engine.get_predictor)
    raster.RasterWriter.write = timed("write (cut and queue tiles)", raster.RasterWriter.write)
    raster.RasterWriter._encode_image = timed(
        "compress image tiles (all threads)", raster.RasterWriter._encode_image
    )
    raster.RasterWriter._encode_mask = timed(
        "compress mask tiles (all threads)", raster.RasterWriter._encode_mask
    )
    raster.downsample2 = timed("overview cells (all threads)", raster.downsample2)
    raster.cog.write_cog = timed("COG layout (copy of the tiles)", raster.cog.write_cog)
    raster.RasterWriter.commit = timed("commit", raster.RasterWriter.commit)

    bundle = load_bundle(args.model)
    workers = args.workers
    if args.null_model:
        from geoseg.runtime import cpu_cores

        null = NullPredictor(len(bundle.spec.classes))
        engine.get_predictor = timed("get predictor", lambda factory: null)
        engine.write_in_background = lambda options, device: cpu_cores() > 1
        workers = workers or max(2, min(8, cpu_cores() // 2))  # as on CUDA
        null.quantized = timed("model (gpu, quantized)", null.quantized)  # type: ignore[method-assign]
    options = PredictOptions(
        device=args.device,
        precision=args.precision,
        workers=workers,
        chunk=args.chunk,
        halo=args.halo,
    )
    scene = open_scene(args.scene)
    warm_up(bundle, options, scene)  # as the command line does
    t = time.perf_counter()
    with open_client(options) as client:
        marks["cluster start"] = time.perf_counter() - t
        t, cpu = time.perf_counter(), time.process_time()
        result = predict_scene(scene, bundle, Path(args.out), options, client)
        marks["predict_scene"] = time.perf_counter() - t
        scenes = [(marks["predict_scene"], time.process_time() - cpu)]
        rss_after = [rss_anon_mib()]
        for _ in range(args.repeat - 1):  # the same scene again, in the same process
            t, cpu = time.perf_counter(), time.process_time()
            predict_scene(scene, bundle, Path(args.out), options, client)
            scenes.append((time.perf_counter() - t, time.process_time() - cpu))
            rss_after.append(rss_anon_mib())
        t = time.perf_counter()
    marks["cluster close"] = time.perf_counter() - t
    marks["total in process"] = time.perf_counter() - T0
    first_model = min(
        (FIRST[k] for k in ("model", "model (gpu, quantized)") if k in FIRST), default=0.0
    )
    marks["streaming (first model call → commit)"] = FIRST["commit"] - first_model
    print(
        json.dumps(
            {
                "scene": args.scene,
                "chunks": result.chunks,
                "device": "null model" if args.null_model else args.device,
                "marks_s": {k: round(v, 3) for k, v in marks.items()},
                "sums_s": {k: round(v, 3) for k, v in SUMS.items()},
                "counts": dict(COUNTS),
                "anonymous_rss_mib_after_each_scene": rss_after,
                # wall and CPU seconds (all threads) of each scene; after the first, a batch's
                # marginal cost (the first pays one-off imports and first-touch costs)
                "scenes_wall_s": [round(w, 2) for w, _ in scenes],
                "scenes_cpu_s": [round(c, 2) for _, c in scenes],
                "first_s": {k: round(v, 3) for k, v in FIRST.items()},
                "last_s": {k: round(v, 3) for k, v in LAST.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
