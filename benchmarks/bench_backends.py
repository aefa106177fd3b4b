"""Forward pass of the shipped model per backend and precision, and OpenVINO's conversion.

Usage: python benchmarks/bench_backends.py [--model data_samples/model] [--sizes 640 1024 1600]
       [--reps 3]

Batch 1, every core. The conversion is timed into an empty cache folder (what the first run
of a model on a machine pays), then each window size is compiled once and the variants run
interleaved, ``--reps`` rounds; medians in megapixels per second. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from geoseg.models.backends import openvino_model
from geoseg.models.bundle import load_bundle, load_module
from geoseg.models.predictor import BundleFactory, TorchPredictor, cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "data_samples" / "model"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[640, 1024, 1600])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    cache = Path(tempfile.mkdtemp(prefix="geoseg-bench-cache-"))
    t = time.perf_counter()
    _, _, converted = openvino_model(bundle, partial(load_module, bundle), cache)
    print(json.dumps({"conversion_s": round(time.perf_counter() - t, 2), "converted": converted}))
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    variants = {}
    for prec in precisions:
        variants[f"torch {prec}"] = TorchPredictor(load_module(bundle), "cpu", prec)
        factory = BundleFactory(str(bundle.path), bundle.sha256, "cpu", prec, backend="openvino")
        os.environ["GEOSEG_CACHE"] = str(cache)
        variants[f"openvino {prec}"] = factory.build()
    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = rng.standard_normal((1, len(bundle.spec.bands), size, size)).astype(np.float32)
        first = {}
        for name, pred in variants.items():
            t = time.perf_counter()
            pred(x)  # compile (OpenVINO) and warm up
            first[name] = time.perf_counter() - t
        times: dict[str, list[float]] = {n: [] for n in variants}
        for _ in range(args.reps):
            for name, pred in variants.items():
                t = time.perf_counter()
                pred(x)
                times[name].append(time.perf_counter() - t)
        row = {"size": size}
        for name, ts in times.items():
            row[f"{name} MP/s"] = round(size * size / 1e6 / statistics.median(ts), 2)
            row[f"{name} first s"] = round(first[name], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
