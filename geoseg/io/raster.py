"""Scenes: open and validate them, and the GDAL settings every read and write shares.

The data path: :func:`open_scene` checks a scene once, up front (:class:`Scene`);
:mod:`geoseg.io.reader` reads each chunk's padded window; :mod:`geoseg.io.writer` writes the
outputs as COGs. Outputs go to temporary names first (:func:`atomic_path`), renamed when
complete.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import InputError, OutputError, first_line
from geoseg.io.remote import gdal_path, is_remote, network_options, redact, remote_stem
from geoseg.io.tempfiles import sweep, temporary_path

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_CACHE_MB",
    "GDAL_ENV",
    "Scene",
    "atomic_path",
    "check_writable",
    "describe_ungeoreferenced",
    "gdal_env",
    "ground_resolution",
    "limit_block_cache",
    "open_scene",
    "write_error",
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
    return rasterio.Env(**{**GDAL_ENV, **network_options(), **options})


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
    #: when it was opened (ns): a remote scene is read as it was then, by every chunk
    opened_ns: int = field(default_factory=time.time_ns)

    @property
    def stem(self) -> str:
        """File name without its last extension, used to name outputs (``a.b.tif`` → ``a.b``)."""
        return remote_stem(self.path) if is_remote(self.path) else Path(self.path).stem

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
    """Open ``path`` (a local file, a URL or a GDAL ``/vsi`` path, see :mod:`geoseg.io.remote`)
    and check that geoseg can process it; raise :class:`InputError` if not."""
    remote = is_remote(path)
    if remote:
        name = os.fspath(path)
        shown: str | Path = redact(name)
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p}: is a directory, not a raster file")
        name, shown = str(p.resolve()), p
    try:
        # Without a geotransform rasterio warns, then _describe refuses the file in one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with gdal_env(), rasterio.open(gdal_path(name)) as src:
                scene = _describe(src, shown, name)
                _probe_last_block(src, shown)
    except (RasterioError, CPLE_BaseError) as exc:  # a damaged header or IFD, among others
        why = first_line(exc).replace(gdal_path(name), str(shown)).replace(name, str(shown))
        if remote:
            raise InputError(f"{shown}: cannot be read ({why})") from exc
        raise InputError(f"{shown}: not a readable raster ({why})") from exc
    return scene


#: Free bytes below which a failed write is reported as a full disk.
FULL_DISK_BYTES = 1 << 20


def write_error(path: Path, exc: BaseException, what: str) -> OutputError:
    """An :class:`OutputError` for a failed write to ``path``: "no space left on device" with
    the free space when the disk is full (GDAL and libtiff report it in many ways, e.g.
    ``TIFFRewriteDirectory`` or "Write failed"), else ``what`` with the first line of ``exc``."""
    import errno

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


def describe_ungeoreferenced(src: Any, grid: tuple[CRS, Affine]) -> Scene:
    """The scene of an open image that carries no georeference, placed on ``grid`` (a CRS and
    a north-up transform that the caller chose, such as a local metric grid); every other
    check of :func:`open_scene` applies."""
    return _describe(src, src.name, os.path.abspath(src.name), grid)


def _describe(src: Any, p: str | Path, name: str, grid: tuple[CRS, Affine] | None = None) -> Scene:
    """The scene ``name`` (shown as ``p`` in messages) if geoseg can process it; ``grid``
    stands in for the georeference of an image that has none."""
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
    crs, t = grid if grid is not None else (src.crs, src.transform)
    if grid is None:
        _check_georeference(src, p, t)
    flags = src.mask_flag_enums
    has_mask = any(MaskFlags.all_valid not in f for f in flags)
    alpha = None
    for i, ci in enumerate(src.colorinterp, start=1):
        if ci.name == "alpha":
            alpha = i
    return Scene(
        path=name,
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=src.dtypes[0],
        crs=crs,
        transform=t,
        nodata=src.nodata,
        block_shape=tuple(src.block_shapes[0]),
        has_mask=has_mask or np.dtype(src.dtypes[0]).kind == "f",
        alpha_band=alpha,
        tags=dict(src.tags()),
    )


def _check_georeference(src: Any, p: str | Path, t: Affine) -> None:
    """Refuse a raster whose pixels have no place on a north-up grid."""
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


def _probe_last_block(src: Any, p: str | Path) -> None:
    """Read the last block of every band, so that a truncated file fails now, not mid-run."""
    bh, bw = src.block_shapes[0]
    h, w = min(bh, src.height), min(bw, src.width)
    win = Window(src.width - w, src.height - h, w, h)
    try:
        src.read(window=win)
    except RasterioIOError as exc:
        if is_remote(src.name):
            raise InputError(
                f"{p}: cannot be read (the server stalled, dropped the connection or sent a "
                f"truncated file; {first_line(exc)})"
            ) from exc
        raise InputError(f"{p}: is truncated or corrupt ({first_line(exc)})") from exc


def atomic_path(final: Path) -> Path:
    """A hidden temporary name beside ``final``, to be renamed onto it when complete; it names
    its writer, so that :func:`geoseg.io.tempfiles.sweep` can tell when it is left over."""
    return temporary_path(final)


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove that files can be created in it; then remove
    the temporary files that killed processes left there (:func:`geoseg.io.tempfiles.sweep`)."""
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
