"""Pure window arithmetic: a scene cut into chunk cores, each read with a halo.

All numbers are pixels. Windows follow rasterio's convention (col_off, row_off, width, height),
and a padded window may reach outside the scene; the reader fills that part by reflection.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from rasterio.windows import Window

from geoseg.errors import ConfigError

__all__ = ["Chunk", "ChunkGrid", "Tiling", "round_up", "stripes"]


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def stripes(shape: tuple[int, int], cols: int) -> Iterator[tuple[int, int]]:
    """Grid positions (row, col) of a (rows, cols) grid in vertical stripes ``cols`` wide,
    row by row within a stripe."""
    if cols < 1:
        raise ValueError(f"stripe width must be >= 1 chunk, got {cols}")
    rows, ncols = shape
    for c0 in range(0, ncols, cols):
        for r in range(rows):
            for c in range(c0, min(c0 + cols, ncols)):
                yield r, c


@dataclass(frozen=True)
class Chunk:
    """One unit of work: the core it owns and the padded window the model sees (pixels; for a
    scene read at the model's GSD, the padded window is on the virtual model grid, see
    :mod:`geoseg.engine.resample`)."""

    row: int
    col: int
    core: Window
    padded: Window

    @property
    def index(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def trim(self) -> tuple[int, int]:
        """Offset (rows, cols) of the core inside the padded window."""
        return (
            int(self.core.row_off - self.padded.row_off),
            int(self.core.col_off - self.padded.col_off),
        )


class Tiling:
    """What every chunk grid offers, given its ``shape`` and ``at``: its size, iteration in
    row-major order and in vertical stripes."""

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def at(self, row: int, col: int) -> Chunk:
        raise NotImplementedError

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def __iter__(self) -> Iterator[Chunk]:
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                yield self.at(r, c)

    def in_stripes(self, cols: int) -> Iterator[Chunk]:
        """All chunks, in vertical stripes ``cols`` chunks wide, row by row within a stripe.

        Neighbouring chunks share their halos' source blocks; in this order the blocks read for
        one chunk row are still in a small block cache when the next row needs them, however
        wide the scene is.
        """
        for r, c in stripes(self.shape, cols):
            yield self.at(r, c)


@dataclass(frozen=True)
class ChunkGrid(Tiling):
    """Chunk cores of ``chunk`` pixels tiling a ``width`` x ``height`` scene, with a ``halo``.

    ``multiple`` is the model's output stride: padded windows start at a multiple of it relative
    to the scene origin minus the halo, and their sizes are rounded up to it, so every chunk sees
    the same pooling grid as one whole-scene pass would.
    """

    width: int
    height: int
    chunk: int
    halo: int
    multiple: int = 32

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"scene size must be positive, got {self.width}x{self.height} px")
        if self.multiple < 1:
            raise ConfigError(f"multiple must be >= 1, got {self.multiple}")
        if self.chunk < self.multiple or self.chunk % self.multiple:
            raise ConfigError(
                f"chunk size {self.chunk} px must be a positive multiple of the model's "
                f"stride {self.multiple} px; try {round_up(max(self.chunk, 1), self.multiple)}"
            )
        if self.halo < 0 or self.halo % self.multiple:
            raise ConfigError(
                f"halo {self.halo} px must be a non-negative multiple of the model's "
                f"stride {self.multiple} px; try {round_up(max(self.halo, 0), self.multiple)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Number of chunks as (rows, cols)."""
        return (math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk))

    def at(self, row: int, col: int) -> Chunk:
        """The chunk at grid position (row, col)."""
        r0, c0 = row * self.chunk, col * self.chunk
        core_h = min(self.chunk, self.height - r0)
        core_w = min(self.chunk, self.width - c0)
        core = Window(c0, r0, core_w, core_h)
        padded = Window(
            c0 - self.halo,
            r0 - self.halo,
            round_up(core_w + 2 * self.halo, self.multiple),
            round_up(core_h + 2 * self.halo, self.multiple),
        )
        return Chunk(row, col, core, padded)

    @property
    def redundancy(self) -> float:
        """Pixels run through the model per scene pixel (>= 1): the halo's cost. A padded
        window's width depends on its chunk's column alone and its height on its row alone:
        one row and one column of chunks are summed, not every chunk."""
        rows, cols = self.shape
        width = sum(int(self.at(0, c).padded.width) for c in range(cols))
        height = sum(int(self.at(r, 0).padded.height) for r in range(rows))
        return width * height / (self.width * self.height)
