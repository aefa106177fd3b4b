"""The valley cut (``geoseg vectorize --valley M --valley-depth P``) on held-out buildings:
SpaceNet F1 (IoU >= 0.5, touching buildings split) at a grid of widths and depths, on
Banepa's held-out quarter, Austin (never trained on), Atlanta's held-out quarter and the
demo crop ``data_samples/banepa_rgb.tif``. The model predicts each scene once; each setting
vectorizes the same probabilities. The model's other vectorizer settings (minimum area,
contact threshold) apply throughout.

These figures only report: a model's valley setting is chosen on its training parts, by
``python benchmarks/eval_real.py MODEL --tune`` (``geoseg model tune`` tries valley widths).

    python benchmarks/bench_valley.py data_samples/model [--out bench_out/valley]
        [--grid 0,1.5,2,3,3:0.2,5:0.2,5:0.3]

Prints one row per setting (WIDTH or WIDTH:DEPTH; depth 0.1 when not given) and writes
``<out>/valley.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_real import (  # noqa: E402
    BUILDING_SCENES,
    BUILDING_STEMS,
    REPO,
    building_truth,
    evaluate,
    geoseg,
)

from geoseg.evaluate import evaluate_buildings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "valley")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--grid", default="0,1.5,2,3,3:0.2,5:0.2,5:0.3", help="WIDTH[:DEPTH],...")
    args = ap.parse_args()
    evaluate(args.model, args.out, args.shared, BUILDING_SCENES)
    pred = args.out / "pred"
    demo = REPO / "data_samples"
    geoseg("predict", str(demo / "banepa_rgb.tif"), "--model", str(args.model), "--out", str(pred))
    truths = {
        BUILDING_STEMS[name]: building_truth(args.shared / "data", args.out, name)
        for name in BUILDING_SCENES
    }
    truths["banepa_rgb"] = demo / "banepa_buildings.geojson"
    rows = []
    for setting in args.grid.split(","):
        width, _, depth = setting.partition(":")
        vec = args.out / f"valley{setting.replace(':', '_')}"
        t0 = time.perf_counter()
        geoseg(
            "vectorize",
            *(str(pred / f"{stem}.probs.tif") for stem in truths),
            "--out",
            str(vec),
            "--layer",
            "building=polygons",
            "--valley",
            width,
            *(["--valley-depth", depth] if depth else []),
        )
        seconds = time.perf_counter() - t0
        row: dict[str, object] = {
            "valley_m": float(width),
            "valley_depth": float(depth or 0.1),
            "vectorize_s": seconds,
        }
        for stem, truth in truths.items():
            s = evaluate_buildings(vec / f"{stem}.buildings.geojson", truth)
            row[stem] = {"f1": s.f1, "precision": s.precision, "recall": s.recall}
        rows.append(row)
    (args.out / "valley.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'valley m / depth':>16} " + " ".join(f"{s:>22}" for s in truths) + "  vectorize s")
    for r in rows:
        cells = []
        for stem in truths:
            v = r[stem]
            assert isinstance(v, dict)
            cells.append(f"{v['f1']:.3f} (P {v['precision']:.2f} R {v['recall']:.2f})")
        print(
            f"{r['valley_m']:>9g} / {r['valley_depth']:<4g} "
            + " ".join(f"{c:>22}" for c in cells)
            + f"  {r['vectorize_s']:.1f}"
        )


if __name__ == "__main__":
    main()
