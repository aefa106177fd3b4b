"""``geoseg evaluate``: score predictions against truth; a terminal table, JSON on request."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from geoseg.errors import OutputError

JSON_OPTION = click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the scores as a JSON report to this file.",
)


def fmt(value: float) -> str:
    from geoseg.evaluate import fmt as _fmt

    return _fmt(value)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON (NaN → null) to ``path``, atomically."""
    text = json.dumps(_nan_to_none(report), indent=2) + "\n"
    from geoseg.io.raster import atomic_path

    tmp = atomic_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write report ({exc.strerror})") from exc


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _emit(
    kind: str,
    pred: Path,
    truth: Path,
    scores: dict[str, Any],
    rows: list[tuple[str, str]],
    json_path: Path | None,
) -> None:
    from geoseg.evaluate import format_table

    click.echo(format_table(rows))
    if json_path is not None:
        write_report(
            json_path,
            {"metric": kind, "prediction": str(pred), "truth": str(truth), "scores": scores},
        )


@click.group()
def evaluate() -> None:
    """Score predicted buildings, roads or masks against truth."""


@evaluate.command("buildings")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option(
    "--iou",
    "threshold",
    type=click.FloatRange(0.5, 1.0),
    default=0.5,
    show_default=True,
    help="IoU needed for a match (SpaceNet: 0.5).",
)
@click.option(
    "--min-area",
    "min_area_m2",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Leave out truth and predicted polygons smaller than this, ground m² (SpaceNet leaves "
    "out buildings under 20 px: 1.8 m² at 0.3 m).",
)
@JSON_OPTION
def buildings(
    pred: Path, truth: Path, threshold: float, min_area_m2: float, json_path: Path | None
) -> None:
    """SpaceNet building F1 of PRED polygons against TRUTH polygons (any CRS, any format)."""
    from geoseg.evaluate import evaluate_buildings

    s = evaluate_buildings(pred, truth, threshold, min_area_m2)
    rows = [
        ("true positives", str(s.tp)),
        ("false positives", str(s.fp)),
        ("false negatives", str(s.fn)),
        ("precision", fmt(s.precision)),
        ("recall", fmt(s.recall)),
        ("F1", fmt(s.f1)),
        ("mean IoU of matches", fmt(s.mean_iou)),
    ]
    _emit("buildings", pred, truth, s.to_dict(), rows, json_path)


@evaluate.command("roads")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option(
    "--width",
    "width_m",
    type=click.FloatRange(min=0, min_open=True),
    default=6.0,
    show_default=True,
    help="Buffer width around centerlines for IoU, metres.",
)
@click.option(
    "--spacing",
    "spacing_m",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="APLS control point spacing, metres.",
)
@click.option(
    "--snap",
    "snap_m",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="APLS snapping distance, metres.",
)
@JSON_OPTION
def roads(
    pred: Path, truth: Path, width_m: float, spacing_m: float, snap_m: float, json_path: Path | None
) -> None:
    """Buffer IoU and simplified APLS of PRED centerlines against TRUTH centerlines."""
    from geoseg.evaluate import evaluate_roads

    s = evaluate_roads(pred, truth, width_m, spacing_m, snap_m)
    rows = [
        (f"buffer IoU ({width_m:g} m)", fmt(s.iou)),
        ("buffer precision", fmt(s.precision)),
        ("buffer recall", fmt(s.recall)),
        ("APLS (simplified)", fmt(s.apls)),
        ("  truth → prediction", fmt(s.apls_truth_to_pred)),
        ("  prediction → truth", fmt(s.apls_pred_to_truth)),
        ("truth length", f"{s.truth_length_m:.1f} m"),
        ("predicted length", f"{s.pred_length_m:.1f} m"),
    ]
    _emit("roads", pred, truth, s.to_dict(), rows, json_path)


def _value_map(values: tuple[str, ...]) -> dict[int, str] | None:
    out: dict[int, str] = {}
    for item in values:
        key, sep, name = item.partition("=")
        if not sep or not key.strip().lstrip("-").isdigit() or not name.strip():
            raise click.BadParameter(
                f"expected VALUE=CLASS, got {item!r}", param_hint="--truth-value"
            )
        out[int(key)] = name.strip()
    return out or None


@evaluate.command("mask")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option(
    "--truth-value",
    "truth_values",
    multiple=True,
    metavar="VALUE=CLASS",
    help="Map a truth pixel value to a class (repeatable), e.g. 255=road; "
    "default: truth values are class ids.",
)
@click.option(
    "--classes",
    default=None,
    help="Class names in id order (default: the prediction's GEOSEG_CLASSES tag).",
)
@click.option(
    "--min-coverage",
    type=click.FloatRange(0, 1),
    default=0.95,
    show_default=True,
    help="Refuse a PRED whose valid pixels cover less than this share of TRUTH's valid "
    "pixels (0: score the covered part alone).",
)
@JSON_OPTION
def mask(
    pred: Path,
    truth: Path,
    truth_values: tuple[str, ...],
    classes: str | None,
    min_coverage: float,
    json_path: Path | None,
) -> None:
    """Per-class IoU and F1 of a PRED class mask (e.g. *.mask.tif) against a TRUTH raster.

    The coverage (the share of TRUTH's valid pixels that PRED covers) is reported too."""
    from geoseg.evaluate import evaluate_masks

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    s = evaluate_masks(pred, truth, _value_map(truth_values), names, min_coverage=min_coverage)
    rows = [("class", "IoU     F1")]
    rows += [(c, f"{fmt(s.iou[c]):<7} {fmt(s.f1[c])}") for c in s.classes]
    rows.append(("pixels", str(s.pixels)))
    rows.append(("coverage", f"{s.coverage:.1%} of the truth's valid pixels"))
    _emit("mask", pred, truth, s.to_dict(), rows, json_path)
