"""Sharpness and the input low-pass filter (``model.json``'s ``input_low_pass_m``).

1. Blurred inputs: the held-out building scenes (Banepa's eastern quarter, Austin, Atlanta's
   eastern quarter) predicted as they are and blurred to a coarser effective resolution on
   their own pixel grid (down-sampled to ``--blur-m`` metres per pixel with an anti-aliasing
   filter, then up-sampled back with bicubic interpolation): the buildings keep their size in
   pixels and only fine detail is lost. A scene already coarser than a column is predicted as
   it is there. Prints building pixel IoU.
2. The filter: the bundle's weights with ``input_low_pass_m`` set to each of ``--low-pass``
   (``none``: no filter), every held-out scene of ``eval_real.py`` scored for each.
3. Its cost: the median seconds of one forward pass on Austin's first chunk window (chunk plus
   halo), without the filter and with the largest ``--low-pass`` value, with torch and with
   OpenVINO (the precision ``auto`` gives), interleaved over ``--passes`` rounds.

    python benchmarks/bench_lowpass.py [--model data_samples/model] [--blur-m 0.4,0.5,0.6]
        [--low-pass none,0.5,0.6,0.75,1.0] [--skip-blur | --forward-only] [--passes 5]
        [--out bench_out/lowpass]
        [--shared ../shared]

Writes ``<out>/lowpass.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from _common import austin_window, interleaved_seconds, machine
from eval_real import (
    REPO,
    clip_truth,
    cut_scenes,
    evaluate,
    pixel_iou,
    predicted,
    score_rows,
    truth_mask,
)
from PIL import Image

SCENES = ("banepa_east", "austin", "atlanta_east")


def blurred(src_path: Path, gsd_m: float, dst: Path) -> Path:
    """``src_path`` down-sampled to ``gsd_m`` and back to its own grid (same georeference)."""
    with rasterio.open(src_path) as src:
        profile = src.profile.copy()
        data = src.read()
        factor = gsd_m / abs(src.transform.a)
    if factor <= 1.0:
        out = data
    else:
        h, w = data.shape[1:]
        small = (max(1, round(w / factor)), max(1, round(h / factor)))
        bands = []
        for band in data:
            im = Image.fromarray(band)
            bands.append(
                np.asarray(
                    im.resize(small, Image.Resampling.BILINEAR).resize(
                        (w, h), Image.Resampling.BICUBIC
                    )
                )
            )
        out = np.stack(bands)
    profile.pop("photometric", None)
    with rasterio.open(dst, "w", **profile) as f:
        f.write(out)
    return dst


def blur_inputs(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Part 1: building IoU per scene and effective resolution of the input."""
    from geoseg.models.bundle import load_bundle

    classes = load_bundle(args.model).spec.classes
    data = args.shared / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = cut_scenes(data, args.out, SCENES)
    truth = {
        "banepa_east": truth_mask(
            clip_truth(
                data / "open" / "banepa_buildings_rgb" / "banepa_osm_buildings.geojson",
                scenes["banepa_east"],
                args.out / "banepa_truth.geojson",
            ),
            scenes["banepa_east"],
        ),
        "atlanta_east": truth_mask(
            clip_truth(
                data / "real" / "atlanta_buildings_rgb" / "atlanta_sn4_nadir10_buildings.geojson",
                scenes["atlanta_east"],
                args.out / "atlanta_truth.geojson",
            ),
            scenes["atlanta_east"],
        ),
    }
    with rasterio.open(data / "real" / "austin_buildings_rgb" / "aerial_sample_gt_mask.tif") as f:
        truth["austin"] = f.read(1) > 0

    columns = ["as is", *(f"{float(g):.2f} m" for g in args.blur_m.split(","))]
    inputs: dict[tuple[str, str], Path] = {}
    for name, path in scenes.items():
        inputs[(name, "as is")] = path
        for g, col in zip(args.blur_m.split(","), columns[1:], strict=True):
            inputs[(name, col)] = blurred(path, float(g), args.out / f"{name}_blur{g}.tif")
    pred = args.out / "pred"
    cmd = [sys.executable, "-m", "geoseg", "predict", *map(str, inputs.values())]
    subprocess.run(
        [*cmd, "--model", str(args.model), "--out", str(pred), "--device", "cpu"], check=True
    )
    scores: dict[str, dict[str, float]] = {}
    for (name, col), path in inputs.items():
        mask = predicted(pred / f"{path.stem}.mask.tif", classes, ("building", "building_contact"))
        scores.setdefault(name, {})[col] = pixel_iou(mask, truth[name])

    print(f"{'building IoU, input blurred':<28}" + "".join(f"{c:>10}" for c in columns))
    for name, row in scores.items():
        print(f"{name:<28}" + "".join(f"{row[c]:>10.3f}" for c in columns))
    return scores


