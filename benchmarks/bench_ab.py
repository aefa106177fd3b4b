"""Two versions of geoseg side by side: ``geoseg predict`` runs alternated between this tree
and another checkout, in fresh processes, with wall time and peak RSS of each.

On a noisy machine single runs drift by 10 % and more; alternating the versions (A B, B A,
A B, ...) and comparing medians shows what a change does:

    git worktree add /tmp/geoseg-before <commit>
    python benchmarks/bench_ab.py /tmp/geoseg-before --size 4096 --rounds 6 \
        [--predict-args=--vectorize] [--scene S.tif --model BUNDLE]

The scene and model are made as ``bench_predict.py`` makes them (same cache in bench_out/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _common import ROOT, run_measured
from bench_predict import OUT, PY, bundle, scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (its root directory)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scene", type=Path, help="a scene of your own (default: synthetic)")
    parser.add_argument("--model", type=Path, help="a model bundle of your own")
    parser.add_argument(
        "--predict-args",
        default="",
        help="more arguments for geoseg predict, one string: --predict-args=--vectorize",
    )
    args = parser.parse_args()
    other = args.other.resolve()
    if not (other / "geoseg" / "__init__.py").is_file():
        raise SystemExit(f"{other}: not a geoseg checkout (no geoseg/__init__.py)")
    scene_path = args.scene or scene(args.size)
    model = args.model or bundle(args.encoder, args.chunk, args.halo)
    trees = {"this": ROOT, "other": other}
    walls: dict[str, list[float]] = {"this": [], "other": []}
    for i in range(args.rounds):
        for name in ("this", "other") if i % 2 == 0 else ("other", "this"):
            env = dict(os.environ, PYTHONPATH=str(trees[name]))
            env.setdefault("GDAL_CACHEMAX", "64")
            out = OUT / f"ab_{name}"
            cmd = [PY, "-m", "geoseg", "-q", "predict", str(scene_path), "-m", str(model)]
            cmd += ["-o", str(out), "--device", args.device, *args.predict_args.split()]
            wall, rss = run_measured(cmd, env)
            walls[name].append(wall)
            print(f"round {i + 1} {name:5s}: {wall:7.1f} s, peak RSS {rss:6.0f} MiB", flush=True)
    this, before = statistics.median(walls["this"]), statistics.median(walls["other"])
    print(f"median this tree {this:.1f} s, other {before:.1f} s: ratio {this / before:.3f}")


if __name__ == "__main__":
    sys.exit(main())
