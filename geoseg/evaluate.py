"""Accuracy metrics: SpaceNet building F1, road buffer IoU and APLS-style topology, mask IoU/F1.

Vector layers may come in any CRS; both sides are reprojected to one metric CRS (the truth's
own if it is projected in metres, else its local UTM zone), so areas and lengths are metres.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.errors import InputError

if TYPE_CHECKING:
    import geopandas as gpd
    import networkx as nx
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "BuildingScores",
    "MaskScores",
    "RoadScores",
    "apls",
    "evaluate_buildings",
    "evaluate_masks",
    "evaluate_roads",
    "match_polygons",
    "metric_pair",
    "read_layer",
    "road_graph",
]


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


@dataclass(frozen=True)
class BuildingScores:
    """SpaceNet building metric: one-to-one matches at IoU >= threshold."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_iou: float
    iou_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_polygons(
    pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry], threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, truth index, IoU) matches at IoU >= threshold, greedy by IoU.

    Every candidate pair with IoU >= ``threshold`` is ranked by IoU; each pair is taken unless
    one of its polygons is already matched. For non-overlapping polygon sets and threshold
    >= 0.5 this equals SpaceNet's proposal-order greedy matching, since each polygon can then
    reach IoU > 0.5 with at most one polygon of the other set.
    """
    import shapely

    if not len(pred) or not len(truth):
        return []
    p = np.asarray(pred, dtype=object)
    t = np.asarray(truth, dtype=object)
    tree = shapely.STRtree(t)
    pi, ti = tree.query(p, predicate="intersects")
    if len(pi) == 0:
        return []
    inter = shapely.area(shapely.intersection(p[pi], t[ti]))
    union = shapely.area(p[pi]) + shapely.area(t[ti]) - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    order = sorted(range(len(pi)), key=lambda k: (-iou[k], int(pi[k]), int(ti[k])))
    used_p: set[int] = set()
    used_t: set[int] = set()
    matches = []
    for k in order:
        if iou[k] < threshold:
            break
        a, b = int(pi[k]), int(ti[k])
        if a in used_p or b in used_t:
            continue
        used_p.add(a)
        used_t.add(b)
        matches.append((a, b, float(iou[k])))
    return matches


def building_scores(
    pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry], threshold: float = 0.5
) -> BuildingScores:
    """Precision, recall and F1 of ``pred`` against ``truth`` (both in one metric CRS)."""
    matches = match_polygons(pred, truth, threshold)
    tp = len(matches)
    fp, fn = len(pred) - tp, len(truth) - tp
    both_empty = 1.0 if not len(pred) and not len(truth) else 0.0
    precision = _ratio(tp, tp + fp, both_empty)
    recall = _ratio(tp, tp + fn, both_empty)
    f1 = _ratio(2 * precision * recall, precision + recall, 0.0)
    mean_iou = float(np.mean([m[2] for m in matches])) if matches else 0.0
    return BuildingScores(tp, fp, fn, precision, recall, f1, mean_iou, threshold)


def read_layer(path: str | os.PathLike[str], layer: str | None = None) -> gpd.GeoDataFrame:
    """Geometries of a vector file, with its CRS checked against its coordinates."""
    import pyogrio

    from geoseg.train.labels import check_label_crs

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    try:
        gdf = pyogrio.read_dataframe(p, layer=layer, columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as exc:
        raise InputError(f"{p}: cannot read vector layer ({exc})") from exc
    check_label_crs(gdf, str(p))
    return gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].reset_index(drop=True)


def metric_pair(
    pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Both layers in one CRS whose units are ground metres: the truth's if it is a UTM zone,
    else the local UTM zone (Web Mercator's metres, for one, are not ground metres)."""
    from pyproj import CRS

    ref = truth if len(truth) else pred
    crs = CRS.from_user_input(ref.crs)
    if not (crs.utm_zone and crs.axis_info[0].unit_name in ("metre", "meter")):
        crs = ref.estimate_utm_crs() if len(ref) else CRS.from_epsg(3857)
    return pred.to_crs(crs), truth.to_crs(crs)


