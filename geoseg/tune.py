"""Choosing a model's vectorizer settings on labelled scenes (``geoseg model tune``).

The model's probabilities are vectorized at every combination of a grid of minimum areas,
contact thresholds and valley cuts (widths and depths), each result is scored against the
truth (the SpaceNet building metric, pooled over the scenes); road centerlines at every
gap-bridging distance of a grid, each scored by APLS against true centerlines (the mean over
the scenes). The best settings can be stored in the bundle's ``model.json`` (``vectorize``;
see :class:`geoseg.models.bundle.VectorizeDefaults`), where ``geoseg predict``,
``geoseg vectorize`` and pipelines take it in place of the vectorizer's defaults. Tune on
scenes the model was trained on or on other data of your own, never on the data you measure
it on.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.errors import ConfigError, InputError
from geoseg.models.bundle import Bundle, VectorizeDefaults

if TYPE_CHECKING:
    from geoseg.vectorize.source import Prediction

__all__ = [
    "BRIDGES_M",
    "BUILDING_THRESHOLDS",
    "CONTACT_THRESHOLDS",
    "MIN_AREAS_M2",
    "VALLEYS_M",
    "VALLEY_DEPTHS",
    "RoadTuneResult",
    "RoadTuneRow",
    "TuneResult",
    "TuneRow",
    "tune_buildings",
    "tune_roads",
]

#: The minimum building areas tried by default (square metres).
MIN_AREAS_M2 = (2.0, 5.0, 10.0, 15.0, 20.0, 30.0)
#: The contact thresholds tried by default, for a model with a contact class (from 0.5 up, a
#: threshold cuts only the pixels where contact is the likeliest class: all give one result).
CONTACT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)
#: The valley-cut widths tried by default (metres; 0: no valley cut), and their depths.
VALLEYS_M = (0.0, 1.5, 2.0, 3.0)
VALLEY_DEPTHS = (0.1,)
#: The building thresholds tried by default (0.5: the vectorizer's threshold).
BUILDING_THRESHOLDS = (0.5, 0.6, 0.7)
#: The road gap-bridging distances tried by default (metres; 0: no bridging).
BRIDGES_M = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0)


@dataclass(frozen=True)
class TuneRow:
    """The pooled building scores of one combination of settings."""

    min_area_m2: float
    contact_threshold: float | None
    tp: int
    fp: int
    fn: int
    valley_m: float = 0.0
    valley_depth: float | None = None
    building_threshold: float = 0.5

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass(frozen=True)
class TuneResult:
    """Every combination's scores, in the order tried, and the scenes they pool."""

    rows: list[TuneRow]
    scenes: list[str]

    @property
    def best(self) -> TuneRow:
        """The highest F1; on a tie, the smaller minimum area, then the contact threshold
        nearest the vectorizer's default (0.4), then the narrower and deeper valley cut (the
        fewest pixels cut), then the building threshold nearest the default (0.5)."""
        return max(
            self.rows,
            key=lambda r: (
                round(r.f1, 9),
                -r.min_area_m2,
                -abs((r.contact_threshold or 0.4) - 0.4),
                -r.valley_m,
                r.valley_depth or 0.0,
                -abs(r.building_threshold - 0.5),
            ),
        )

    def defaults(self, note: str = "") -> VectorizeDefaults:
        """The best row as a model's vectorizer settings, with where they were chosen."""
        b = self.best
        chosen_on = (
            f"F1 {b.f1:.3f} (precision {b.precision:.3f}, recall {b.recall:.3f}) on "
            f"{', '.join(self.scenes)} by geoseg model tune"
        )
        return VectorizeDefaults(
            min_area_m2=b.min_area_m2,
            contact_threshold=b.contact_threshold,
            valley_m=b.valley_m if self.valleys_tried else None,
            valley_depth=b.valley_depth,
            building_threshold=b.building_threshold if self.thresholds_tried else None,
            chosen_on=f"{chosen_on}; {note}" if note else chosen_on,
        )

    @property
    def valleys_tried(self) -> bool:
        """Whether any row cut valleys (else the valley settings were not tuned)."""
        return any(r.valley_m for r in self.rows)

    @property
    def thresholds_tried(self) -> bool:
        """Whether any row used a building threshold other than 0.5 (else it was not tuned)."""
        return any(r.building_threshold != 0.5 for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenes": self.scenes,
            "best": self.best.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


def _checked_grid(
    values: Sequence[float], name: str, low: float, high: float | None
) -> list[float]:
    grid = sorted(dict.fromkeys(float(v) for v in values))
    if not grid:
        raise ConfigError(f"{name}: give at least one value")
    bad = [v for v in grid if v < low or (high is not None and v > high)]
    if bad:
        upper = f" and at most {high:g}" if high is not None else ""
        raise ConfigError(f"{name}: values must be at least {low:g}{upper}, got {bad}")
    return grid


def _truth(path: str | os.PathLike[str], pred: Prediction) -> Any:
    """The truth's polygons within the prediction's extent, in the prediction's CRS (cut as
    ``geoseg changes`` cuts buildings to an area: only the polygonal part of each piece)."""
    from geoseg.changes import _cut
    from geoseg.evaluate import _polygons, read_layer

    gdf = read_layer(path)
    gdf["geometry"] = _polygons(gdf, str(path))  # polygons only: a clear error otherwise
    return _cut(gdf.to_crs(pred.crs_wkt), _extent(pred), 0.0)


def _extent(pred: Prediction) -> Any:
    """The prediction raster's footprint, a box in its CRS."""
    from shapely.geometry import box

    t = pred.transform
    x0, y0 = t.c, t.f
    x1, y1 = t.c + t.a * pred.width, t.f + t.e * pred.height
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _predictions(
    bundle: Bundle, scenes: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]]
) -> list[Prediction]:
    """The probability rasters of ``scenes``, each checked to be ``bundle``'s."""
    from geoseg.vectorize.source import open_prediction

    preds = []
    for probs, _truth_path in scenes:
        pred = open_prediction(probs)
        if pred.kind != "probs":
            raise InputError(f"{probs}: needs the class probabilities (a <stem>.probs.tif)")
        made_by = pred.model.rpartition("@")[2]
        if not made_by or not bundle.sha256.startswith(made_by):
            raise InputError(
                f"{probs}: was made by model {pred.model or 'unknown'}, not by "
                f"{bundle.ident} ({bundle.path}); predict it with this model first"
            )
        preds.append(pred)
    return preds


