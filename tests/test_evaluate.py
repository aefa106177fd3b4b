"""Metrics against hand-built cases with known answers, and against SpaceNet's reference loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin
from shapely.affinity import translate
from shapely.geometry import LineString, box

from geoseg.cli import cli
from geoseg.errors import InputError
from geoseg.evaluate import (
    apls,
    buffer_iou,
    building_scores,
    evaluate_buildings,
    evaluate_masks,
    match_polygons,
    road_graph,
    road_scores,
)


def squares(n: int, size: float = 10.0, gap: float = 30.0) -> list:
    return [box(i * gap, 0, i * gap + size, size) for i in range(n)]


def test_identical_sets_give_f1_one() -> None:
    s = building_scores(squares(5), squares(5))
    assert (s.tp, s.fp, s.fn) == (5, 0, 0)
    assert s.precision == s.recall == s.f1 == 1.0


def test_disjoint_sets_give_zero() -> None:
    far = [translate(g, 0, 1000) for g in squares(4)]
    s = building_scores(far, squares(3))
    assert (s.tp, s.fp, s.fn) == (0, 4, 3)
    assert s.f1 == 0.0


def test_half_overlapping_squares_have_iou_one_third() -> None:
    a, b = box(0, 0, 10, 10), box(5, 0, 15, 10)  # intersection 50, union 150
    matches = match_polygons([a], [b], threshold=0.0 + 1e-9)
    assert matches == [(0, 0, pytest.approx(1 / 3))]
    assert building_scores([a], [b]).tp == 0  # 1/3 < 0.5: no match at the SpaceNet threshold


def test_shifted_square_at_known_iou_matches() -> None:
    a, b = box(0, 0, 10, 10), box(2, 0, 12, 10)  # IoU = 80 / 120 = 2/3
    s = building_scores([a], [b])
    assert s.tp == 1 and s.mean_iou == pytest.approx(2 / 3)


def test_many_to_one_counts_one_match() -> None:
    truth = [box(0, 0, 10, 10)]
    preds = [box(0, 0, 10, 9), box(0, 0, 10, 8), box(0, 0, 10, 7)]  # all IoU >= 0.7
    s = building_scores(preds, truth)
    assert (s.tp, s.fp, s.fn) == (1, 2, 0)
    assert s.precision == pytest.approx(1 / 3) and s.recall == 1.0
    assert s.f1 == pytest.approx(0.5)
    # the best-IoU prediction is the one matched
    assert match_polygons(preds, truth) == [(0, 0, pytest.approx(0.9))]


def test_one_prediction_covering_two_buildings_matches_at_most_one() -> None:
    truth = [box(0, 0, 10, 10), box(10, 0, 20, 10)]
    s = building_scores([box(0, 0, 20, 10)], truth)  # IoU 0.5 with each
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)


def test_empty_both_is_perfect_and_empty_prediction_is_zero() -> None:
    assert building_scores([], []).f1 == 1.0
    s = building_scores([], squares(2))
    assert (s.precision, s.recall, s.f1, s.fn) == (0.0, 0.0, 0.0, 2)


def spacenet_reference(pred: list, truth: list, threshold: float = 0.5) -> tuple[int, int, int]:
    """SpaceNet's scoring loop: each proposal, in order, takes its best remaining truth."""
    remaining = list(truth)
    tp = 0
    for p in pred:
        ious = [p.intersection(t).area / p.union(t).area for t in remaining]
        if ious and max(ious) >= threshold:
            tp += 1
            remaining.pop(int(np.argmax(ious)))
    return tp, len(pred) - tp, len(truth) - tp


cells = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(0, 5),
        st.floats(-4, 4),
        st.floats(-4, 4),
        st.floats(0.5, 1.5),
    ),
    max_size=20,
    unique_by=lambda t: (t[0], t[1]),
)


def _layout(spec: list) -> list:
    """Non-overlapping boxes on a 20 m lattice, jittered and scaled (each stays in its cell)."""
    return [
        box(20 * i + 5 + dx, 20 * j + 5 + dy, 20 * i + 5 + dx + 8 * s, 20 * j + 5 + dy + 8 * s)
        for i, j, dx, dy, s in spec
    ]


@settings(max_examples=60, deadline=None)
@given(cells, cells)
def test_agrees_with_spacenet_reference(pred_spec: list, truth_spec: list) -> None:
    pred, truth = _layout(pred_spec), _layout(truth_spec)
    s = building_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == spacenet_reference(pred, truth)


