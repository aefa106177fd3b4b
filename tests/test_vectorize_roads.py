"""Road centerlines: graph edges, spur pruning, widths, and no breaks at chunk seams."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely

from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.vectorize_helpers import UTM_TRANSFORM, road_grid, write_mask

ROADS = {"layers": {"road": "centerlines"}, "formats": ("gpkg",), "workers": 1}


def lines(tmp: Path, path: Path, **opts: object):  # type: ignore[no-untyped-def]
    outs = vectorize_prediction(path, tmp, VectorizeOptions(**{**ROADS, **opts}))
    return pyogrio.read_dataframe(outs.layers["roads"].paths["gpkg"])


def dangling(df) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Line ends that no other line end meets (pixel coordinates)."""
    inv = ~UTM_TRANSFORM
    ends: Counter[tuple[float, float]] = Counter()
    for g in df.geometry:
        for x, y in (g.coords[0], g.coords[-1]):
            px, py = np.round(inv @ (x, y), 3)
            ends[px, py] += 1
    return [p for p, n in ends.items() if n == 1]


def test_cross_gives_one_line_per_edge_with_width(tmp_path: Path) -> None:
    classes = np.zeros((200, 200), np.uint8)
    classes[95:104, 20:180] = 2  # 9 px = 4.5 m wide
    classes[20:180, 95:104] = 2
    df = lines(tmp_path, write_mask(tmp_path / "x.mask.tif", classes), spur_m=3.0)
    assert len(df) == 4
    assert (df.geometry.geom_type == "LineString").all()
    # Four arms of about 80 px = 40 m each, meeting at one junction.
    np.testing.assert_allclose(sorted(df["length_m"]), [40] * 4, atol=4.0)
    np.testing.assert_allclose(df["width_m"], 4.5, atol=0.6)
    starts_ends = Counter(c for g in df.geometry for c in (g.coords[0], g.coords[-1]))
    assert max(starts_ends.values()) == 4
    assert df["id"].is_unique
    assert set(df["class"]) == {"road"}


def test_short_spurs_are_pruned_and_edges_rejoined(tmp_path: Path) -> None:
    classes = np.zeros((120, 300), np.uint8)
    classes[55:64, 10:290] = 2  # a road 140 m long
    classes[45:55, 140:148] = 2  # a bump: a spur of about 5 m
    path = write_mask(tmp_path / "s.mask.tif", classes)
    kept = lines(tmp_path / "a", path, spur_m=0.0)
    pruned = lines(tmp_path / "b", path, spur_m=8.0)
    assert len(kept) == 3
    assert len(pruned) == 1  # the two halves join again once the spur is gone
    assert pruned["length_m"].iloc[0] > 130


