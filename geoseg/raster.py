"""Open and validate scenes, read padded chunk windows, and write chunked outputs as COGs.

This is the only module of the engine that opens raster files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import InputError, OutputError, first_line
from geoseg.tempfiles import sweep, temporary_path

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_CACHE_MB",
    "GDAL_ENV",
    "RasterWriter",
    "SCRATCH_CODECS",
    "SCRATCH_COMPRESSION",
    "SCRATCH_ROOM",
    "Scene",
    "atomic_path",
    "close_readers",
    "gdal_env",
    "ground_resolution",
    "limit_block_cache",
    "on_grid",
    "open_scene",
    "read_padded",
    "reflect_index",
]

#: GDAL's block cache, MiB: small, so that RSS stays bounded (see :func:`limit_block_cache`).
BLOCK_CACHE_MB = 64

#: GDAL settings for every read and write (see :func:`gdal_env`).
GDAL_ENV: dict[str, Any] = {"GDAL_TIFF_INTERNAL_MASK": True}

_cache_lock = threading.Lock()
_cache_limited = False


def limit_block_cache() -> None:
    """Limit GDAL's block cache to :data:`BLOCK_CACHE_MB` for this process, once, unless the
    ``GDAL_CACHEMAX`` environment variable sets it or it is smaller already.

    The cache is the process's, not a thread's: rasterio applies ``GDAL_CACHEMAX`` with
    GDALSetCacheMax64 when an environment is entered and restores it when it is left. Passed
    to every read and write, that made the size swing between 64 MiB and GDAL's default (5 %
    of RAM) from thread to thread, and each shrink writes out the oldest dirty blocks from
    the shrinking thread, whichever file and thread they belong to: with several threads
    writing, GDAL crashed now and then. So it is set once and left.
    """
    global _cache_limited
    if _cache_limited:
        return
    with _cache_lock:
        if not _cache_limited and "GDAL_CACHEMAX" not in os.environ:
            from rasterio.env import get_gdal_config, set_gdal_config

            current = int(get_gdal_config("GDAL_CACHEMAX") or 0)
            if current <= 0 or current > BLOCK_CACHE_MB << 20:
                set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_MB)
        _cache_limited = True


def gdal_env(**options: Any) -> rasterio.Env:
    """A rasterio environment with :data:`GDAL_ENV` and ``options``, the block cache limited."""
    limit_block_cache()
    return rasterio.Env(**GDAL_ENV, **options)


def _enter_thread_env() -> None:
    """Enter :data:`GDAL_ENV` in this (new) thread for its whole life."""
    gdal_env().__enter__()


@dataclass(frozen=True)
class Scene:
    """Validated metadata of one input raster; holds no pixels."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS
    transform: Affine
    nodata: float | None
    block_shape: tuple[int, int]
    has_mask: bool
    alpha_band: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """File name without its last extension, used to name outputs (``a.b.tif`` → ``a.b``)."""
        return Path(self.path).stem

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def ground_res(self) -> tuple[float, float]:
        """Ground metres per pixel along x (columns) and y (rows) at the scene's centre.

        CRS units are not ground metres: a Web Mercator metre is about 1/cos(latitude) metres
        on the ground, and every projection has its own scale factors (see
        :func:`ground_resolution`).
        """
        return ground_resolution(self.crs, self.transform, self.width, self.height)

    @property
    def gsd_m(self) -> float:
        """Ground sample distance in metres at the scene's centre: sqrt(gx * gy) of
        :attr:`ground_res`."""
        gx, gy = self.ground_res
        return math.sqrt(gx * gy)


