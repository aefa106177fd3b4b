"""Write chunked outputs (probabilities, class mask) as Cloud Optimized GeoTIFFs.

Design: chunks arrive in any order. Each output is written window by window into tiled
scratch GeoTIFFs beside the final name (one per band group, written by a thread of its own
when background writes are on), together with its overview levels, which are computed from
each chunk's 2x2 cells as the chunk arrives (:func:`downsample2`), so no pass over the whole
scene is ever needed. At :meth:`RasterWriter.commit` a VRT gathers the scratch bands, their
validity and the levels, GDAL's COG driver copies it to a temporary name, and the COG is
renamed onto its final name. Until then nothing exists under the final names;
:meth:`RasterWriter.abort` removes every scratch file. GDAL writes take turns under
:data:`GDAL_WRITES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.errors import OutputError
from geoseg.raster import Scene, _enter_thread_env, atomic_path, gdal_env, write_error

log = logging.getLogger(__name__)

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_COMPRESS",
    "GDAL_WRITES",
    "RasterWriter",
    "SCRATCH_CODECS",
    "SCRATCH_COMPRESSION",
    "SCRATCH_ROOM",
    "downsample2",
    "overview_levels",
]


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

#: The COG codecs and their creation options: level 1 of DEFLATE is 6x faster than GDAL's
#: default 6 for about 10 % larger files; ZSTD level 1 the same trade (see
#: ``benchmarks/bench_outputs.py``). Every codec is read by GDAL >= 2.3, QGIS and rasterio.
COMPRESSIONS: dict[str, dict[str, int]] = {"deflate": {"level": 1}, "zstd": {"level": 1}, "lzw": {}}

#: The codec used unless another is asked for: DEFLATE, which every TIFF reader decodes.
DEFAULT_COMPRESS = "deflate"

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
        self,
        scene: Scene,
        tags: dict[str, str] | None = None,
        background: bool = False,
        compress: str = DEFAULT_COMPRESS,
    ) -> None:
        """``background``: write each output on a thread of its own, so that the caller only
        queues chunks. Default: write on the calling thread. ``compress``: the COGs' codec,
        one of :data:`COMPRESSIONS`."""
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}, got {compress!r}")
        self.scene = scene
        self.tags = tags or {}
        self.background = background
        self.compress = compress
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
                compress=self.compress,
                **COMPRESSIONS[self.compress],
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
