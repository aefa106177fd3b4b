"""What each output costs: ``predict_scene`` with a model that takes no time, per choice of
rasters (``--outputs``) and codec (``--compress``), side by side in one process.

The null model (see ``bench_phases.py``) leaves only the pipeline's own work: reading,
quantizing, writing the scratch files and their overview levels, and building the COGs. Its
"probabilities" are the scene's pixels and its classes noise, so vectors are not timed here
(``bench_vectorize.py`` times them on a real mask). Each configuration runs ``--repeat``
times; the fastest is printed, with the bytes written and the throughput in scene MP/s.

    python benchmarks/bench_outputs.py [--size 8192] [--repeat 2]
"""

from __future__ import annotations

import shutil
import time

from _common import machine, scene_args
from bench_phases import install_null_model
from bench_predict import OUT, bundle, scene


def main() -> None:
    args = scene_args(__doc__)

    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene
    from geoseg.io.raster import open_scene
    from geoseg.models.bundle import load_bundle

    path = scene(args.size)
    model = load_bundle(bundle("resnet18", 512, 64))
    workers = install_null_model(len(model.spec.classes))
    sc = open_scene(path)
    mp = sc.width * sc.height / 1e6
    configs = [
        ("mask", ("mask",), "deflate"),
        ("probs,mask (default)", ("probs", "mask"), "deflate"),
        ("probs,mask zstd", ("probs", "mask"), "zstd"),
        ("probs,mask lzw", ("probs", "mask"), "lzw"),
        ("mask zstd", ("mask",), "zstd"),
    ]
    print(f"machine: {machine()}")
    print(f"scene {sc.width}x{sc.height} ({mp:.0f} MP), null model, chunk {args.chunk}, halo 64")
    print(f"{'rasters':<22} {'seconds':>8} {'MP/s':>7} {'MiB written':>12}")
    base = OUT / "outputs"
    times: dict[str, float] = {}
    with open_client(PredictOptions(workers=workers)) as client:
        for name, rasters, codec in configs:
            best = float("inf")
            size = 0
            for _ in range(args.repeat):
                out = base / name.replace(" ", "_").replace(",", "+")
                shutil.rmtree(out, ignore_errors=True)
                opts = PredictOptions(
                    workers=workers, chunk=args.chunk, halo=64, rasters=rasters, compress=codec
                )
                t = time.perf_counter()
                predict_scene(sc, model, out, opts, client)
                best = min(best, time.perf_counter() - t)
                size = sum(p.stat().st_size for p in out.iterdir())
            times[name] = best
            print(f"{name:<22} {best:>8.2f} {mp / best:>7.1f} {size / 2**20:>12.1f}")
    print(
        f"probabilities' share of the default outputs' time: "
        f"{1 - times['mask'] / times['probs,mask (default)']:.0%}"
    )


if __name__ == "__main__":
    main()
