"""COG tiles: the 512 px tile grid, the codecs, the tiles of a scratch file read back before
the COG exists (:class:`StoredTiles`), and the 2x2 reduction that makes each overview level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numpy as np

__all__ = [
    "BLOCK",
    "COMPRESSIONS",
    "DEFAULT_COMPRESS",
    "TIFF_CODES",
    "StoredTiles",
    "downsample2",
    "overview_levels",
    "tile_encoder",
    "tile_keys",
]


#: Output tile size, in pixels; overview levels are made until the smallest fits one tile.
BLOCK = 512


#: The COG codecs and their levels: level 1 of DEFLATE (libdeflate) is several times faster
#: than level 6 for files about 10 % larger; ZSTD level 1 the same trade (see
#: ``benchmarks/bench_outputs.py``). Every codec is read by GDAL >= 2.3, QGIS and rasterio.
COMPRESSIONS: dict[str, dict[str, int]] = {"deflate": {"level": 1}, "zstd": {"level": 1}, "lzw": {}}


#: The codec used unless another is asked for: DEFLATE, which every TIFF reader decodes.
DEFAULT_COMPRESS = "deflate"


#: TIFF compression codes of the codecs.
TIFF_CODES = {"deflate": 8, "zstd": 50000, "lzw": 5}


def tile_encoder(compress: str) -> Callable[[np.ndarray], bytes]:
    """The tile encoder of a codec (``imagecodecs`` takes any buffer, without a copy)."""
    codecs: Any = imagecodecs
    level = COMPRESSIONS[compress].get("level")
    if compress == "deflate":
        return lambda a: bytes(codecs.deflate_encode(a, level=level))
    if compress == "zstd":
        return lambda a: bytes(codecs.zstd_encode(a, level=level))
    return lambda a: bytes(codecs.lzw_encode(a))


_DECODERS = {"deflate": "deflate_decode", "zstd": "zstd_decode", "lzw": "lzw_decode"}


def tile_keys(r0: int, c0: int, r1: int, c1: int) -> list[tuple[int, int]]:
    """The full-resolution tiles (row, column) that rows r0:r1 and columns c0:c1 touch."""
    return [
        (ty, tx)
        for ty in range(r0 // BLOCK, (r1 - 1) // BLOCK + 1)
        for tx in range(c0 // BLOCK, (c1 - 1) // BLOCK + 1)
    ]


@dataclass
class StoredTiles:
    """Full-resolution tiles of one output, read back from the writer's scratch file while the
    scene is still being predicted (:meth:`RasterWriter.stored`): what a vectorize task needs to
    read a window of the output before the COG exists. Picklable: tasks in other processes on
    this machine (or any that sees the output folder) read the file themselves.

    Only the tiles in ``index`` can be read; they are never rewritten, so a process that reads
    them while the writer appends others sees their final bytes.
    """

    path: str
    count: int
    compress: str
    #: (offset, size) in the scratch file of tile (row, column)
    index: dict[tuple[int, int], tuple[int, int]]
    _decoded: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_decoded": {}}

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        """Tile (ty, tx) as (512, 512, bands), decoded once per task."""
        tile = self._decoded.get((ty, tx))
        if tile is not None:
            return tile
        offset, size = self.index[(ty, tx)]
        with open(self.path, "rb") as f:
            f.seek(offset)
            blob = f.read(size)
        try:
            if len(blob) != size:
                raise ValueError("cut short")
            raw = getattr(imagecodecs, _DECODERS[self.compress])(
                blob, out=BLOCK * BLOCK * self.count
            )
            diff = np.frombuffer(raw, np.uint8).reshape(BLOCK, BLOCK, self.count)
            tile = imagecodecs.delta_decode(diff, axis=1)  # undo predictor 2 (5x numpy's cumsum)
        except (RuntimeError, ValueError) as exc:  # imagecodecs' errors are RuntimeErrors
            raise OSError(f"{self.path}: tile ({ty}, {tx}) is unreadable ({exc})") from exc
        self._decoded[(ty, tx)] = tile
        return tile

    def read(self, band: int, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Band ``band`` (1-based) over rows r0:r1 and columns c0:c1 (inside the raster)."""
        out = np.empty((r1 - r0, c1 - c0), np.uint8)
        for ty, tx in tile_keys(r0, c0, r1, c1):
            y0, x0 = ty * BLOCK, tx * BLOCK
            ya, yb = max(r0, y0), min(r1, y0 + BLOCK)
            xa, xb = max(c0, x0), min(c1, x0 + BLOCK)
            tile = self._tile(ty, tx)
            out[ya - r0 : yb - r0, xa - c0 : xb - c0] = tile[
                ya - y0 : yb - y0, xa - x0 : xb - x0, band - 1
            ]
        return out