def _write(path: Path, geoms: list, crs: str) -> Path:
    gpd.GeoDataFrame(geometry=geoms, crs=crs).to_file(path)
    return path


def test_files_in_different_crs_are_compared_in_metres(tmp_path: Path) -> None:
    truth = [box(733700 + 30 * i, 3725000, 733712 + 30 * i, 3725012) for i in range(4)]
    t = _write(tmp_path / "truth.gpkg", truth, "EPSG:32616")
    wgs = gpd.GeoSeries(truth[:3], crs="EPSG:32616").to_crs("EPSG:4326")
    p = _write(tmp_path / "pred.geojson", list(wgs), "EPSG:4326")
    s = evaluate_buildings(p, t)
    assert (s.tp, s.fp, s.fn) == (3, 0, 1)
    assert s.mean_iou > 0.99


def test_min_area_leaves_out_small_buildings_in_ground_metres(tmp_path: Path) -> None:
    """Web Mercator at 60° N: a 2 x 2 projection-metre square is 1 ground m². With --min-area
    1.5 the small truth building (missed) and the small false positive no longer count."""
    import math as m

    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 60.0)
    big = [box(x + 40 * i, y, x + 40 * i + 20, y + 20) for i in range(3)]  # 100 ground m² each
    small_truth = box(x + 200, y, x + 202, y + 2)
    small_pred = box(x + 300, y, x + 302, y + 2)
    t = _write(tmp_path / "truth.gpkg", [*big, small_truth], "EPSG:3857")
    p = _write(tmp_path / "pred.gpkg", [*big, small_pred], "EPSG:3857")
    s = evaluate_buildings(p, t)
    assert (s.tp, s.fp, s.fn) == (3, 1, 1)
    s = evaluate_buildings(p, t, min_area_m2=1.5)
    assert (s.tp, s.fp, s.fn) == (3, 0, 0)
    s = evaluate_buildings(p, t, min_area_m2=0.9)  # 1 ground m²: kept
    assert (s.tp, s.fp, s.fn) == (3, 1, 1)
    assert m.isclose(4 * m.cos(m.radians(60)) ** 2, 1.0)
    res = CliRunner().invoke(cli, ["evaluate", "buildings", str(p), str(t), "--min-area", "1.5"])
    assert res.exit_code == 0, res.output
    assert "1.000" in res.output


def test_label_file_with_wrong_crs_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "utm_as_wgs.geojson"
    bad.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": box(733700, 3725000, 733712, 3725012).__geo_interface__,
                    }
                ],
            }
        )
    )
    with pytest.raises(InputError, match="not degrees"):
        evaluate_buildings(bad, bad)


def test_buffer_iou_of_parallel_lines() -> None:
    a = [LineString([(0, 0), (100, 0)])]
    b = [LineString([(0, 3), (100, 3)])]  # 6 m buffers overlap by 3 m of 9 m width
    iou, precision, recall = buffer_iou(a, b, 6.0)
    assert iou == pytest.approx(3 / 9, rel=0.02)
    assert precision == pytest.approx(0.5, rel=0.02) and recall == pytest.approx(0.5, rel=0.02)
    assert buffer_iou(a, a, 6.0)[0] == pytest.approx(1.0)


def test_apls_identical_is_one_and_broken_road_is_penalised() -> None:
    cross = [LineString([(0, 0), (200, 0)]), LineString([(100, -100), (100, 100)])]
    g = road_graph(cross)
    assert g.number_of_nodes() == 5  # four ends and the crossing
    assert apls(g, road_graph(cross))[0] == pytest.approx(1.0)
    broken = [LineString([(0, 0), (90, 0)]), LineString([(110, 0), (200, 0)]), cross[1]]
    score, t2p, p2t = apls(g, road_graph(broken))
    assert 0.2 < score < 0.9 and t2p < 1.0
    assert apls(g, road_graph([]))[0] == 0.0


def test_apls_detour_penalty_is_relative_length_difference() -> None:
    straight = [LineString([(0, 0), (100, 0)])]
    # the same two ends joined by a 140 m detour: path difference 40 m on 100 m
    detour = [LineString([(0, 0), (0, 20), (100, 20), (100, 0)])]
    score, t2p, p2t = apls(road_graph(straight), road_graph(detour), spacing_m=1000, snap_m=1)
    assert t2p == pytest.approx(1 - 40 / 100)
    assert p2t == pytest.approx(1 - 40 / 140)
    assert score == pytest.approx(2 * t2p * p2t / (t2p + p2t))