def ground_resolution(crs: CRS, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Ground metres per pixel (x, y) of a north-up grid, at its centre.

    Projected CRSs: the pixel size in metres divided by the projection's scale along each grid
    axis, from the derivatives of ``pyproj.Proj.get_factors`` (exact also for projections that
    are not conformal or whose grid is not aligned with the meridians). Geographic CRSs:
    geodesic lengths (``pyproj.Geod``) of one pixel along each axis. Falls back to CRS units
    taken as metres where neither applies (for example an engineering CRS).
    """
    rx, ry = abs(transform.a), abs(transform.e)
    cx = transform.c + transform.a * width / 2 + transform.b * height / 2
    cy = transform.f + transform.d * width / 2 + transform.e * height / 2
    try:
        import pyproj

        pcrs = pyproj.CRS.from_user_input(crs)
        if pcrs.is_geographic:
            res = _geographic_res(pcrs, cx, cy, rx, ry)
        elif pcrs.is_projected:
            unit = pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0
            sx, sy = _grid_scales(pcrs, cx, cy)
            res = (rx * unit / sx, ry * unit / sy)
        else:
            res = (rx, ry)
    except Exception:  # pyproj or PROJ cannot describe this CRS: take its units as metres
        res = (rx, ry)
    if not all(math.isfinite(v) and v > 0 for v in res):
        return (rx, ry)
    return res


def _geographic_res(crs: Any, lon: float, lat: float, rx: float, ry: float) -> tuple[float, float]:
    """Geodesic length (metres) of one pixel along x and y at (lon, lat), in the CRS's units."""
    unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else math.radians(1)
    to_deg = math.degrees(unit)  # the CRS's angular unit in degrees (1 for degrees)
    lon, lat, dx, dy = lon * to_deg, lat * to_deg, rx * to_deg, ry * to_deg
    geod = crs.get_geod()
    gx = geod.inv(lon - dx / 2, lat, lon + dx / 2, lat)[2]
    gy = geod.inv(lon, lat - dy / 2, lon, lat + dy / 2)[2]
    return float(gx), float(gy)


def _grid_scales(crs: Any, x: float, y: float) -> tuple[float, float]:
    """The projection's scale factor (CRS length / ground length) along the grid's x and y
    axes at projected point (x, y).

    ``get_factors`` gives the partial derivatives of the projected coordinates (in units of
    the semi-major axis) by longitude and latitude (radians). Inverting that Jacobian turns a
    unit step along a grid axis into (dlon, dlat), whose length on the ellipsoid is
    sqrt((N cos(lat) dlon)² + (M dlat)²), N and M the prime-vertical and meridional radii.
    For a conformal projection both scales equal the ``parallel_scale`` (1/cos(lat) for Web
    Mercator on a sphere).
    """
    import pyproj

    proj = pyproj.Proj(crs)
    lon, lat = proj(x, y, inverse=True)
    f = proj.get_factors(lon, lat)
    e2 = crs.get_geod().es
    phi = math.radians(lat)
    w = 1.0 - e2 * math.sin(phi) ** 2
    n, m = 1.0 / math.sqrt(w), (1.0 - e2) / w**1.5  # radii / semi-major axis
    a, b, c, d = f.dx_dlam, f.dx_dphi, f.dy_dlam, f.dy_dphi
    det = a * d - b * c
    scales = []
    for vx, vy in ((1.0, 0.0), (0.0, 1.0)):
        dlam, dphi = (d * vx - b * vy) / det, (a * vy - c * vx) / det
        scales.append(1.0 / math.hypot(n * math.cos(phi) * dlam, m * dphi))
    return scales[0], scales[1]


def open_scene(path: str | os.PathLike[str]) -> Scene:
    """Open ``path`` and check that geoseg can process it; raise :class:`InputError` if not."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a raster file")
    try:
        # Without a geotransform rasterio warns, then _describe refuses the file in one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with gdal_env(), rasterio.open(p) as src:
                scene = _describe(src, p)
                _probe_last_block(src, p)
    except (RasterioError, CPLE_BaseError) as exc:  # a damaged header or IFD, among others
        raise InputError(f"{p}: not a readable raster ({first_line(exc)})") from exc
    return scene


#: Free bytes below which a failed write is reported as a full disk.
FULL_DISK_BYTES = 1 << 20


def write_error(path: Path, exc: BaseException, what: str) -> OutputError:
    """An :class:`OutputError` for a failed write to ``path``: "no space left on device" with
    the free space when the disk is full (GDAL and libtiff report it in many ways, e.g.
    ``TIFFRewriteDirectory`` or "Write failed"), else ``what`` with the first line of ``exc``."""
    import errno
    import shutil

    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    full = full or "no space left" in str(exc).lower()
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if full or (free is not None and free < FULL_DISK_BYTES):
        left = f"; {free} bytes free" if free is not None else ""
        return OutputError(f"{path}: No space left on device ({directory}{left})")
    return OutputError(f"{what} ({first_line(exc)})")


def _describe(src: Any, p: Path) -> Scene:
    if src.count < 1:
        raise InputError(f"{p}: has no raster bands")
    dtypes = set(src.dtypes)
    if any(np.dtype(d).kind == "c" for d in dtypes):
        raise InputError(
            f"{p}: complex data type ({', '.join(sorted(dtypes))}) is not supported; "
            "convert the SAR data to amplitude or intensity first"
        )
    if len(dtypes) > 1:
        raise InputError(f"{p}: bands have mixed data types {sorted(dtypes)}")
    t = src.transform
    if t.b != 0 or t.d != 0:
        raise InputError(
            f"{p}: has a rotated or sheared geotransform {tuple(t)[:6]}; geoseg needs a "
            "north-up grid, so warp it first (for example: gdalwarp in.tif out.tif)"
        )
    if src.crs is None:
        if src.gcps[0]:
            raise InputError(f"{p}: is georeferenced by GCPs only; warp it to a CRS first")
        raise InputError(f"{p}: has no CRS, so its outputs could not be georeferenced")
    if t.is_identity:  # GDAL's stand-in when a CRS is set but no geotransform is
        raise InputError(f"{p}: has a CRS but no geotransform, so its pixels have no place")
    if t.e > 0:
        raise InputError(f"{p}: is stored bottom-up (positive y pixel size); warp it first")
    flags = src.mask_flag_enums
    has_mask = any(MaskFlags.all_valid not in f for f in flags)
    alpha = None
    for i, ci in enumerate(src.colorinterp, start=1):
        if ci.name == "alpha":
            alpha = i
    return Scene(
        path=str(p.resolve()),
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=src.dtypes[0],
        crs=src.crs,
        transform=t,
        nodata=src.nodata,
        block_shape=tuple(src.block_shapes[0]),
        has_mask=has_mask or np.dtype(src.dtypes[0]).kind == "f",
        alpha_band=alpha,
        tags=dict(src.tags()),
    )


def _probe_last_block(src: Any, p: Path) -> None:
    """Read the last block of every band, so that a truncated file fails now, not mid-run."""
    bh, bw = src.block_shapes[0]
    h, w = min(bh, src.height), min(bw, src.width)
    win = Window(src.width - w, src.height - h, w, h)
    try:
        src.read(window=win)
    except RasterioIOError as exc:
        raise InputError(f"{p}: is truncated or corrupt ({first_line(exc)})") from exc


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
def _reader(path: str) -> Iterator[tuple[tuple[str, int, int], Any]]:
    """(key, open dataset) for ``path``, reused by later reads in this thread while the file
    is unchanged (the key: path, modification time and size). A failed read closes it."""
    if _READERS.pid != os.getpid():  # a forked child must not share the parent's file offsets
        _READERS.datasets = OrderedDict()
        _READERS.pid = os.getpid()
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    src = _READERS.datasets.pop(key, None)
    if src is None:
        src = rasterio.open(path)
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
#: blocks across one stripe of chunks (:data:`geoseg.predict.STRIPE_BYTES`).
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
        with gdal_env(), _reader(scene.path) as (key, src):
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


def atomic_path(final: Path) -> Path:
    """A hidden temporary name beside ``final``, to be renamed onto it when complete; it names
    its writer, so that :func:`geoseg.tempfiles.sweep` can tell when it is left over."""
    return temporary_path(final)


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove that files can be created in it; then remove
    the temporary files that killed processes left there (:func:`geoseg.tempfiles.sweep`)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = atomic_path(directory / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"{directory}: output directory is not writable ({exc.strerror})"
        ) from exc
    removed = sweep(directory)
    if removed:
        log.info("%s: removed %d temporary file(s) a killed process left", directory, len(removed))


@dataclass
class _Part:
    """One scratch GeoTIFF of an output, with its overview levels: some of the output's bands
    (``bands``), or its validity mask as an ordinary band of 0 and 255 (``bands`` None)."""

    work: Path
    bands: slice | None
    profile: dict[str, Any]
    dataset: Any = None
    #: open datasets of overview levels 1, 2, ... (a GeoTIFF each, see :meth:`level_path`)
    levels: list[Any] = field(default_factory=list)
    #: levels 1 to ``streamed`` are written chunk by chunk; the rest from the level above
    streamed: int = 0

    def level_path(self, k: int) -> Path:
        return Path(f"{self.work}.L{k}.tif")

    def path(self, k: int) -> Path:
        """The file of level ``k`` (0: full resolution)."""
        return self.work if k == 0 else self.level_path(k)

    def paths(self) -> list[Path]:
        return [self.path(k) for k in range(len(self.levels) + 1)]


@dataclass
class _Output:
    final: Path
    resampling: str
    band_names: list[str]
    parts: list[_Part]
    mask: _Part | None = None  # the validity mask, when the output has one

    def all_parts(self) -> list[_Part]:
        """Every part, the mask first: the others' levels are made by it."""
        return [self.mask, *self.parts] if self.mask is not None else list(self.parts)

    def vrt_path(self, k: int) -> Path:
        return Path(f"{self.parts[0].work}.L{k}.vrt")


#: Held around every GDAL write and close of a :class:`RasterWriter`, in every thread: two
#: threads writing parts of blocks into two different GeoTIFFs at once corrupted pixels of
#: either (rasterio 1.4 / GDAL 3.10; reads beside one writer are safe). The numpy work around
#: the writes (bands, masks, overview cells) runs outside it.
GDAL_WRITES = threading.Lock()

#: Writes queued per output in the background (see :class:`RasterWriter`), at most.
WRITES_QUEUED = 4

#: Output block size, in pixels; overview levels are made until the smallest fits one block.
BLOCK = 512

#: Overview levels are made chunk by chunk while a chunk's window there is at least this many
#: pixels a side; smaller levels are made from the last of those, block by block, at the end.
MIN_STREAMED_PX = 256

#: Window side, in pixels, for making an overview level from the level above it.
LEVEL_WINDOW = 2048

#: Scratch files are written uncompressed when the output directory's file system has this
#: many times their uncompressed size free, else ZSTD-compressed (level 1): compressing took
#: 3.4x the time of the write itself (1.3 vs 0.4 s for 8192² px of 3-band probabilities, half
#: the bytes), and GDAL writes take turns (:data:`GDAL_WRITES`), so on a fast GPU it was the
#: pipeline's bottleneck; the COG conversion also reads uncompressed scratch faster.
SCRATCH_ROOM = 3.0

#: The scratch compression: "auto" (see :data:`SCRATCH_ROOM`), "none" or "zstd".
SCRATCH_COMPRESSION = "auto"

#: Creation options of scratch files per compression.
SCRATCH_CODECS: dict[str, dict[str, Any]] = {
    "none": {"compress": "none"},
    "zstd": {"compress": "zstd", "zstd_level": 1},
}


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


class RasterWriter:
    """Writes chunk results into outputs that share one grid, then publishes them as COGs.

    Chunks are written windowed into tiled scratch GeoTIFFs (uncompressed when the disk has
    room, see :data:`SCRATCH_ROOM`), and each chunk's 2x2 cells into scratch files of the
    overview levels, level after level, while its window there is at least
    :data:`MIN_STREAMED_PX` a side and on that level's grid; the smaller levels are made from
    the last of those at the end, window by window (a quarter of the pixels or fewer). An
    output's validity mask is a scratch band of its own (0 and 255), not a GDAL mask: GDAL
    crashed when a thread wrote out another thread's dirty mask blocks to make room in the
    block cache. :meth:`commit` converts each output to a Cloud-Optimized GeoTIFF under a
    temporary name, from a VRT that gathers the scratch bands, their mask and, per level, a
    VRT of the level files as overviews (copied, not recomputed), and renames it into place.
    Until then nothing exists under the final names; :meth:`abort` removes every scratch file.
    Only one process may hold a writer for a given output.
    """

    def __init__(
        self, scene: Scene, tags: dict[str, str] | None = None, background: bool = False
    ) -> None:
        """``background``: write each output on a thread of its own, so that the caller only
        queues chunks. Default: write on the calling thread."""
        self.scene = scene
        self.tags = tags or {}
        self.background = background
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[str, deque[Future[None]]] = {}
        self._outputs: dict[str, _Output] = {}
        self._env = gdal_env()

    def add(
        self,
        name: str,
        final: Path,
        count: int,
        *,
        nodata: int | None = None,
        band_names: Sequence[str] | None = None,
        resampling: str = "nearest",
        with_mask: bool = False,
    ) -> None:
        """Declare an output ``name`` of ``count`` uint8 bands to be written at ``final``.

        With background threads each band gets a scratch file and a thread of its own, so
        that the bands compress side by side; the COG gathers them again."""
        split = self.background and count > 1
        groups = [slice(b, b + 1) for b in range(count)] if split else [slice(0, count)]
        stem = atomic_path(final.with_suffix(".scratch.tif"))

        def profile(n: int, nodata: int | None) -> dict[str, Any]:
            return {
                "driver": "GTiff",
                "width": self.scene.width,
                "height": self.scene.height,
                "count": n,
                "dtype": "uint8",
                "crs": self.scene.crs,
                "transform": self.scene.transform,
                "nodata": nodata,
                "tiled": True,
                "blockxsize": BLOCK,
                "blockysize": BLOCK,
                "bigtiff": "if_safer",
                "interleave": "pixel" if n > 1 else "band",
                "photometric": "minisblack",
            }

        parts = [
            _Part(
                stem if len(groups) == 1 else Path(f"{stem}.b{i + 1}"),
                group,
                profile(group.stop - group.start, nodata),
            )
            for i, group in enumerate(groups)
        ]
        mask = _Part(Path(f"{stem}.mask"), None, profile(1, None)) if with_mask else None
        self._outputs[name] = _Output(final, resampling, list(band_names or []), parts, mask)

    def scratch_bytes(self) -> int:
        """Size of every scratch file uncompressed: full resolution and overview levels."""
        w, h = self.scene.width, self.scene.height
        pixels = w * h
        for k in range(1, overview_levels(w, h) + 1):
            pixels += -(-w // 2**k) * -(-h // 2**k)
        bands = sum(part.profile["count"] for o in self._outputs.values() for part in o.all_parts())
        return pixels * bands

    def _scratch_compression(self) -> str:
        """Scratch compression: "none" where the outputs go has room (SCRATCH_ROOM), else "zstd"."""
        if SCRATCH_COMPRESSION != "auto":
            return SCRATCH_COMPRESSION
        need = self.scratch_bytes()
        for out in self._outputs.values():
            try:
                free = shutil.disk_usage(out.final.parent).free
            except OSError:
                return "zstd"
            if free < SCRATCH_ROOM * need:
                return "zstd"
        return "none"

    def __enter__(self) -> RasterWriter:
        self._env.__enter__()
        levels = overview_levels(self.scene.width, self.scene.height)
        compression = self._scratch_compression()
        try:
            for out in self._outputs.values():
                for part in out.all_parts():
                    part.profile.update(SCRATCH_CODECS[compression])
                    part.dataset = rasterio.open(part.work, "w", **part.profile)
                    if part is out.parts[0]:
                        part.dataset.update_tags(**self.tags)
                    if part.bands is not None:
                        for j, bname in enumerate(out.band_names[part.bands], start=1):
                            part.dataset.set_band_description(j, bname)
                    part.levels = [
                        rasterio.open(part.level_path(k), "w", **self._level_profile(part, k))
                        for k in range(1, levels + 1)
                    ]
                    part.streamed = len(part.levels)
        except (RasterioError, CPLE_BaseError, OSError) as exc:
            self.abort()
            where = next(iter(self._outputs.values())).final if self._outputs else Path(".")
            raise write_error(where, exc, f"cannot create outputs for {self.scene.path}") from exc
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.abort()
        finally:
            self._env.__exit__(None, None, None)

    def write(
        self, name: str, window: Window, data: np.ndarray, valid: np.ndarray | None = None
    ) -> None:
        """Write ``data`` (bands, h, w) at ``window``; ``valid`` sets the output's mask there.

        With background threads the write is queued (the arrays must not change afterwards),
        and an earlier write's failure is raised here or by :meth:`commit`.
        """
        out = self._outputs[name]
        if out.mask is None:
            valid = None
        elif valid is None:
            valid = np.ones(data.shape[1:], bool)
        jobs: list[tuple[str, tuple[Any, ...]]] = [
            (name if len(out.parts) == 1 else f"{name}-{i}", (out, part, window, data, valid))
            for i, part in enumerate(out.parts, start=1)
        ]
        if out.mask is not None and valid is not None:  # the mask first, as in all_parts()
            mask = np.where(valid, np.uint8(255), np.uint8(0))[None]
            jobs.insert(0, (f"{name}-mask", (out, out.mask, window, mask, None)))
        for key, job in jobs:
            if not self.background:
                self._write(*job)
                continue
            pending = self._pending.setdefault(key, deque())
            while pending and (pending[0].done() or len(pending) >= WRITES_QUEUED):
                pending.popleft().result()
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = ThreadPoolExecutor(
                    1, f"geoseg-write-{key}", initializer=_enter_thread_env
                )
            pending.append(pool.submit(self._write, *job))

    def _drain(self) -> None:
        """Wait for every queued write; raise the first failure."""
        for pending in self._pending.values():
            while pending:
                pending.popleft().result()

    def _stop_threads(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()
        self._pending.clear()

    def _write(
        self,
        out: _Output,
        part: _Part,
        window: Window,
        data: np.ndarray,
        valid: np.ndarray | None,
    ) -> None:
        """Write a part's bands of ``data`` (or, for the mask part, the mask itself) and their
        overview levels; ``valid`` weighs the averages of the levels."""
        if part.bands is not None:
            data = data[part.bands]
        try:
            with GDAL_WRITES:
                part.dataset.write(data, window=window)
            self._write_levels(out, part, window, data, valid)
        except (RasterioError, CPLE_BaseError, OSError) as exc:
            raise write_error(out.final, exc, f"{out.final}: write failed") from exc

    @staticmethod
    def _resampling(out: _Output, part: _Part) -> str:
        return "max" if part is out.mask else out.resampling

    def _level_profile(self, part: _Part, k: int) -> dict[str, Any]:
        """Profile of overview level ``k`` (2^k times coarser, sizes rounded up as GDAL does)."""
        w, h = self.scene.width, self.scene.height
        lw, lh = -(-w // 2**k), -(-h // 2**k)
        transform = self.scene.transform @ Affine.scale(w / lw, h / lh)
        return {**part.profile, "width": lw, "height": lh, "transform": transform}

    def _on_level_grid(self, window: Window, k: int) -> bool:
        """Whether ``window`` covers whole cells of overview level ``k`` (partial cells only at
        the scene's edges), so that its pixels alone make that level there, in a window of at
        least :data:`MIN_STREAMED_PX` a side (or at the scene's edge)."""
        f = 2**k
        c, r, w, h = (int(v) for v in (window.col_off, window.row_off, window.width, window.height))
        right, bottom = c + w == self.scene.width, r + h == self.scene.height
        return (
            c % f == 0
            and r % f == 0
            and (w % f == 0 or right)
            and (h % f == 0 or bottom)
            and (w // f >= MIN_STREAMED_PX or right)
            and (h // f >= MIN_STREAMED_PX or bottom)
        )

    def _write_levels(
        self,
        out: _Output,
        part: _Part,
        window: Window,
        data: np.ndarray,
        valid: np.ndarray | None,
    ) -> None:
        """Write the window's cells into each overview level that it covers whole."""
        resampling = self._resampling(out, part)
        k = 0
        while k < part.streamed and self._on_level_grid(window, k + 1):
            data, valid = downsample2(data, valid, resampling)
            k += 1
            f = 2**k
            win = Window(int(window.col_off) // f, int(window.row_off) // f, *data.shape[:0:-1])
            with GDAL_WRITES:
                part.levels[k - 1].write(data, window=win)
        part.streamed = k  # the levels below are made from level k once every chunk is in

    def _finish_levels(self, out: _Output, part: _Part) -> None:
        """Make the levels not written chunk by chunk from the level above each, window by
        window, and close every level. The mask, if any, must be finished first: the other
        parts' averages are weighed by it."""
        resampling = self._resampling(out, part)
        weigh = out.mask is not None and part is not out.mask
        for k in range(part.streamed + 1, len(part.levels) + 1):
            if k > 1:
                with GDAL_WRITES:
                    part.levels[k - 2].close()
            with (
                rasterio.open(part.path(k - 1)) as src,
                rasterio.open(out.mask.path(k - 1))  # type: ignore[union-attr]
                if weigh
                else contextlib.nullcontext() as msk,
            ):
                for row in range(0, src.height, LEVEL_WINDOW):
                    for col in range(0, src.width, LEVEL_WINDOW):
                        win = Window(
                            col,
                            row,
                            min(LEVEL_WINDOW, src.width - col),
                            min(LEVEL_WINDOW, src.height - row),
                        )
                        data = src.read(window=win)
                        valid = None if msk is None else msk.read(1, window=win) > 0
                        small, _ = downsample2(data, valid, resampling)
                        dst_win = Window(col // 2, row // 2, *small.shape[:0:-1])
                        with GDAL_WRITES:
                            part.levels[k - 1].write(small, window=dst_win)
        with GDAL_WRITES:
            for ds in part.levels:
                if not ds.closed:
                    ds.close()

    def _vrt(self, out: _Output, k: int) -> Path:
        """A VRT of level ``k`` (0: full resolution) that gathers the parts' bands, with the
        mask part as its mask and, at full resolution, the level VRTs as overviews."""
        import copy
        import xml.etree.ElementTree as ET

        path = out.vrt_path(k)
        first = out.parts[0]
        rasterio.shutil.copy(first.path(k), path, driver="VRT")
        tree = ET.parse(path)
        root = tree.getroot()
        for md in root.findall("Metadata[@domain='IMAGE_STRUCTURE']"):
            root.remove(md)  # the first part's layout, not the output's
        template = root.findall("VRTRasterBand")[0]
        for part in out.parts[1:]:  # one band each
            assert part.bands is not None
            band = copy.deepcopy(template)
            band.set("band", str(part.bands.start + 1))
            for interp in band.findall("ColorInterp"):  # further bands are extra samples
                band.remove(interp)
            source = band.find("SimpleSource/SourceFilename")
            if source is None:
                raise OutputError(f"{out.final}: unexpected VRT of {first.work}")
            source.text, source.attrib = str(part.path(k).resolve()), {"relativeToVRT": "0"}
            for desc in band.findall("Description"):
                desc.text = out.band_names[part.bands.start] if out.band_names else ""
            root.append(band)
        if k == 0:
            for band in root.findall("VRTRasterBand"):
                for level in range(1, len(first.levels) + 1):
                    ovr = ET.SubElement(band, "Overview")
                    ET.SubElement(ovr, "SourceFilename", relativeToVRT="0").text = str(
                        out.vrt_path(level).resolve()
                    )
                    ET.SubElement(ovr, "SourceBand").text = band.get("band", "1")
        if out.mask is not None:
            mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
            source = ET.SubElement(mask, "SimpleSource")
            ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = str(
                out.mask.path(k).resolve()
            )
            ET.SubElement(source, "SourceBand").text = "1"
        tree.write(path)
        return path

    def _source(self, out: _Output) -> Path:
        """What the COG is copied from: the scratch file itself, or a VRT (see :meth:`_vrt`)."""
        first = out.parts[0]
        if len(out.parts) == 1 and out.mask is None and not first.levels:
            return first.work
        for k in range(1, len(first.levels) + 1):
            self._vrt(out, k)
        return self._vrt(out, 0)

    def _publish(self, out: _Output, tmp: Path) -> None:
        # every chunk is written by now: the COG's compression may use every core
        with gdal_env(GDAL_NUM_THREADS="ALL_CPUS"):
            rasterio.shutil.copy(
                self._source(out),
                tmp,
                driver="COG",
                compress="deflate",
                level=1,  # 6x faster than the default 6, for about 10 % larger files
                predictor=2,
                blocksize=BLOCK,
                overview_resampling=out.resampling,
                bigtiff="if_safer",
                num_threads="all_cpus",
            )

    def commit(self) -> None:
        """Convert every scratch file to a COG and rename it onto its final name."""
        outs = list(self._outputs.values())
        tmps = [atomic_path(out.final) for out in outs]
        published = False
        try:
            self._drain()
            self._stop_threads()
            for out in outs:
                for part in out.all_parts():
                    with GDAL_WRITES:
                        part.dataset.close()
            with gdal_env():  # before any COG is written: no part-block writes beside those
                for out in outs:
                    for part in out.all_parts():
                        self._finish_levels(out, part)
            if self.background:  # the outputs side by side: parts of a conversion are serial
                with ThreadPoolExecutor(len(outs), "geoseg-publish") as pool:
                    jobs = [
                        pool.submit(self._publish, o, t) for o, t in zip(outs, tmps, strict=True)
                    ]
                    for job in jobs:
                        job.result()
            else:
                for out, tmp in zip(outs, tmps, strict=True):
                    self._publish(out, tmp)
            for done, out in zip(tmps, outs, strict=True):
                os.replace(done, out.final)
            published = True
        except (RasterioError, CPLE_BaseError, OSError) as exc:
            where = outs[0].final if outs else Path(".")
            raise write_error(where, exc, f"cannot write outputs for {self.scene.path}") from exc
        finally:
            if not published:
                for path in tmps:
                    with contextlib.suppress(OSError):
                        path.unlink()
            self._remove_scratch()

    def abort(self) -> None:
        """Close and delete everything written so far; the final names stay untouched."""
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        self._stop_threads()
        for out in self._outputs.values():
            for part in out.all_parts():
                for ds in (part.dataset, *part.levels):
                    if ds is not None and not ds.closed:
                        with GDAL_WRITES, contextlib.suppress(Exception):
                            ds.close()
                for path in part.paths():
                    with contextlib.suppress(OSError):
                        path.unlink()
            for k in range(len(out.parts[0].levels) + 1):
                with contextlib.suppress(OSError):
                    out.vrt_path(k).unlink()