def _polygons(gdf: gpd.GeoDataFrame, source: str) -> list[BaseGeometry]:
    kinds = set(gdf.geom_type)
    if kinds - {"Polygon", "MultiPolygon"}:
        raise InputError(f"{source}: building layers must hold polygons, found {sorted(kinds)}")
    return list(gdf.geometry.make_valid())


def evaluate_buildings(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    threshold: float = 0.5,
    min_area_m2: float = 0.0,
) -> BuildingScores:
    """SpaceNet building F1 of a predicted polygon file against a truth file.

    Polygons (truth and prediction) smaller than ``min_area_m2`` ground square metres are left
    out, as SpaceNet leaves out buildings under 20 px (1.8 m² at 0.3 m).
    """
    pred, truth = metric_pair(read_layer(pred_path), read_layer(truth_path))
    p, t = _polygons(pred, str(pred_path)), _polygons(truth, str(truth_path))
    if min_area_m2 > 0:
        p = [g for g in p if g.area >= min_area_m2]
        t = [g for g in t if g.area >= min_area_m2]
    return building_scores(p, t, threshold)


# --- roads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoadScores:
    """Buffer IoU (area of buffered lines, m²) and APLS-style path-length similarity."""

    iou: float
    precision: float
    recall: float
    apls: float
    apls_truth_to_pred: float
    apls_pred_to_truth: float
    width_m: float
    truth_length_m: float
    pred_length_m: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lines(gdf: gpd.GeoDataFrame, source: str) -> list[BaseGeometry]:
    import shapely

    kinds = set(gdf.geom_type)
    if kinds - {"LineString", "MultiLineString"}:
        raise InputError(f"{source}: road layers must hold lines, found {sorted(kinds)}")
    parts = shapely.get_parts(np.asarray(gdf.geometry.values, dtype=object))
    return [g for g in parts if g.length > 0]


def buffer_iou(
    pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry], width_m: float
) -> tuple[float, float, float]:
    """(IoU, precision, recall) of the areas within ``width_m`` / 2 of each line set (metres).

    This is pixel IoU of rasterized buffers in the limit of small pixels, computed exactly.
    """
    import shapely

    half = width_m / 2.0
    a = shapely.union_all(shapely.buffer(np.asarray(pred, dtype=object), half)) if pred else None
    b = shapely.union_all(shapely.buffer(np.asarray(truth, dtype=object), half)) if truth else None
    if a is None and b is None:
        return 1.0, 1.0, 1.0
    if a is None or b is None:
        return 0.0, 0.0, 0.0
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return _ratio(inter, union, 0.0), _ratio(inter, a.area, 0.0), _ratio(inter, b.area, 0.0)


def road_graph(lines: Iterable[BaseGeometry]) -> nx.Graph:
    """Noded road graph: nodes at ends and crossings (x, y in metres), edges weighted by length."""
    import networkx as nx
    import shapely

    g = nx.Graph()
    lines = list(lines)
    if not lines:
        return g
    noded = shapely.get_parts(shapely.node(shapely.union_all(np.asarray(lines, dtype=object))))
    for seg in noded:
        if seg.length <= 0:
            continue
        coords = list(seg.coords)
        u = _key(coords[0])
        v = _key(coords[-1])
        if u == v:
            continue
        if g.has_edge(u, v) and g.edges[u, v]["length"] <= seg.length:
            continue
        g.add_edge(u, v, length=float(seg.length), geometry=seg)
    return g


def _key(xy: Sequence[float]) -> tuple[float, float]:
    return (round(float(xy[0]), 3), round(float(xy[1]), 3))