def test_road_scores_perfect() -> None:
    """The same roads drawn differently (split at the junction, reversed) score 1; the same
    roads with one of them missing score a known buffer IoU and APLS below 1."""
    truth = [LineString([(0, 0), (300, 0)]), LineString([(150, 0), (150, 200)])]
    drawn = [
        LineString([(150, 0), (0, 0)]),
        LineString([(150, 0), (300, 0)]),
        LineString([(150, 200), (150, 100), (150, 0)]),
    ]
    s = road_scores(drawn, truth)
    assert s.iou == pytest.approx(1.0) and s.apls == pytest.approx(1.0)
    assert s.truth_length_m == pytest.approx(500.0)
    half = road_scores(truth[:1], truth)
    # 6 m buffers: the horizontal road's band (306 x 6 m with round caps) over the union
    h = LineString([(0, 0), (300, 0)]).buffer(3.0)
    u = h.union(LineString([(150, 0), (150, 200)]).buffer(3.0))
    assert half.iou == pytest.approx(h.area / u.area, rel=1e-3)
    assert half.recall < 1.0 and half.precision == pytest.approx(1.0)
    assert half.apls < 0.8


def _mask(
    path: Path, data: np.ndarray, tags: dict | None = None, nodata: int | None = None
) -> Path:
    profile = dict(
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype="uint8",
        crs="EPSG:32616",
        transform=from_origin(0, 100, 1, 1),
        nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        if tags:
            dst.update_tags(**tags)
    return path


def test_mask_scores_known_answer(tmp_path: Path) -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[:, :5] = 255  # road on the left half
    pred = np.zeros((10, 10), np.uint8)
    pred[:, :4] = 2  # road on 4 of the 5 columns, plus one column of buildings
    pred[:, 4] = 1
    pred[0, 9] = 255  # one nodata pixel
    tags = {"GEOSEG_CLASSES": json.dumps(["background", "building", "road"])}
    p = _mask(tmp_path / "p.tif", pred, tags, nodata=255)
    t = _mask(tmp_path / "t.tif", truth)
    s = evaluate_masks(p, t, {0: "background", 255: "road"})
    assert s.pixels == 99
    assert s.iou["road"] == pytest.approx(40 / 50)
    assert s.f1["road"] == pytest.approx(80 / 90)
    assert s.iou["building"] == 0.0
    assert s.iou["background"] == pytest.approx(49 / 49)
    assert math.isclose(s.f1["background"], 1.0)


def test_unmapped_truth_values_are_an_error_naming_them(tmp_path: Path) -> None:
    """A 0/255 building mask scored with ids, or with 255 alone mapped, must not give scores
    that silently leave pixels out."""
    truth = np.zeros((10, 10), np.uint8)
    truth[:, :5] = 255
    pred = np.zeros((10, 10), np.uint8)
    pred[:, :5] = 1
    tags = {"GEOSEG_CLASSES": json.dumps(["background", "building", "road"])}
    p = _mask(tmp_path / "p.tif", pred, tags, nodata=255)
    t = _mask(tmp_path / "t.tif", truth)
    with pytest.raises(InputError, match=r"value\(s\) 255 are not mapped.*class ids 0..2"):
        evaluate_masks(p, t)
    with pytest.raises(InputError, match=r"value\(s\) 0 are not mapped"):
        evaluate_masks(p, t, {255: "building"})
    res = CliRunner().invoke(cli, ["evaluate", "mask", str(p), str(t)])
    assert res.exit_code == 2 and "255" in res.output
    # the same values as the truth's nodata are left out, as documented
    t2 = _mask(tmp_path / "t2.tif", truth, nodata=0)
    s = evaluate_masks(p, t2, {255: "building"})
    assert s.pixels == 50 and s.iou["building"] == 1.0


def test_cli_writes_table_and_json(tmp_path: Path) -> None:
    """Three of four buildings found and one false building: F1 0.75 in the table and JSON."""
    truth = [box(733700 + 30 * i, 3725000, 733712 + 30 * i, 3725012) for i in range(4)]
    t = _write(tmp_path / "truth.gpkg", truth, "EPSG:32616")
    found = [*truth[:3], box(733900, 3725100, 733910, 3725110)]
    p = _write(tmp_path / "pred.gpkg", found, "EPSG:32616")
    report = tmp_path / "r" / "report.json"
    res = CliRunner().invoke(cli, ["evaluate", "buildings", str(p), str(t), "--json", str(report)])
    assert res.exit_code == 0, res.output
    assert "F1" in res.output and "0.750" in res.output
    data = json.loads(report.read_text())
    assert data["metric"] == "buildings"
    assert (data["scores"]["tp"], data["scores"]["fp"], data["scores"]["fn"]) == (3, 1, 1)
    assert data["scores"]["f1"] == pytest.approx(0.75)


def test_cli_missing_file_is_exit_code_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["evaluate", "roads", str(tmp_path / "x.geojson"), str(tmp_path / "y.geojson")]
    )
    assert res.exit_code == 2
    assert "no such file" in res.output