def with_filter(model: Path, low_pass: float | None, dst: Path) -> Path:
    """A copy of bundle ``model`` whose model.json sets ``input_low_pass_m`` (None: unset)."""
    from geoseg.models.bundle import read_spec, write_spec

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(model, dst)
    write_spec(dst, read_spec(dst).model_copy(update={"input_low_pass_m": low_pass}))
    return dst


def filter_sweep(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Part 2: every held-out figure of eval_real.py per value of the filter."""
    results: dict[str, dict[str, Any]] = {}
    for value in (v.strip() for v in args.low_pass.split(",") if v.strip()):
        low_pass = None if value == "none" else float(value)
        bundle = with_filter(args.model, low_pass, args.out / f"bundle-{value}")
        results[value] = evaluate(bundle, args.out / f"eval-{value}", args.shared)
    labels = [label for label, _ in score_rows(next(iter(results.values())))]
    print(f"{'input_low_pass_m':<52}" + "".join(f"{v:>8}" for v in results))
    for i, label in enumerate(labels):
        row = [score_rows(r)[i][1] for r in results.values()]
        print(f"{label:<52}" + "".join(f"{x:>8.3f}" for x in row))
    return results


def forward_seconds(plain: Path, filtered: Path, shared: Path, passes: int) -> dict[str, Any]:
    """Part 3: median seconds of one forward pass, each backend, without and with the filter."""
    from geoseg.models.bundle import load_bundle, load_module
    from geoseg.models.predictor import BundleFactory, TorchPredictor, resolve_precision

    bundles = {"without": load_bundle(plain), "with": load_bundle(filtered)}
    spec = bundles["without"].spec
    x, window = austin_window(spec, shared)
    precision = resolve_precision("auto", "cpu")
    runs: dict[str, Any] = {}
    for key, b in bundles.items():
        runs[f"torch, {key} filter"] = TorchPredictor(
            load_module(b), "cpu", precision, spec.activation
        )
        factory = BundleFactory(str(b.path), b.sha256, "cpu", precision, backend="openvino")
        runs[f"openvino, {key} filter"] = factory.build()
    med, times = interleaved_seconds(runs, x, passes)
    print(f"forward pass, {window.height}x{window.width} px window, {precision}:")
    for k, v in med.items():
        base = med[k.replace("with filter", "without filter")]
        print(f"  {k:<26} {v:6.2f} s  ({v / base:.3f}x)")
    return {"window_px": [int(window.height), int(window.width)], "seconds": med, "all": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "data_samples" / "model")
    ap.add_argument("--blur-m", default="0.4,0.5,0.6", help="effective resolutions, metres")
    ap.add_argument("--low-pass", default="none,0.5,0.6,0.75,1.0", help="'none' or metres")
    ap.add_argument("--skip-blur", action="store_true", help="parts 2 and 3 only")
    ap.add_argument("--forward-only", action="store_true", help="part 3 only")
    ap.add_argument("--passes", type=int, default=5, help="timed rounds of part 3")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "lowpass")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"model: {args.model}")
    result: dict[str, Any] = {"model": str(args.model), "machine": machine()}
    if not (args.skip_blur or args.forward_only):
        result["blurred_input_building_iou"] = blur_inputs(args)
    if not args.forward_only:
        result["filter"] = filter_sweep(args)
    values = [v.strip() for v in args.low_pass.split(",") if v.strip() and v.strip() != "none"]
    if values:
        widest = max(values, key=float)
        plain = with_filter(args.model, None, args.out / "bundle-none")
        filtered = with_filter(args.model, float(widest), args.out / f"bundle-{widest}")
        result["forward"] = forward_seconds(plain, filtered, args.shared, args.passes)
    (args.out / "lowpass.json").write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