def test_roads_have_no_breaks_at_seams(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    classes = road_grid(400, 110, 9, offset=30).astype(np.uint8) * 2
    yy, xx = np.mgrid[0:400, 0:400]
    classes[np.abs(yy - xx * 0.7 - 40) < 4] = 2  # a diagonal road through many seams
    for _ in range(5):
        r, c = rng.integers(20, 380, 2)
        classes[r - 6 : r + 6, c - 6 : c + 6] = 2
    path = write_mask(tmp_path / "r.mask.tif", classes)
    whole = lines(tmp_path / "whole", path, chunk=4096)
    for chunk in (64, 96):
        part = lines(tmp_path / f"c{chunk}", path, chunk=chunk, halo=32)
        total, ref = part["length_m"].sum(), whole["length_m"].sum()
        assert abs(total - ref) <= 0.01 * ref
        ref_ends = np.array(dangling(whole)).reshape(-1, 2)
        for x, y in dangling(part):
            on_seam = min(x % chunk, chunk - x % chunk, y % chunk, chunk - y % chunk) < 3
            near_ref = len(ref_ends) and np.hypot(*(ref_ends - (x, y)).T).min() < 3
            assert near_ref or not on_seam, (chunk, x, y)
        assert shapely.is_valid(np.asarray(part.geometry.values)).all()


def test_road_polygons_are_optional(tmp_path: Path) -> None:
    classes = road_grid(150, 70, 7).astype(np.uint8) * 2
    path = write_mask(tmp_path / "r.mask.tif", classes)
    outs = vectorize_prediction(path, tmp_path / "a", VectorizeOptions(workers=1))
    assert "road_areas" not in outs.layers
    outs = vectorize_prediction(
        path, tmp_path / "b", VectorizeOptions(workers=1, road_polygons=True, chunk=64)
    )
    assert outs.counts["road_areas"] >= 1
    assert outs.counts["roads"] > 4
    areas = pyogrio.read_dataframe(outs.layers["road_areas"].paths["geojson"])
    assert set(areas["class"]) == {"road"}
    # Road polygons cover the road pixels (0.25 m² each), up to simplification.
    assert areas["area_m2"].sum() == pytest.approx((classes == 2).sum() * 0.25, rel=0.02)


def test_gaps_are_bridged_to_the_road_ahead(tmp_path: Path) -> None:
    """A road broken under a tree is one line again with ``bridge_m`` above its gap and stays
    two lines below it; a side street that stops short of a crossing road meets it (a
    T-junction: that road splits there); a parallel road, whose ends point at no road near
    enough, is left alone; and tiled vectorizing gives the same lines as one chunk. Each
    centerline stops half a road width (4 px) before its pixels end, so both gaps are about
    10 m between centerlines."""
    classes = np.zeros((240, 400), np.uint8)  # 0.5 m pixels
    classes[40:49, 10:190] = 2  # a road ...
    classes[40:49, 202:390] = 2  # ... broken for 12 px: centerlines 20 px = 10 m apart
    classes[150:159, 10:390] = 2  # a crossing road, 186.5 m of centerline
    classes[170:235, 200:209] = 2  # a side street stopping 11 px short: 9.75 m
    classes[64:73, 30:150] = 2  # a road beside the first (56.5 m)
    path = write_mask(tmp_path / "g.mask.tif", classes)
    plain = lines(tmp_path / "plain", path, spur_m=0.0)
    assert sorted(plain["length_m"]) == pytest.approx([28.5, 56.5, 86.5, 90.5, 186.5], abs=1)
    short = lines(tmp_path / "short", path, spur_m=0.0, bridge_m=8.0)
    assert sorted(short["length_m"]) == pytest.approx(sorted(plain["length_m"]), abs=1e-6)
    bridged = lines(tmp_path / "bridged", path, spur_m=0.0, bridge_m=11.0)
    lengths = sorted(bridged["length_m"])
    # the side street 28.5 + 9.75; the parallel road; the crossing road in two at x = 204.5;
    # the broken road 86.5 + 10 + 90.5
    assert lengths == pytest.approx([38.25, 56.5, 90.75, 95.75, 187], abs=1)
    ends = Counter(c for g in bridged.geometry for c in (g.coords[0], g.coords[-1]))
    assert sorted(ends.values()) == [1] * 7 + [3]  # one T-junction; seven dangling ends
    for chunk in (64, 100):
        part = lines(tmp_path / f"c{chunk}", path, spur_m=0.0, bridge_m=11.0, chunk=chunk)
        assert sorted(part["length_m"]) == pytest.approx(lengths, abs=0.01)


def test_bridging_is_off_by_default_and_counts_in_a_pipelines_hash() -> None:
    from geoseg.pipeline.config import parse_pipeline
    from tests.test_model_vectorize import PIPELINE

    assert VectorizeOptions().bridge_m == 0.0
    base = parse_pipeline(PIPELINE, "p.yml")
    off = parse_pipeline(PIPELINE + "vectorize: {bridge_m: 0}\n", "p.yml")
    on = parse_pipeline(PIPELINE + "vectorize: {bridge_m: 12}\n", "p.yml")
    assert base.config_hash() == off.config_hash() != on.config_hash()
    with pytest.raises(Exception, match="bridge_m"):
        parse_pipeline(PIPELINE + "vectorize: {bridge_m: -1}\n", "p.yml")


def test_a_bridge_between_two_junctions_is_a_line_of_its_own(tmp_path: Path) -> None:
    """A side street bridged to the road it stops short of, and then met by another street's
    bridge: both ends of its bridge are junctions, so the bridge is a line of its own (with an
    id and a width like any other)."""
    classes = np.zeros((160, 400), np.uint8)  # 0.5 m pixels
    classes[40:49, 10:390] = 2  # a road (centerline y 44.5)
    classes[60:150, 200:209] = 2  # a street stopping 9.75 m short of it (end at y 64)
    classes[60:69, 100:180] = 2  # a street pointing east at that end, 14.25 m away
    path = write_mask(tmp_path / "j.mask.tif", classes)
    df = lines(tmp_path / "out", path, spur_m=0.0, bridge_m=15.0)
    # the bridge; the street (82 px); the other street (72 px) with its bridge; the road, cut
    # in two where the bridge meets it
    assert sorted(df["length_m"]) == pytest.approx([9.5, 41, 50.5, 90.5, 96], abs=1)
    assert df["id"].is_unique and df["width_m"].notna().all()