def test_apls_with_control_points_along_oblique_edges() -> None:
    """Control points along oblique edges snap onto the same roads drawn otherwise (reversed,
    split at odd points), and a road cut in two loses paths across the gap."""
    lines = [
        LineString([(0.1234, 0.6789), (173.3333, 91.7771)]),
        LineString([(50.5, -40.25), (60.75, 130.125)]),
    ]
    a, b = lines[0].coords[0], lines[0].coords[-1]
    mid = lines[0].interpolate(0.37, normalized=True).coords[0]
    drawn = [
        LineString([mid, a]),
        LineString([mid, b]),
        LineString(list(lines[1].coords)[::-1]),
    ]
    truth = road_graph(lines)
    assert apls(truth, road_graph(drawn), spacing_m=20)[0] == pytest.approx(1.0, abs=1e-6)
    cut = LineString([lines[0].interpolate(0.5, normalized=True).coords[0], b])
    gap = [LineString([a, lines[0].interpolate(0.3, normalized=True).coords[0]]), cut, lines[1]]
    assert apls(truth, road_graph(gap), spacing_m=20)[0] < 0.9


def test_a_prediction_covering_part_of_the_truth_is_reported_and_refused(tmp_path: Path) -> None:
    """A quarter of the truth's extent predicted perfectly must not score as a perfect whole."""
    truth = np.zeros((20, 20), np.uint8)
    truth[:, 10:] = 1
    tags = {"GEOSEG_CLASSES": json.dumps(["background", "building"])}
    t = _mask(tmp_path / "t.tif", truth)
    p = _mask(tmp_path / "p.tif", truth[:10, :10].copy(), tags)  # the top-left quarter
    with pytest.raises(InputError, match=r"covers 25.0% of the valid pixels"):
        evaluate_masks(p, t)
    s = evaluate_masks(p, t, min_coverage=0.0)
    assert s.coverage == pytest.approx(0.25) and s.pixels == 100
    res = CliRunner().invoke(cli, ["evaluate", "mask", str(p), str(t)])
    assert res.exit_code == 2 and "--min-coverage 0" in res.output, res.output
    res = CliRunner().invoke(cli, ["evaluate", "mask", str(p), str(t), "--min-coverage", "0"])
    assert res.exit_code == 0 and "25.0% of the truth's valid pixels" in res.output, res.output
    whole = _mask(tmp_path / "w.tif", truth, tags)
    assert evaluate_masks(whole, t).coverage == 1.0


def test_a_prediction_that_is_not_a_class_mask_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((10, 10), np.uint8)
    t = _mask(tmp_path / "t.tif", truth)
    rgb = tmp_path / "rgb.tif"
    with rasterio.open(
        rgb, "w", driver="GTiff", width=10, height=10, count=3, dtype="uint8",
        crs="EPSG:32616", transform=from_origin(0, 100, 1, 1),
    ) as dst:  # fmt: skip
        dst.write(rng.integers(0, 255, (3, 10, 10), dtype=np.uint8))
    with pytest.raises(InputError, match="rgb.tif: not a class mask .3 bands"):
        evaluate_masks(rgb, t, classes=["background", "building", "road"])
    grey = _mask(tmp_path / "grey.tif", rng.integers(0, 255, (10, 10), dtype=np.uint8))
    with pytest.raises(InputError, match=r"grey.tif: not a class mask .* not class ids 0..2"):
        evaluate_masks(grey, t, classes=["background", "building", "road"])
