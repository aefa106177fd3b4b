"""What the new cities add: the six-city training set against the same budget without Atlanta,
Rio and Dubai, measured on Austin (never trained on) and on every hold-out.

Usage: python benchmarks/ab_cities.py [--epochs 3] [--chips 480] [--runs six three ...]
       [--cache DIR] [--skip-train]

Both runs start from ``data_samples/train_cities.yml`` (same model, ImageNet start, chips,
optimizer, seed and hold-outs) with the same number of epochs and chips per epoch: ``six``
keeps every scene, ``three`` keeps Banepa, Las Vegas and Paris (the town and the road cities
the earlier model knew). The same budget also compares encoders and input scalings on all six
cities: ``lite2`` swaps Lite0 for EfficientNet-Lite2 (ImageNet start too), ``six-half`` and
``lite2-half`` scale the input as the Lite weights were trained, (x - 127.5) / 127.5, instead
of ImageNet's mean and std; ``six-seed1`` is ``six`` with another seed, to show how far runs
that differ only by chance land apart; ``banepa3`` and ``banepa3-seed1`` draw Banepa three
times as often. Each run trains into ``bench_out/ab-cities/<run>/``
and is then scored by ``benchmarks/eval_real.py`` on every scene it knows; the score tables
are printed side by side. ``--cache``: a chip cache folder of an earlier run of the same
scenes (linked, not copied: the cache is keyed by its inputs), to skip decoding them again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, machine

CONFIG = ROOT / "data_samples" / "train_cities.yml"
OUT = ROOT / "bench_out" / "ab-cities"
# run name -> (the scenes it keeps, None for all; what it changes in the model section and in
# the optim section; scene weights it sets)
HALF = {"scale": 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
LITE2 = {"encoder": "tu-tf_efficientnet_lite2", "encoder_weights": "lite2-imagenet"}
RUNS: dict[str, tuple[set[str] | None, dict[str, Any], dict[str, Any], dict[str, float]]] = {
    "six": (None, {}, {}, {}),
    "three": ({"banepa", "vegas", "paris"}, {}, {}, {}),
    # the encoders' own input scaling: the Lite weights were trained on (x - 127) / 128
    "six-half": (None, {"normalization": HALF}, {}, {}),
    "lite2": (None, LITE2, {}, {}),
    "lite2-half": (None, {**LITE2, "normalization": HALF}, {}, {}),
    # another seed of "six": how far two runs that differ only by chance land apart
    "six-seed1": (None, {}, {"seed": 1}, {}),
    # the aerial town drawn three times as often (Austin is aerial imagery too), two seeds
    "banepa3": (None, {}, {}, {"banepa": 3.0}),
    "banepa3-seed1": (None, {}, {"seed": 1}, {"banepa": 3.0}),
}


def run_dir(name: str, epochs: int, chips: int) -> Path:
    """Where run ``name`` with this budget trains and is scored."""
    return OUT / f"{name}-e{epochs}-c{chips}"


def write_config(name: str, epochs: int, chips: int) -> Path:
    """``train_cities.yml`` with only run ``name``'s scenes, the budget, and outputs under
    bench_out (paths made absolute, so the file can live there)."""
    doc: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    base = CONFIG.parent
    keep, model, optim, weights = RUNS[name]
    scenes = []
    for scene in doc["scenes"]:
        if keep is not None and scene["name"] not in keep:
            continue
        scene["weight"] = weights.get(scene["name"], scene.get("weight", 1.0))
        scene["image"] = os.path.normpath(base / scene["image"])
        for label in scene.get("labels", []):
            label["path"] = os.path.normpath(base / label["path"])
        scenes.append(scene)
    doc["scenes"] = scenes
    doc["chips"]["chips_per_epoch"] = chips
    doc["optim"].update(optim)
    doc["optim"]["epochs"] = epochs
    run = run_dir(name, epochs, chips)
    doc["out"] = str(run / "model")
    doc["checkpoint"] = str(run / "checkpoint")
    doc.pop("snapshot", None)
    doc["model"].update(model)
    doc["model"]["name"] = f"geoseg-ab-{name}"
    run.mkdir(parents=True, exist_ok=True)
    path = run / "train.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def link_cache(cache: Path, run: Path) -> None:
    """Hard-link an earlier chip cache into the checkpoint folder of ``run``."""
    dest = run / "checkpoint" / "cache"
    if dest.exists() or not cache.is_dir():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(cache), str(dest)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--chips", type=int, default=480, help="chips per epoch")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--cache", type=Path, help="an earlier chip cache of these scenes")
    ap.add_argument("--skip-train", action="store_true", help="score the models already there")
    args = ap.parse_args()
    print(f"{machine()}; {args.epochs} epochs of {args.chips} chips per run", flush=True)
    scores: dict[str, dict[str, Any]] = {}
    for name in args.runs:
        config = write_config(name, args.epochs, args.chips)
        run = config.parent
        if not args.skip_train:
            if args.cache is not None:
                link_cache(args.cache, run)
            subprocess.run([sys.executable, "-m", "geoseg", "train", str(config)], check=True)
        out = run / "eval"
        model = run / "model"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "eval_real.py"),
                str(model),
                "--out",
                str(out),
            ],
            check=True,
        )
        scores[name] = json.loads((out / "scores.json").read_text())
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