def control_points(g: nx.Graph, spacing_m: float) -> list[tuple[float, float]]:
    """Junctions and ends (degree != 2), plus points every ``spacing_m`` metres along edges."""
    from shapely.ops import substring

    points = [n for n in g.nodes if g.degree(n) != 2]
    for _, _, data in g.edges(data=True):
        geom = data["geometry"]
        n = int(data["length"] // spacing_m)
        for i in range(1, n + 1):
            d = i * spacing_m
            if d >= data["length"] - 1e-6:
                break
            pt = substring(geom, d, d).coords[0]
            points.append(_key(pt))
    return list(dict.fromkeys(points))


def _insert(g: nx.Graph, point: tuple[float, float], snap_m: float) -> tuple[float, float] | None:
    """Node of ``g`` for ``point``: an existing node, or a new one splitting the nearest edge."""
    import shapely
    from shapely.geometry import Point
    from shapely.ops import substring

    if g.number_of_edges() == 0:
        return None
    edges = list(g.edges(data=True))
    geoms = np.asarray([e[2]["geometry"] for e in edges], dtype=object)
    p = Point(point)
    dist = shapely.distance(p, geoms)
    k = int(np.argmin(dist))
    if dist[k] > snap_m:
        return None
    u, v, data = edges[k]
    geom = data["geometry"]
    d = geom.project(p)
    for end, at in ((_key(geom.coords[0]), 0.0), (_key(geom.coords[-1]), geom.length)):
        if abs(d - at) < 1e-6:
            return end
    node = _key(geom.interpolate(d).coords[0])
    if node in g:
        return node
    first, second = substring(geom, 0, d), substring(geom, d, geom.length)
    a, b = _key(geom.coords[0]), _key(geom.coords[-1])
    g.remove_edge(u, v)
    g.add_edge(a, node, length=float(first.length), geometry=first)
    g.add_edge(node, b, length=float(second.length), geometry=second)
    return node


def _half_apls(src: nx.Graph, dst: nx.Graph, spacing_m: float, snap_m: float) -> float:
    """1 − mean path-length difference over control-point pairs of ``src`` mapped into ``dst``."""
    import networkx as nx

    src, dst = src.copy(), dst.copy()
    points = control_points(src, spacing_m)
    src_nodes = [_insert(src, pt, 0.01) for pt in points]
    dst_nodes = [_insert(dst, pt, snap_m) for pt in points]
    diffs: list[float] = []
    for i, a in enumerate(src_nodes):
        if a is None:
            continue
        lengths = nx.single_source_dijkstra_path_length(src, a, weight="length")
        dst_lengths: dict[Any, float] | None = None
        for j in range(i + 1, len(src_nodes)):
            b = src_nodes[j]
            truth_len = lengths.get(b) if b is not None else None
            if truth_len is None or truth_len <= 0:
                continue
            da, db = dst_nodes[i], dst_nodes[j]
            if da is None or db is None:
                diffs.append(1.0)
                continue
            if dst_lengths is None:
                dst_lengths = nx.single_source_dijkstra_path_length(dst, da, weight="length")
            pred_len = dst_lengths.get(db)
            if pred_len is None:
                diffs.append(1.0)
            else:
                diffs.append(min(1.0, abs(truth_len - pred_len) / truth_len))
    if not diffs:
        return 1.0 if src.number_of_edges() == 0 and dst.number_of_edges() == 0 else 0.0
    return 1.0 - float(np.mean(diffs))


def apls(
    truth: nx.Graph, pred: nx.Graph, spacing_m: float = 50.0, snap_m: float = 4.0
) -> tuple[float, float, float]:
    """Simplified APLS: (score, truth→pred half, pred→truth half); score is their harmonic mean.

    Control points (junctions, ends, and points every ``spacing_m`` m) of one graph are snapped
    onto the other within ``snap_m`` m (splitting the nearest edge); for every connected pair
    the shortest-path lengths L, L' give a penalty min(1, |L − L'| / L), or 1 when a point does
    not snap or the pair is disconnected. Unlike the reference APLS it has no special handling
    of very short edges and no removal of duplicate control points closer than ``snap_m``.
    """
    if truth.number_of_edges() == 0 and pred.number_of_edges() == 0:
        return 1.0, 1.0, 1.0
    if truth.number_of_edges() == 0 or pred.number_of_edges() == 0:
        return 0.0, 0.0, 0.0
    a = _half_apls(truth, pred, spacing_m, snap_m)
    b = _half_apls(pred, truth, spacing_m, snap_m)
    score = _ratio(2 * a * b, a + b, 0.0)
    return score, a, b


def road_scores(
    pred: Sequence[BaseGeometry],
    truth: Sequence[BaseGeometry],
    width_m: float = 6.0,
    spacing_m: float = 50.0,
    snap_m: float = 4.0,
) -> RoadScores:
    """Road metrics for line sets already in one metric CRS."""
    iou, precision, recall = buffer_iou(pred, truth, width_m)
    score, t2p, p2t = apls(road_graph(truth), road_graph(pred), spacing_m, snap_m)
    return RoadScores(
        iou,
        precision,
        recall,
        score,
        t2p,
        p2t,
        width_m,
        float(sum(g.length for g in truth)),
        float(sum(g.length for g in pred)),
    )


def evaluate_roads(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    width_m: float = 6.0,
    spacing_m: float = 50.0,
    snap_m: float = 4.0,
) -> RoadScores:
    """Road metrics of a predicted centerline file against a truth file."""
    pred, truth = metric_pair(read_layer(pred_path), read_layer(truth_path))
    return road_scores(
        _lines(pred, str(pred_path)), _lines(truth, str(truth_path)), width_m, spacing_m, snap_m
    )


# --- rasters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskScores:
    """Per-class IoU and F1 of a class-id mask against a truth mask, over valid pixels."""

    classes: list[str]
    iou: dict[str, float]
    f1: dict[str, float]
    pixels: int
    confusion: list[list[int]]
    #: the share of the truth's valid pixels that the prediction covers with valid pixels
    coverage: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Below this share of the truth's valid pixels covered, :func:`evaluate_masks` refuses.
MIN_COVERAGE = 0.95


def mask_scores(cm: np.ndarray, classes: Sequence[str]) -> MaskScores:
    """IoU and F1 per class from a (truth × prediction) confusion matrix; NaN if class absent."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return MaskScores(
        list(classes),
        {c: float(v) for c, v in zip(classes, iou, strict=True)},
        {c: float(v) for c, v in zip(classes, f1, strict=True)},
        int(cm.sum()),
        cm.astype(int).tolist(),
    )


def _mask_classes(tags: dict[str, str], source: str) -> list[str]:
    import json

    raw = tags.get("GEOSEG_CLASSES")
    if raw is None:
        raise InputError(f"{source}: no GEOSEG_CLASSES tag; pass the class names explicitly")
    try:
        names = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: GEOSEG_CLASSES tag is not JSON ({exc})") from exc
    return [str(n) for n in names]


def evaluate_masks(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    truth_values: dict[int, str] | None = None,
    classes: Sequence[str] | None = None,
    block: int = 1024,
    min_coverage: float = MIN_COVERAGE,
) -> MaskScores:
    """Per-class IoU/F1 of a predicted class-id mask (geoseg's ``*.mask.tif``) against truth.

    The truth raster is warped onto the prediction's grid (nearest) and read block by block.
    ``truth_values`` maps truth pixel values to class names (default: values are class ids);
    pixels that are nodata in either raster are left out, and a valid truth value that maps to
    no class is an error naming it (it would otherwise be silently left out of the scores).
    A prediction that is not a class mask (not one integer band, or values that are not class
    ids) is refused, and so is one whose valid pixels cover less than ``min_coverage`` (0..1)
    of the truth's valid pixels: scores of the covered part alone would look complete.
    """
    import rasterio
    from rasterio.errors import RasterioError

    from geoseg.io.raster import gdal_env
    from geoseg.io.reader import on_grid
    from geoseg.train.chips import blocks

    for p in (pred_path, truth_path):
        if not Path(p).exists():
            raise InputError(f"{p}: no such file")
    try:
        with gdal_env(), rasterio.open(pred_path) as pred_ds:
            _check_class_mask(pred_ds, str(pred_path))
            names = list(classes) if classes else _mask_classes(pred_ds.tags(), str(pred_path))
            k = len(names)
            lut = np.full(65536, -1, dtype=np.int64)
            if truth_values:
                for value, name in truth_values.items():
                    if name not in names:
                        raise InputError(f"{truth_path}: class {name!r} is not in {names}")
                    lut[value] = names.index(name)
            else:
                lut[:k] = np.arange(k)
            cm = np.zeros((k, k), dtype=np.int64)
            unmapped: set[int] = set()
            not_ids: set[int] = set()
            with (
                rasterio.open(truth_path) as truth_ds,
                on_grid(truth_ds, pred_ds) as vrt,
            ):
                if truth_ds.dtypes[0] not in ("uint8", "uint16", "int16", "int32"):
                    raise InputError(
                        f"{truth_path}: truth mask must be integer, not {truth_ds.dtypes[0]}"
                    )
                for w in blocks(pred_ds.width, pred_ds.height, block):
                    p = pred_ds.read(1, window=w).astype(np.int64)
                    p_ok = pred_ds.read_masks(1, window=w) > 0
                    t = vrt.read(1, window=w).astype(np.int64)
                    t_ok = vrt.read_masks(1, window=w) > 0
                    t_cls = lut[np.clip(t, 0, 65535)]
                    unmapped.update(np.unique(t[t_ok & (t_cls < 0)]).tolist())
                    not_ids.update(np.unique(p[p_ok & ((p < 0) | (p >= k))]).tolist())
                    keep = p_ok & t_ok & (t_cls >= 0) & (p >= 0) & (p < k)
                    idx = t_cls[keep] * k + p[keep]
                    cm += np.bincount(idx, minlength=k * k).reshape(k, k)
                if not_ids:
                    values = ", ".join(str(v) for v in sorted(not_ids)[:10])
                    raise InputError(
                        f"{pred_path}: not a class mask of {names}: pixel value(s) {values} are "
                        f"not class ids 0..{k - 1} (pass a *.mask.tif, or its classes with "
                        "--classes)"
                    )
                coverage = truth_coverage(truth_ds, pred_ds, block)
    except RasterioError as exc:
        raise InputError(f"cannot read {pred_path} or {truth_path}: {exc}") from exc
    if unmapped:
        values = ", ".join(str(v) for v in sorted(unmapped)[:10])
        how = (
            "map each with --truth-value VALUE=CLASS"
            if truth_values
            else f"they are not class ids 0..{k - 1} of {names}; map them with "
            "--truth-value VALUE=CLASS"
        )
        raise InputError(
            f"{truth_path}: truth pixel value(s) {values} are not mapped to any class "
            f"(set them as the truth's nodata to leave them out); {how}"
        )
    if coverage < min_coverage:
        raise InputError(
            f"{pred_path}: covers {coverage:.1%} of the valid pixels of {truth_path} (less than "
            f"{min_coverage:.0%}): its scores would leave the rest out; predict the truth's "
            "whole extent, or score the covered part alone with --min-coverage 0"
        )
    return replace(mask_scores(cm, names), coverage=coverage)


def _check_class_mask(ds: Any, source: str) -> None:
    """Refuse a raster that cannot be a class mask: more than one band, or not integers."""
    if ds.count != 1:
        raise InputError(
            f"{source}: not a class mask ({ds.count} bands; a class mask has one band of "
            "class ids, such as geoseg's *.mask.tif)"
        )
    if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
        raise InputError(
            f"{source}: not a class mask ({ds.dtypes[0]} pixels; class ids are integers)"
        )


def truth_coverage(truth_ds: Any, pred_ds: Any, block: int = 1024) -> float:
    """The share (0..1) of ``truth_ds``'s valid pixels where ``pred_ds`` (warped onto the
    truth's grid, nearest) has valid pixels too; 1.0 for a truth without valid pixels."""
    from rasterio.vrt import WarpedVRT

    from geoseg.train.chips import blocks

    covered = total = 0
    with WarpedVRT(
        pred_ds,
        crs=truth_ds.crs,
        transform=truth_ds.transform,
        width=truth_ds.width,
        height=truth_ds.height,
        add_alpha=True,  # outside the prediction's extent is invalid, not 0
    ) as vrt:
        for w in blocks(truth_ds.width, truth_ds.height, block):
            t_ok = truth_ds.read_masks(1, window=w) > 0
            p_ok = vrt.read_masks(1, window=w) > 0
            total += int(t_ok.sum())
            covered += int((t_ok & p_ok).sum())
    return covered / total if total else 1.0


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns, for the terminal."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fmt(value: float) -> str:
    """A score with three decimals, or '-' for undefined (NaN)."""
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"
