"""Seam pieces joined from their pixel edges: equal to tracing the whole component, ring for
ring, and the end of geometric unions (their time grew far faster than the polygons' size on
large ragged regions: 54 s of a 3072² scene's vectorization)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from geoseg.vectorize.trace import join_pixel_polygons, trace_polygons
from tests.test_vectorize_polygons import assert_same, polygons, reference
from tests.vectorize_helpers import write_mask


def pieces(comp: np.ndarray, rows: list[int], cols: list[int]) -> np.ndarray:
    """``comp`` cut at seam rows and columns: each chunk's components, traced in place."""
    h, w = comp.shape
    out: list[shapely.Polygon] = []
    for ra, rb in zip([0, *rows], [*rows, h], strict=True):
        for ca, cb in zip([0, *cols], [*cols, w], strict=True):
            labels, n = ndimage.label(comp[ra:rb, ca:cb])
            if n:
                out.extend(trace_polygons(labels.astype(np.int32), n, (ra, ca)))
    return np.array(out, dtype=object)


def largest(mask: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def ragged(size: int, seed: int) -> np.ndarray:
    """Smoothed noise thresholded near percolation: large regions with ragged edges, many
    holes, and pixels that touch only at a corner."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
    return noise > 0.0


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(2, 40),
    w=st.integers(2, 40),
    fill=st.floats(0.3, 0.8),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_join_equals_the_whole_component(
    h: int, w: int, fill: float, seed: int, data: st.DataObject
) -> None:
    """Any component, cut by any seams into any number of pieces: the join is the polygon
    that tracing the component whole gives, ring for ring and vertex for vertex."""
    mask = np.random.default_rng(seed).random((h, w)) < fill
    assume(mask.any())  # a small grid may draw no pixel at all: no component to trace
    comp = largest(mask)
    rows = sorted(data.draw(st.sets(st.integers(1, h - 1), max_size=3)))
    cols = sorted(data.draw(st.sets(st.integers(1, w - 1), max_size=3)))
    parts = pieces(comp, rows, cols)
    whole = trace_polygons(comp.astype(np.int32), 1)[0]
    joined = join_pixel_polygons(parts)
    assert joined.is_valid
    assert shapely.equals_exact(shapely.normalize(joined), shapely.normalize(whole), 0.0)


def test_join_of_a_large_ragged_region_has_every_hole() -> None:
    comp = largest(ragged(600, 3))
    parts = pieces(comp, [100, 256, 401], [77, 300, 512])
    whole = trace_polygons(comp.astype(np.int32), 1)[0]
    assert len(parts) > 12 and len(whole.interiors) > 50
    joined = join_pixel_polygons(parts)
    assert shapely.equals_exact(shapely.normalize(joined), shapely.normalize(whole), 0.0)


def test_large_ragged_regions_across_chunks_equal_the_whole_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """geoseg vectorize in 128 px chunks of a 640² mask whose building regions are large,
    ragged and full of holes: the polygons of rasterio.features.shapes on the whole mask,
    without a single geometric union (whose cost grew super-linearly with such regions)."""
    classes = ragged(640, 5).astype(np.uint8)
    path = write_mask(tmp_path / "ragged.mask.tif", classes)

    def no_union(*args: object, **kwargs: object) -> None:
        raise AssertionError("a geometric union was used to join seam pieces")

    monkeypatch.setattr(shapely, "union_all", no_union)
    got, _ = polygons(tmp_path / "out", path, chunk=128)
    ref = reference(classes)
    assert max(len(g.interiors) for g in ref) > 20
    assert_same(ref, got)