def tune_buildings(
    bundle: Bundle,
    scenes: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    min_areas_m2: Sequence[float] = MIN_AREAS_M2,
    contact_thresholds: Sequence[float] = CONTACT_THRESHOLDS,
    progress: Callable[[int, int], None] | None = None,
    valleys_m: Sequence[float] = VALLEYS_M,
    valley_depths: Sequence[float] = VALLEY_DEPTHS,
    building_thresholds: Sequence[float] = BUILDING_THRESHOLDS,
) -> TuneResult:
    """Score every (minimum area, contact threshold, valley width and depth, building
    threshold) on ``scenes``: pairs of a probability raster that ``bundle`` made
    (``<stem>.probs.tif`` of ``geoseg predict``) and a vector file of the true building
    footprints there (truth outside the raster is left out).

    The contact thresholds apply only to a model with a ``building_contact`` class; the
    depths only to valley widths above 0 (width 0 is tried once, without a cut). Each
    combination runs the vectorizer itself, so the scores are those its settings give.
    ``progress(done, total)`` is called after each vectorization.
    """
    import geopandas as gpd

    from geoseg.evaluate import _polygons, building_scores, metric_pair
    from geoseg.vectorize.options import CONTACT_CLASS, VectorizeOptions
    from geoseg.vectorize.run import vectorize_prediction

    if not scenes:
        raise ConfigError("give at least one prediction and its truth")
    areas = _checked_grid(min_areas_m2, "minimum areas", 0.0, None)
    contacts: list[float | None] = [None]
    if CONTACT_CLASS in bundle.spec.classes:
        contacts = list(_checked_grid(contact_thresholds, "contact thresholds", 1e-6, 1.0))
    if "building" not in bundle.spec.classes:
        raise ConfigError(f"{bundle.path}: the model has no 'building' class to tune")
    widths = _checked_grid(valleys_m, "valley widths", 0.0, None)
    depths = _checked_grid(valley_depths, "valley depths", 1e-6, 1.0)
    levels = _checked_grid(building_thresholds, "building thresholds", 1e-6, 1.0)
    valleys: list[tuple[float, float | None]] = [(w, d) for w in widths if w for d in depths]
    if 0.0 in widths:
        valleys.insert(0, (0.0, None))
    preds = _predictions(bundle, scenes)
    truths = [_truth(truth, pred) for pred, (_, truth) in zip(preds, scenes, strict=True)]
    names = [pred.stem for pred in preds]
    total = len(areas) * len(contacts) * len(valleys) * len(levels) * len(preds)
    done = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-tune-") as tmp:
        combos = itertools.product(levels, contacts, valleys, areas)
        for level, contact, (valley, depth), area in combos:
            tp = fp = fn = 0
            for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
                given: dict[str, Any] = {
                    "min_area_m2": area,
                    "building_threshold": level,
                    "layers": {"building": "polygons"},
                    "workers": 1,
                }
                if contact is not None:
                    given["contact_threshold"] = contact
                given["valley_m"] = valley
                if depth is not None:
                    given["valley_depth"] = depth
                out = Path(tmp) / f"{i}"
                outs = vectorize_prediction(pred.path, out, VectorizeOptions(**given))
                path = outs.layers["buildings"].paths["geojson"]
                found = gpd.read_file(path)
                p, t = metric_pair(found, truth)
                s = building_scores(_polygons(p, str(path)), list(t.geometry))
                tp, fp, fn = tp + s.tp, fp + s.fp, fn + s.fn
                done += 1
                if progress is not None:
                    progress(done, total)
            rows.append(TuneRow(area, contact, tp, fp, fn, valley, depth, level))
    return TuneResult(rows, names)


