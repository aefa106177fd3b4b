"""What test-time augmentation adds and costs: ``geoseg predict --tta none|flips|d4`` side by
side on the real held-out building scenes (Banepa's eastern quarter, Austin), scored by
``eval_real.py``, and the forward pass alone on one real chunk window.

    python benchmarks/bench_tta.py [--model data_samples/model] [--modes none,flips,d4]
        [--rounds 1] [--passes 3] [--forward-only] [--out bench_out/tta] [--shared ../shared]

Accuracy: building pixel IoU and SpaceNet F1 (IoU >= 0.5) per mode, and the share of mask
pixels whose class differs from the mode without augmentation. Time: the wall seconds of each
``geoseg predict --vectorize`` (one process for both scenes, start-up included; with
``--rounds`` > 1 the modes alternate their order and the median is kept), and the median
seconds of one forward pass (``TorchPredictor``, the precision ``auto`` gives) on the first
chunk window of Austin (chunk plus halo: 1728² px for the shipped model), modes interleaved.
On a shared machine single figures drift: read the ratios, measured side by side.
Writes ``<out>/tta.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from _common import austin_window, interleaved_seconds, machine
from eval_real import REPO, evaluate

MODES = ("none", "flips", "d4")
#: The scenes scored (names of ``eval_real.py``), and the stems of their outputs.
SCENES = {"banepa_east": "banepa_east", "austin": "aerial_sample"}


def end_to_end(
    model: Path, out: Path, shared: Path, modes: list[str], rounds: int
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Scores per mode and the wall seconds of each of its ``geoseg predict`` runs."""
    scores: dict[str, dict[str, Any]] = {}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            s = evaluate(model, out / mode, shared, tuple(SCENES), ("--tta", mode))
            scores[mode] = s
            walls[mode].append(s["predict_s"])
    return scores, walls


def forward_seconds(model: Path, shared: Path, modes: list[str], passes: int) -> dict[str, Any]:
    """Median seconds of one forward pass per mode on Austin's first chunk window."""
    from geoseg.models.bundle import load_bundle, load_module
    from geoseg.models.predictor import TorchPredictor, resolve_precision

    bundle = load_bundle(model)
    spec = bundle.spec
    x, window = austin_window(spec, shared)
    precision = resolve_precision("auto", "cpu")
    module = load_module(bundle)
    preds = {m: TorchPredictor(module, "cpu", precision, spec.activation, m) for m in modes}
    seconds, times = interleaved_seconds(preds, x, passes)
    return {
        "window_px": [int(window.height), int(window.width)],
        "precision": precision,
        "seconds": seconds,
        "all_seconds": times,
    }


def changed_share(out: Path, base: str, mode: str, stem: str) -> float:
    """Share of valid mask pixels of ``stem`` whose class differs between two modes."""
    with rasterio.open(out / base / "pred" / f"{stem}.mask.tif") as a:
        ma = a.read(1)
    with rasterio.open(out / mode / "pred" / f"{stem}.mask.tif") as b:
        mb = b.read(1)
    valid = (ma != 255) & (mb != 255)
    return float(np.count_nonzero((ma != mb) & valid) / max(1, np.count_nonzero(valid)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "data_samples" / "model")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, none first")
    ap.add_argument("--rounds", type=int, default=1, help="geoseg predict runs per mode")
    ap.add_argument("--passes", type=int, default=3, help="timed forward passes per mode")
    ap.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "tta")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or modes[0] != "none" or set(modes) - set(MODES):
        ap.error(f"--modes: names among {', '.join(MODES)}, none first; got {args.modes!r}")

    forward = forward_seconds(args.model, args.shared, modes, args.passes)
    if args.forward_only:
        h, w = forward["window_px"]
        print(f"{machine()}; forward pass on {w} x {h} px, {forward['precision']}")
        for mode, sec in forward["seconds"].items():
            ratio = sec / forward["seconds"]["none"]
            runs = ", ".join(f"{t:.2f}" for t in forward["all_seconds"][mode])
            print(f"--tta {mode:<6} {sec:6.2f} s ({ratio:.2f}x); passes: {runs}")
        return
    scores, walls = end_to_end(args.model, args.out, args.shared, modes, args.rounds)
    rows = []
    for mode in modes:
        s = scores[mode]
        wall = statistics.median(walls[mode])
        fwd = forward["seconds"][mode]
        rows.append(
            {
                "mode": mode,
                "forward_s": fwd,
                "forward_ratio": fwd / forward["seconds"]["none"],
                "predict_s": wall,
                "predict_ratio": wall / statistics.median(walls["none"]),
                **{
                    f"{n}_{k}": v
                    for n in SCENES
                    for k, v in (
                        ("iou", s[n]["building_iou"]),
                        ("f1", s[n]["f1_split"]["f1"]),
                        ("precision", s[n]["f1_split"]["precision"]),
                        ("recall", s[n]["f1_split"]["recall"]),
                        ("changed", changed_share(args.out, "none", mode, SCENES[n])),
                    )
                },
            }
        )
    report = {
        "machine": machine(),
        "model": str(args.model),
        "forward": forward,
        "predict_s": walls,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tta.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    h, w = forward["window_px"]
    print(f"{machine()}; forward pass on {w} x {h} px, {forward['precision']}")
    print(
        "| --tta | forward pass s (x) | predict --vectorize s (x) | Banepa IoU | Banepa F1 "
        "(P / R) | Banepa px changed | Austin IoU | Austin F1 (P / R) | Austin px changed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['forward_s']:.2f} ({r['forward_ratio']:.2f}x) "
            f"| {r['predict_s']:.1f} ({r['predict_ratio']:.2f}x) "
            f"| {r['banepa_east_iou']:.3f} | {r['banepa_east_f1']:.3f} "
            f"({r['banepa_east_precision']:.3f} / {r['banepa_east_recall']:.3f}) "
            f"| {100 * r['banepa_east_changed']:.2f} % "
            f"| {r['austin_iou']:.3f} | {r['austin_f1']:.3f} "
            f"({r['austin_precision']:.3f} / {r['austin_recall']:.3f}) "
            f"| {100 * r['austin_changed']:.2f} % |"
        )


if __name__ == "__main__":
    main()
