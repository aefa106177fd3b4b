"""Window arithmetic: cores partition the scene; padded windows align to the model stride."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.engine.grid import ChunkGrid
from geoseg.errors import ConfigError
from geoseg.io.reader import reflect_index


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    chunk_k=st.integers(1, 12),
    halo_k=st.integers(0, 6),
    multiple=st.sampled_from([1, 8, 16, 32]),
)
def test_cores_partition_any_scene(
    width: int, height: int, chunk_k: int, halo_k: int, multiple: int
) -> None:
    grid = ChunkGrid(width, height, chunk_k * multiple, halo_k * multiple, multiple=multiple)
    cover = np.zeros((height, width), np.int32)
    for chunk in grid:
        c, p = chunk.core, chunk.padded
        assert c.width > 0 and c.height > 0
        cover[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] += 1
        # the padded window holds the core plus at least the halo on every side
        assert p.col_off == c.col_off - grid.halo and p.row_off == c.row_off - grid.halo
        assert p.col_off + p.width >= c.col_off + c.width + grid.halo
        assert p.row_off + p.height >= c.row_off + c.height + grid.halo
        # same pooling phase as one whole-scene pass, and sizes the encoder accepts
        assert (p.col_off + grid.halo) % multiple == 0 and (p.row_off + grid.halo) % multiple == 0
        assert p.width % multiple == 0 and p.height % multiple == 0
        assert chunk.trim == (grid.halo, grid.halo)
    assert (cover == 1).all()
    assert len(grid) == grid.shape[0] * grid.shape[1]
    for cols in (1, 2, 5):  # stripe order visits the same chunks, once each
        assert sorted(c.index for c in grid.in_stripes(cols)) == [c.index for c in grid]


def test_grid_by_hand() -> None:
    grid = ChunkGrid(100, 70, 64, 32, multiple=32)
    chunks = list(grid)
    assert grid.shape == (2, 2)
    last = chunks[-1]
    assert (last.core.col_off, last.core.row_off, last.core.width, last.core.height) == (
        64,
        64,
        36,
        6,
    )
    assert (last.padded.width, last.padded.height) == (128, 96)  # 36+64 → 128, 6+64 → 96
    assert grid.redundancy > 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk": 100}, "multiple of the model's stride 32 px; try 128"),
        ({"halo": 20}, "halo 20 px must be a non-negative multiple .* try 32"),
        ({"width": 0}, "scene size must be positive"),
    ],
)
def test_grid_rejects_bad_sizes(kwargs: dict[str, int], match: str) -> None:
    args = {"width": 50, "height": 50, "chunk": 64, "halo": 32} | kwargs
    with pytest.raises(ConfigError, match=match):
        ChunkGrid(**args, multiple=32)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 40), start=st.integers(-60, 60), size=st.integers(1, 80))
def test_reflect_index_matches_numpy_reflect(n: int, start: int, size: int) -> None:
    pad = 200
    padded = np.pad(np.arange(n), pad, mode="reflect")
    expected = padded[start + pad : start + pad + size]
    np.testing.assert_array_equal(reflect_index(start, size, n), expected)


def test_reflect_index_single_pixel_axis() -> None:
    np.testing.assert_array_equal(reflect_index(-3, 7, 1), np.zeros(7))