@dataclass(frozen=True)
class RoadTuneRow:
    """The road scores of one bridging distance, per scene."""

    bridge_m: float
    apls: tuple[float, ...]
    iou: tuple[float, ...]

    @property
    def mean_apls(self) -> float:
        return sum(self.apls) / len(self.apls)

    @property
    def mean_iou(self) -> float:
        return sum(self.iou) / len(self.iou)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_apls": self.mean_apls, "mean_iou": self.mean_iou}


@dataclass(frozen=True)
class RoadTuneResult:
    """Every bridging distance's scores, in the order tried, and the scenes they cover."""

    rows: list[RoadTuneRow]
    scenes: list[str]

    @property
    def best(self) -> RoadTuneRow:
        """The highest mean APLS; on a tie, the shorter bridge (fewer roads made up)."""
        return max(self.rows, key=lambda r: (round(r.mean_apls, 9), -r.bridge_m))

    def record(self) -> str:
        """Where the best distance was chosen, for ``roads_chosen_on``."""
        b = self.best
        return (
            f"APLS {b.mean_apls:.3f} (buffer IoU {b.mean_iou:.3f}) on {', '.join(self.scenes)} "
            "by geoseg model tune"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenes": self.scenes,
            "best": self.best.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


def _truth_lines(path: str | os.PathLike[str], pred: Prediction) -> Any:
    """The truth's centerlines cut to the prediction's extent, in the prediction's CRS."""
    from geoseg.evaluate import _lines, read_layer

    gdf = read_layer(path)
    _lines(gdf, str(path))  # lines only: a clear error otherwise
    gdf = gdf.to_crs(pred.crs_wkt)
    gdf["geometry"] = gdf.geometry.intersection(_extent(pred))
    return gdf[~gdf.geometry.is_empty & gdf.geom_type.isin(["LineString", "MultiLineString"])]


def tune_roads(
    bundle: Bundle,
    scenes: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    bridges_m: Sequence[float] = BRIDGES_M,
    progress: Callable[[int, int], None] | None = None,
) -> RoadTuneResult:
    """Score every gap-bridging distance on ``scenes``: pairs of a probability raster that
    ``bundle`` made and a vector file of the true road centerlines there (cut to the raster).
    Each distance runs the vectorizer itself; APLS and the 6 m buffer IoU of
    :func:`geoseg.evaluate.road_scores` are kept per scene. ``progress(done, total)`` is
    called after each vectorization."""
    import geopandas as gpd

    from geoseg.evaluate import _lines, metric_pair, road_scores
    from geoseg.vectorize.options import VectorizeOptions
    from geoseg.vectorize.run import vectorize_prediction

    if not scenes:
        raise ConfigError("give at least one prediction and its true centerlines")
    bridges = _checked_grid(bridges_m, "bridge distances", 0.0, None)
    if "road" not in bundle.spec.classes:
        raise ConfigError(f"{bundle.path}: the model has no 'road' class to tune")
    preds = _predictions(bundle, scenes)
    truths = [_truth_lines(truth, pred) for pred, (_, truth) in zip(preds, scenes, strict=True)]
    total, done, rows = len(bridges) * len(preds), 0, []
    with tempfile.TemporaryDirectory(prefix="geoseg-tune-") as tmp:
        for bridge in bridges:
            apls, iou = [], []
            for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
                given = {"layers": {"road": "centerlines"}, "bridge_m": bridge, "workers": 1}
                out = Path(tmp) / f"{i}"
                outs = vectorize_prediction(pred.path, out, VectorizeOptions(**given))
                path = outs.layers["roads"].paths["geojson"]
                p, t = metric_pair(gpd.read_file(path), truth)
                s = road_scores(_lines(p, str(path)), _lines(t, "truth"))
                apls.append(s.apls)
                iou.append(s.iou)
                done += 1
                if progress is not None:
                    progress(done, total)
            rows.append(RoadTuneRow(bridge, tuple(apls), tuple(iou)))
    return RoadTuneResult(rows, [pred.stem for pred in preds])
