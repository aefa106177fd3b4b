"""Read a chunk's padded window: the engine's only reads of scene pixels.

Design: a chunk task reads its own window, halo included, straight from the file (nothing but
the chunk's description travels to a worker). Windows past the scene's edges are mirrored
(:func:`reflect_index`), so every chunk sees one virtual, reflect-padded scene. Each thread
keeps a few datasets open (:data:`MAX_OPEN_READERS`), and for tiled scenes decoded blocks are
kept in a small per-process LRU cache (:data:`BLOCK_CACHE_BYTES`): neighbouring chunks share
their halo's blocks, which are then decompressed once. The validity of each pixel (nodata,
mask, alpha, NaN) is read with the data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.errors import InputError, first_line
from geoseg.io.raster import Scene, gdal_env
from geoseg.io.remote import gdal_path, is_remote

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_CACHE_BYTES",
    "MAX_OPEN_READERS",
    "close_readers",
    "on_grid",
    "read_padded",
    "reflect_index",
]


def reflect_index(start: int, size: int, n: int) -> np.ndarray:
    """Source indices for ``size`` positions from ``start`` on an axis of length ``n``.

    Positions outside [0, n) are mirrored without repeating the edge (numpy's "reflect"),
    periodically, so that any window maps into the scene, however thin it is.
    """
    idx = np.arange(start, start + size)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx).astype(np.int64)


class _OpenReaders(threading.local):
    """Per-thread open datasets, so that GDAL's block cache serves the blocks that neighbouring
    chunks share (their halos) instead of decompressing them again for every chunk."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.datasets: OrderedDict[tuple[str, int, int], Any] = OrderedDict()


Block = tuple[np.ndarray, np.ndarray | None]


class _BlockCache:
    """Decoded blocks of tiled files (see :func:`_read_blocks`), least recently used first,
    shared by the threads of a process: chunks read side by side share their halo blocks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.blocks: OrderedDict[tuple[Any, ...], Block] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[Any, ...]) -> Block | None:
        with self.lock:
            self._forget_parent()
            got = self.blocks.pop(key, None)
            if got is not None:
                self.blocks[key] = got
            return got

    def put(self, key: tuple[Any, ...], block: Block) -> None:
        """Keep ``block``; evict the least recently used ones beyond :data:`BLOCK_CACHE_BYTES`."""
        with self.lock:
            self._forget_parent()
            if key not in self.blocks:
                self.nbytes += _nbytes(block)
            self.blocks[key] = block
            while self.nbytes > BLOCK_CACHE_BYTES and len(self.blocks) > 1:
                self.nbytes -= _nbytes(self.blocks.popitem(last=False)[1])

    def clear(self) -> None:
        with self.lock:
            self.blocks = OrderedDict()
            self.nbytes = 0

    def _forget_parent(self) -> None:
        if self.pid != os.getpid():  # a forked child starts empty
            self.blocks, self.nbytes, self.pid = OrderedDict(), 0, os.getpid()


_READERS = _OpenReaders()
_BLOCKS = _BlockCache()
#: Datasets kept open per thread (least recently used ones are closed).
MAX_OPEN_READERS = 4


@contextlib.contextmanager
def _reader(path: str, opened_ns: int = 0) -> Iterator[tuple[tuple[str, int, int], Any]]:
    """(key, open dataset) for ``path``, reused by later reads in this thread while the file
    is unchanged (the key: path, modification time and size). A remote scene is keyed by
    when it was opened (``opened_ns``): unchanged during one prediction, opened afresh by the
    next, whose reads GDAL does not serve from an earlier one's cache (``CPL_VSIL_CURL_NON_
    CACHED``, see :mod:`geoseg.io.remote`). A failed read closes it."""
    if _READERS.pid != os.getpid():  # a forked child must not share the parent's file offsets
        _READERS.datasets = OrderedDict()
        _READERS.pid = os.getpid()
    if is_remote(path):
        key = (path, opened_ns, 0)
    else:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
    src = _READERS.datasets.pop(key, None)
    if src is None:
        src = rasterio.open(gdal_path(path))
    try:
        yield key, src
    except BaseException:
        src.close()
        raise
    cache = _READERS.datasets
    cache[key] = src
    while len(cache) > MAX_OPEN_READERS:
        cache.popitem(last=False)[1].close()


def close_readers() -> None:
    """Close the datasets this thread keeps open for :func:`read_padded`, drop cached blocks."""
    while _READERS.datasets:
        _READERS.datasets.popitem()[1].close()
    _BLOCKS.clear()


#: Decoded source blocks kept per process (bytes). Chunk windows with halos never line up with
#: a tiled file's blocks, and GDAL copies a window that cuts blocks pixel by pixel (11–14 ms
#: for a 640² RGB window, from its cache); whole blocks come straight from the decoder
#: (1.8 ms per 512² RGB tile, decompression included). So tiled files are read block by block
#: into this cache and windows are cut from it with numpy. It must hold about four rows of
#: blocks across one stripe of chunks (:data:`geoseg.engine.plan.STRIPE_BYTES`).
BLOCK_CACHE_BYTES = 64 << 20


def _uses_blocks(scene: Scene) -> bool:
    """Whether ``scene`` is tiled with blocks small enough for the block cache."""
    bh, bw = scene.block_shape
    block = bh * bw * scene.count * np.dtype(scene.dtype).itemsize
    return bw < scene.width and 16 * block <= BLOCK_CACHE_BYTES


def _read_blocks(
    scene: Scene, src: Any, key: tuple[str, int, int], win: Window, bands: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``bands`` and the dataset mask (if the scene has one) over ``win``, which lies inside
    the scene, assembled from whole decoded blocks."""
    bh, bw = scene.block_shape
    r0, c0 = int(win.row_off), int(win.col_off)
    r1, c1 = r0 + int(win.height), c0 + int(win.width)
    data = np.empty((len(bands), r1 - r0, c1 - c0), dtype=scene.dtype)
    mask = np.empty((r1 - r0, c1 - c0), dtype=bool) if scene.has_mask else None
    for br in range(r0 // bh, (r1 - 1) // bh + 1):
        for bc in range(c0 // bw, (c1 - 1) // bw + 1):
            bkey = (*key, tuple(bands), br, bc)
            got = _BLOCKS.get(bkey)
            if got is None:  # decoded outside the lock, by this thread's own dataset
                block_win = Window(
                    bc * bw,
                    br * bh,
                    min(bw, scene.width - bc * bw),
                    min(bh, scene.height - br * bh),
                )
                block = src.read(list(bands), window=block_win)
                block_mask = src.dataset_mask(window=block_win) > 0 if scene.has_mask else None
                got = (block, block_mask)
                _BLOCKS.put(bkey, got)
            ya, yb = max(r0, br * bh), min(r1, (br + 1) * bh)
            xa, xb = max(c0, bc * bw), min(c1, (bc + 1) * bw)
            rows_in, cols_in = slice(ya - br * bh, yb - br * bh), slice(xa - bc * bw, xb - bc * bw)
            data[:, ya - r0 : yb - r0, xa - c0 : xb - c0] = got[0][:, rows_in, cols_in]
            if mask is not None and got[1] is not None:
                mask[ya - r0 : yb - r0, xa - c0 : xb - c0] = got[1][rows_in, cols_in]
    return data, mask


def _nbytes(block: Block) -> int:
    data, mask = block
    return data.nbytes + (0 if mask is None else mask.nbytes)


def on_grid(src: Any, grid: Any) -> Any:
    """``src`` resampled (nearest neighbour) onto ``grid`` — anything with ``crs``,
    ``transform``, ``width`` and ``height``, such as a :class:`Scene` or an open dataset — as
    a virtual raster that is read window by window."""
    from rasterio.vrt import WarpedVRT

    return WarpedVRT(
        src,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=Resampling.nearest,
    )


def _reflect(arr: np.ndarray, index: np.ndarray, axis: int = -2) -> np.ndarray:
    """``arr`` taken at ``index`` along ``axis``, C-contiguous; no copy when nothing is mirrored."""
    if index[0] == 0 and index[-1] == arr.shape[axis] - 1 and (np.diff(index) == 1).all():
        return arr
    return np.take(arr, index, axis=axis)


def read_padded(
    scene: Scene, window: Window, bands: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``bands`` (1-based) over ``window``, reflecting where it leaves the scene.

    Returns (data of shape (bands, h, w) in the file's dtype, valid mask of shape (h, w)).
    The file stays open in this thread for the next read (see :data:`MAX_OPEN_READERS`).
    """
    rows = reflect_index(int(window.row_off), int(window.height), scene.height)
    cols = reflect_index(int(window.col_off), int(window.width), scene.width)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    src_win = Window(c0, r0, c1 - c0, r1 - r0)
    try:
        with gdal_env(), _reader(scene.path, scene.opened_ns) as (key, src):
            if _uses_blocks(scene):
                block, mask = _read_blocks(scene, src, key, src_win, bands)
            else:
                block = src.read(list(bands), window=src_win)
                mask = src.dataset_mask(window=src_win) > 0 if scene.has_mask else None
    except (RasterioError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise InputError(f"{scene.path}: read failed at window {src_win} ({why})") from exc
    data = _reflect(_reflect(block, rows - r0), cols - c0, axis=-1)
    if mask is None:
        valid = np.ones(data.shape[1:], dtype=bool)
    else:
        valid = _reflect(_reflect(mask, rows - r0), cols - c0, axis=-1)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data, valid
