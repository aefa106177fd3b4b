"""What vectors add to a predict: made while the scene is predicted, against made afterwards.

``predict_scene`` with a model that takes no time (the pipeline's own work; see
``bench_phases.py``) on a synthetic 0.5 m scene of buildings and roads whose pixels are the
probabilities of background, building and road (the null model hands them on; its classes are
their argmax). So the rasters and the vectors are those of a real prediction, about 50,000
buildings in 16384². Side by side, in one process, fastest of ``--repeat``:

* ``rasters only``: no vectors;
* ``then vectorize``: the rasters, then ``vectorize_prediction`` on the finished raster on a
  local cluster of ``--workers`` processes (cluster started beforehand, not timed);
* ``then vectorize, threads``: the same on predict's own in-process cluster of threads (what
  ``geoseg predict --vectorize`` did before vectors were streamed);
* ``streamed``: ``predict_scene(vectorize=...)``: each vectorize chunk runs on the processes
  as soon as its tiles are stored.

``--forward-mps R`` makes the null model wait as long as a forward pass at R MP/s on another
device would (a GPU: the cores stay free meanwhile), to show what streaming does with them.

    python benchmarks/bench_overlap.py [--size 16384] [--repeat 2] [--workers 2] [--forward-mps R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Any

import numpy as np
from _common import machine
from bench_phases import NullPredictor, install_null_model
from bench_predict import OUT, bundle
from bench_vectorize import make_scene


class ArgmaxNull(NullPredictor):
    """The null model, its classes the argmax of its "probabilities"; with ``forward_mps``, it
    also waits as long as a forward pass at that rate on another device (a GPU) would take,
    leaving this machine's cores free meanwhile, as a GPU does."""

    forward_mps = 0.0

    def quantized(self, batch: Any, windows: Any) -> list[tuple[Any, Any]]:
        if self.forward_mps:
            time.sleep(sum(r.shape[-2] * r.shape[-1] for r in batch) / 1e6 / self.forward_mps)
        return [
            (q, np.argmax(q, axis=0).astype(np.uint8)) for q, _ in super().quantized(batch, windows)
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument(
        "--workers",
        type=int,
        default=max(2, (os.cpu_count() or 2) // 2),
        help="vectorize processes (default: as geoseg beside a prediction, half the cores, 2+)",
    )
    ap.add_argument(
        "--forward-mps",
        type=float,
        default=0.0,
        help="simulate a forward pass on another device at this many MP/s (default: none)",
    )
    args = ap.parse_args()

    from geoseg import predict as engine
    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene
    from geoseg.io.raster import open_scene
    from geoseg.models.bundle import load_bundle
    from geoseg.vectorize import VectorizeOptions, vectorize_prediction
    from geoseg.vectorize.run import local_client

    OUT.mkdir(exist_ok=True)
    _, probs_scene = make_scene(args.size, OUT)
    model = load_bundle(bundle("resnet18", 512, 64))
    threads = install_null_model(len(model.spec.classes))
    null = ArgmaxNull(len(model.spec.classes))
    null.forward_mps = args.forward_mps
    engine.get_predictor = lambda factory: null  # type: ignore[assignment]
    sc = open_scene(probs_scene)
    mp = sc.width * sc.height / 1e6
    vopts = VectorizeOptions(workers=args.workers)
    print(f"machine: {machine()}")
    print(
        f"scene {sc.width}x{sc.height} ({mp:.0f} MP), null model (argmax classes"
        + (f", forward pass simulated at {args.forward_mps:g} MP/s" if args.forward_mps else "")
        + f"), chunk "
        f"{args.chunk}, halo 64; {threads} predict threads, {args.workers} vectorize processes"
    )
    print(f"{'outputs':<20} {'how':<26} {'seconds':>8} {'MP/s':>7} {'vectors add':>12}")
    with local_client(args.workers) as procs, open_client(PredictOptions(workers=threads)) as cl:
        for rasters in (("mask",), ("probs", "mask")):
            opts = PredictOptions(workers=threads, chunk=args.chunk, halo=64, rasters=rasters)

            def run(how: str, folder: Any, opts: Any = opts) -> None:
                if how == "streamed":
                    predict_scene(sc, model, folder, opts, cl, vectorize=vopts, vector_client=procs)
                    return
                res = predict_scene(sc, model, folder, opts, cl)
                if how != "rasters only":
                    client = cl if how.endswith("threads") else procs
                    vectorize_prediction(res.probs or res.mask, folder, vopts, client=client)

            run("rasters only", OUT / "overlap" / "warm-up")  # first-run costs, untimed
            ways = ["rasters only", "then vectorize", "then vectorize, threads", "streamed"]
            base = 0.0
            for how in ways:
                best = float("inf")
                for _ in range(args.repeat):
                    out = OUT / "overlap" / how.replace(" ", "_").replace(",", "")
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    run(how, out)
                    best = min(best, time.perf_counter() - t)
                base = base or best
                added = f"{best - base:+.2f} s" if how != "rasters only" else ""
                name = ",".join(rasters) + ",vectors" * (how != "rasters only")
                print(f"{name:<20} {how:<26} {best:>8.2f} {mp / best:>7.1f} {added:>12}")


if __name__ == "__main__":
    main()
