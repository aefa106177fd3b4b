"""Road gap bridging (``geoseg vectorize --bridge``): APLS and buffer IoU at a grid of bridge
distances, on the TRAINING parts of SpaceNet 3 Las Vegas (x 0-0.75) and Paris (y 0-0.6) and
on their held-out parts (x 0.75-1, y 0.6-1). A model has learned its training parts' roads,
which have few gaps there, so those parts hardly tell distances apart; ``eval_real.py --tune``
chooses the distance on the held-out parts, and this script also scores each city at the
distance chosen on the other cities' held-out parts, a figure that is not in-sample. The
model predicts each part once; each distance vectorizes the same probabilities.

    python benchmarks/tune_roads.py data_samples/model [--out bench_out/roads]
        [--bridges 0,5,10,15,20,30] [--predict-args='--tta flips']

Prints one row per distance and scene part, the distance with the best mean APLS over the
training parts, and each city's held-out APLS at the distance chosen on the other cities'
held-out parts (leave one city out); writes ``<out>/roads.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_real import REPO, ROAD_SCENES, clip_truth, geoseg, road_files, road_part  # noqa: E402

from geoseg.evaluate import evaluate_roads  # noqa: E402


def cut(shared: Path, out: Path) -> dict[str, tuple[Path, Path, bool]]:
    """name → (image, truth, is a training part): the two parts of each road scene."""
    parts: dict[str, tuple[Path, Path, bool]] = {}
    data = shared / "data"
    for city in ROAD_SCENES:
        for role, held_out in (("train", False), ("held-out", True)):
            name = f"{city}_{role}"
            part = road_part(data, city, held_out, out / f"{name}.tif")
            truth = out / f"{name}_truth.geojson"
            clip_truth(road_files(data, city)[1], part, truth)
            parts[name] = (part, truth, not held_out)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "roads")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--bridges", default="0,5,10,15,20,30", help="bridge distances (m)")
    ap.add_argument("--predict-args", default="", help="more arguments for geoseg predict")
    args = ap.parse_args()
    bridges = [float(b) for b in args.bridges.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    parts = cut(args.shared, args.out)
    pred = args.out / "pred"
    geoseg(
        "predict",
        *(str(p[0]) for p in parts.values()),
        "--model",
        str(args.model),
        "--out",
        str(pred),
        "--device",
        "cpu",
        *shlex.split(args.predict_args),
    )
    rows = []
    for bridge in bridges:
        vec = args.out / f"bridge{bridge:g}"
        geoseg(
            "vectorize",
            *(str(pred / f"{name}.probs.tif") for name in parts),
            "--out",
            str(vec),
            "--layer",
            "road=centerlines",
            "--bridge",
            f"{bridge:g}",
        )
        for name, (_, truth, train) in parts.items():
            r = evaluate_roads(vec / f"{name}.roads.geojson", truth, 6.0)
            rows.append({"bridge_m": bridge, "part": name, "train": train, **r.to_dict()})
    (args.out / "roads.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(f"{'bridge (m)':>10} {'part':<16} {'IoU':>6} {'APLS':>6} {'t→p':>6} {'p→t':>6}")
    for r in rows:
        print(
            f"{r['bridge_m']:>10g} {r['part']:<16} {r['iou']:>6.3f} {r['apls']:>6.3f} "
            f"{r['apls_truth_to_pred']:>6.3f} {r['apls_pred_to_truth']:>6.3f}"
        )

    training = [name for name, (_, _, train) in parts.items() if train]
    held = [name for name in parts if name not in training]

    def mean_apls(b: float, names: list[str]) -> float:
        got = [r["apls"] for r in rows if r["bridge_m"] == b and r["part"] in names]
        return sum(got) / len(got)

    def chosen(names: list[str]) -> float:
        """The distance with the best mean APLS over ``names``; on a tie the shorter, as
        ``geoseg model tune`` chooses."""
        return max(bridges, key=lambda d: (round(mean_apls(d, names), 9), -d))

    best = chosen(training)
    for b in bridges:
        mark = "  <- best on the training parts" if b == best else ""
        print(
            f"bridge {b:g} m: mean APLS training parts {mean_apls(b, training):.3f}, "
            f"held-out {mean_apls(b, held):.3f}{mark}"
        )

    # The model learned its training parts' roads, which have few gaps there, so those parts
    # hardly tell distances apart. Choosing on the held-out part of the other cities, each
    # city's own held-out part still only reports.
    crossed = []
    print("chosen on the other cities' held-out parts (leave one city out):")
    for city in held:
        others = [c for c in held if c != city]
        pick = chosen(others)
        crossed.append(mean_apls(pick, [city]))
        print(f"  {city}: {pick:g} m (best on {', '.join(others)}): APLS {crossed[-1]:.3f}")
    print(
        f"  mean APLS {sum(crossed) / len(crossed):.3f}, against {mean_apls(best, held):.3f} "
        f"at the training parts' choice ({best:g} m)"
    )
    every = chosen(held)
    print(f"best on every held-out part together: {every:g} m (APLS {mean_apls(every, held):.3f})")


if __name__ == "__main__":
    main()