def overview_levels(width: int, height: int, block: int = BLOCK) -> int:
    """Number of 2x overview levels until the raster fits in one block (as GDAL's COG driver)."""
    levels = 0
    while max(width, height) > block:
        width, height = -(-width // 2), -(-height // 2)
        levels += 1
    return levels


def downsample2(
    data: np.ndarray, valid: np.ndarray | None, resampling: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """One 2x overview step of ``data`` (bands, h, w): ``average`` over the valid pixels of each
    2x2 cell (rounded), ``nearest`` (its top-left pixel, as GDAL picks) or ``max``; odd edges
    keep their partial cells. Returns the data and the validity of each cell (any valid pixel)."""
    b, h, w = data.shape
    if resampling == "nearest":
        return data[:, ::2, ::2], None if valid is None else valid[::2, ::2]
    if resampling == "max":  # e.g. a mask of 0 and 255: a cell is valid if any pixel is
        if h % 2 or w % 2:
            padded = np.zeros((b, h + h % 2, w + w % 2), data.dtype)
            padded[:, :h, :w] = data
            data = padded
        top = np.maximum(data[:, 0::2, 0::2], data[:, 0::2, 1::2])
        return np.maximum(top, np.maximum(data[:, 1::2, 0::2], data[:, 1::2, 1::2])), None
    if resampling != "average":
        raise ValueError(f"unsupported overview resampling {resampling!r}")
    h2, w2 = -(-h // 2), -(-w // 2)
    masked = valid is not None
    if valid is not None and valid.all():  # the common case: plain averages, 4x faster
        small, _ = downsample2(data, None, resampling)
        return small, np.ones(small.shape[1:], dtype=bool)
    if h % 2 or w % 2:  # pad the partial cells with invalid pixels
        padded = np.zeros((b, 2 * h2, 2 * w2), np.uint8)
        padded[:, :h, :w] = data
        padded_valid = np.zeros((2 * h2, 2 * w2), bool)
        padded_valid[:h, :w] = True if valid is None else valid
        data, valid = padded, padded_valid
    weight = None if valid is None else valid.view(np.uint8)
    sums = _cell_sums(data if weight is None else data * weight)
    if weight is None:
        sums += 2
        sums >>= 2
        return sums.astype(np.uint8), None
    n = _cell_sums(weight)
    out = (sums + n // 2) // np.maximum(n, 1)
    return out.astype(np.uint8), (n > 0) if masked else None


def _cell_sums(x: np.ndarray) -> np.ndarray:
    """Sums of the 2x2 cells of ``x`` (..., 2h, 2w), uint8, as uint16 (..., h, w).

    Each pair of neighbouring pixels is read as one uint16: the sum of its two bytes is the
    pair's sum, whatever the byte order, and every step runs over contiguous memory (5x faster
    than adding four strided quarters)."""
    pairs = np.ascontiguousarray(x).view(np.uint16)
    top, bottom = pairs[..., 0::2, :], pairs[..., 1::2, :]
    sums = top & 0xFF
    sums += top >> 8
    sums += bottom & 0xFF
    sums += bottom >> 8
    return sums
