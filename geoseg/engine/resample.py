"""Resolution-aware prediction: each chunk is read at the model's ground sample distance.

A virtual model grid is anchored at the scene's top-left corner. On each axis, with ``r`` the
model pixels per scene pixel (scene ground resolution / model GSD), model pixel ``j`` spans
scene coordinates ``[j / r, (j + 1) / r)`` (continuous, 0 = the scene's left or top edge).
Every value on that grid is a fixed function of its global index and of the reflect-padded
scene, computed in the same order of operations whichever window computes it, so every chunk
gets the same value bit for bit. A chunk's model window is aligned to the model's stride on
that grid, as :class:`geoseg.engine.grid.ChunkGrid` aligns padded windows, so a whole-scene pass
and every chunk see the same pooling grid: seams stay as exact as without resampling.

Scene → model: an area average where the model grid is coarser (r < 1), bilinear where it is
finer. Model → scene: the reverse. Per axis, a resampling is a short run of source pixels
per destination pixel (:class:`Taps`), applied separably: rows, then columns. Nothing here
reads files; everything is per chunk, so memory stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.windows import Window

from geoseg.engine.grid import Chunk, Tiling, round_up

__all__ = [
    "MAX_RESAMPLE_RATIO",
    "RESAMPLE_TOLERANCE",
    "VALID_FRACTION",
    "ResamplePlan",
    "ResampledGrid",
    "Taps",
    "apply_taps",
    "axis_ratio",
    "check_ratio",
    "resample_bytes",
    "resample_plan",
    "taps",
    "weights",
]

#: A scene is resampled along an axis when its ground resolution there differs from the
#: model's GSD by more than this fraction.
RESAMPLE_TOLERANCE = 0.05

#: The largest resampling ratio (model pixels per scene pixel, or scene pixels per model pixel)
#: read by default: memory and time grow with the ratio, not with the chunk (1000x upsampling
#: of a 300 m scene for a 0.3 m model plans half a million chunks).
MAX_RESAMPLE_RATIO = 8.0

#: A model pixel is valid when at least this fraction of its weight falls on valid scene
#: pixels; invalid ones are 0 after normalization (the band mean), as nodata pixels are.
VALID_FRACTION = 0.5

#: Overlaps (source pixels) below this are none: span edges that fall on a pixel edge up to
#: rounding do not reach into the next pixel.
_EPS = 1e-9

#: Scene cores at least this large (pixels) are rounded down to a multiple of
#: :data:`_CORE_MULTIPLE`, so that the writer can stream overview levels chunk by chunk.
_CORE_ROUNDED = 512
_CORE_MULTIPLE = 32

#: The most taps (destination pixels x source pixels each) one :func:`taps` call allocates:
#: 2**28 float64 weights are 2 GiB. A degenerate pixel size (1e-9 m) once asked for 286 GiB.
_MAX_TAPS = 2**28

Kind = Literal["area", "bilinear"]


def kind_for(ratio: float) -> Kind:
    """ "area" where the destination grid is as coarse as the source or coarser (``ratio`` =
    destination pixels per source pixel <= 1), "bilinear" where it is finer."""
    return "area" if ratio <= 1.0 else "bilinear"


@dataclass(frozen=True)
class Taps:
    """Per destination pixel ``i``: source pixels ``first[i] + k`` weighted ``weights[i, k]``.

    Indices are global on both grids. Each row's weights sum to 1 (up to float32 rounding);
    a row's run is ``count[i]`` pixels long and its weights past that are 0.
    """

    first: np.ndarray  # int64 (n,)
    count: np.ndarray  # int64 (n,)
    weights: np.ndarray  # float32 (n, k)

    @property
    def lo(self) -> int:
        """First source index with weight."""
        return int(self.first.min())

    @property
    def hi(self) -> int:
        """One past the last source index with weight."""
        return int((self.first + self.count).max())


def taps(dst_start: int, dst_n: int, ratio: float, kind: Kind | None = None) -> Taps:
    """The source taps of destination pixels ``dst_start`` to ``dst_start + dst_n - 1``.

    Destination pixel ``d`` spans source coordinates ``[d / ratio, (d + 1) / ratio)``
    (``ratio``: destination pixels per source pixel). "area": the overlap-weighted mean of the
    source pixels the span covers. "bilinear": the two source pixels around source coordinate
    ``(d + 0.5) / ratio - 0.5``. Default: :func:`kind_for`. Each row depends on ``d`` alone.
    """
    if dst_n < 1 or not ratio > 0:
        raise ValueError(f"need dst_n >= 1 and ratio > 0, got {dst_n} and {ratio}")
    kind = kind or kind_for(ratio)
    if kind == "area" and dst_n * (1.0 / ratio + 2.0) > _MAX_TAPS:
        raise ValueError(
            f"resampling {dst_n} pixels at {ratio:.3g} destination pixels per source pixel "
            f"needs about {dst_n / ratio:.3g} source taps, more than {_MAX_TAPS:.3g}"
        )
    d = np.arange(dst_start, dst_start + dst_n, dtype=np.float64)
    if kind == "area":
        a, b = d / ratio, (d + 1.0) / ratio
        first = np.floor(a + _EPS)
        count = np.maximum(np.ceil(b - _EPS) - first, 1.0)
        src = first[:, None] + np.arange(int(count.max()))
        w = np.minimum(b[:, None], src + 1.0) - np.maximum(a[:, None], src)
        w[w < _EPS] = 0.0
    elif kind == "bilinear":
        s = (d + 0.5) / ratio - 0.5
        i0 = np.floor(s)
        w = np.stack([1.0 - (s - i0), s - i0], axis=1)
        w[w < _EPS] = 0.0
        skip = w[:, 0] == 0.0  # all the weight on the second pixel: start the run there
        w[skip] = np.stack([w[skip, 1], w[skip, 0]], axis=1)
        first = np.where(skip, i0 + 1.0, i0)
        count = np.where(w[:, 1] > 0.0, 2.0, 1.0)
    else:
        raise ValueError(f"kind must be 'area' or 'bilinear', got {kind!r}")
    while w.shape[1] > 1 and not w[:, -1].any():  # no row reaches that far
        w = w[:, :-1]
    total = w[:, 0].copy()
    for k in range(1, w.shape[1]):  # in tap order, so that a row's sum never depends on n
        total += w[:, k]
    return Taps(
        first.astype(np.int64), count.astype(np.int64), (w / total[:, None]).astype(np.float32)
    )


def weights(
    dst_start: int,
    dst_n: int,
    src_start: int,
    src_n: int,
    ratio: float,
    kind: Kind | None = None,
) -> np.ndarray:
    """Dense (dst_n, src_n) float32 weights of :func:`taps` over source pixels ``src_start``
    to ``src_start + src_n - 1``, rows summing to 1; raise if the taps leave that range."""
    t = taps(dst_start, dst_n, ratio, kind)
    _check_covers(t, src_start, src_n)
    out = np.zeros((dst_n, src_n), np.float32)
    k = t.weights.shape[1]
    rows = np.repeat(np.arange(dst_n), k)
    cols = (t.first[:, None] + np.arange(k) - src_start).ravel()
    w = t.weights.ravel()
    used = w > 0
    out[rows[used], cols[used]] = w[used]
    return out


def _check_covers(t: Taps, src_start: int, src_n: int) -> None:
    if t.lo < src_start or t.hi > src_start + src_n:
        raise ValueError(
            f"source pixels {src_start}..{src_start + src_n - 1} do not cover the taps "
            f"{t.lo}..{t.hi - 1}"
        )


def apply_taps(arr: np.ndarray, t: Taps, src_start: int, axis: int) -> np.ndarray:
    """``arr`` resampled along ``axis`` (-2: rows, -1: columns) as float32, where index 0 of
    that axis is global source pixel ``src_start``.

    Each output value is the sum of its taps in tap order: the same operations, hence the
    same bits, whatever window it is computed in.
    """
    n_src = arr.shape[axis]
    _check_covers(t, src_start, n_src)
    arr = arr.astype(np.float32, copy=False)
    local = t.first - src_start
    if t.weights.shape[1] == 1:  # one tap of weight 1 per pixel: a copy
        return np.take(arr, local, axis=axis)
    shape = [1] * arr.ndim
    shape[axis] = len(local)
    out = np.take(arr, local, axis=axis)
    out *= t.weights[:, 0].reshape(shape)
    for k in range(1, t.weights.shape[1]):
        # taps past a run's end have weight 0; keep their index inside the array
        part = np.take(arr, np.minimum(local + k, n_src - 1), axis=axis)
        part *= t.weights[:, k].reshape(shape)
        out += part
    return out


def _separable(arr: np.ndarray, ty: Taps, tx: Taps, row0: int, col0: int) -> np.ndarray:
    """``arr`` (..., h, w) resampled along rows then columns; (row0, col0): global index of
    ``arr[..., 0, 0]`` on the source grid."""
    return apply_taps(apply_taps(arr, ty, row0, -2), tx, col0, -1)


def axis_ratio(ground_m: float, gsd_m: float, tolerance: float = RESAMPLE_TOLERANCE) -> float:
    """Model pixels per scene pixel along one axis: ``ground_m / gsd_m``, or exactly 1.0 when
    that is within ``tolerance`` of 1 (the axis is not resampled)."""
    ratio = ground_m / gsd_m
    return ratio if abs(ratio - 1.0) > tolerance else 1.0


def check_ratio(
    name: str, ground_res: tuple[float, float], gsd_m: float, max_ratio: float, ways_out: str
) -> None:
    """Raise :class:`~geoseg.errors.InputError` (one line naming ``name``, both resolutions and
    ``ways_out``) when ``ground_res`` (metres per pixel along x, y) is not a finite positive
    size, or differs from ``gsd_m`` (metres) by more than ``max_ratio`` times either way."""
    from geoseg.errors import InputError

    gx, gy = ground_res
    if not all(math.isfinite(g) and g > 0 for g in ground_res) or not gsd_m > 0:
        raise InputError(
            f"{name}: ground resolution {gx:.3g} x {gy:.3g} m per pixel cannot be resampled to "
            f"the model's {gsd_m:.3g} m; {ways_out}"
        )
    worst = max(max(g / gsd_m, gsd_m / g) for g in ground_res)
    if worst > max_ratio:
        coarse = max(ground_res) / gsd_m > max_ratio
        way = "coarser" if coarse else "finer"
        raise InputError(
            f"{name}: ground resolution {gx:.3g} x {gy:.3g} m per pixel is {worst:.3g}x {way} "
            f"than the model's {gsd_m:.3g} m, beyond the {max_ratio:g}x resampling limit; "
            f"{ways_out}"
        )


def resample_bytes(
    scene: Window, model: Window, bands: int, itemsize: int, *, chunks: int = 1
) -> int:
    """Host memory (bytes) that resampling one chunk takes: the raw pixels of its ``scene``
    window (``bands`` of ``itemsize`` bytes), one band and the validity as float32 on the scene
    grid, the rows resampled (model rows x scene columns) and the model window's bands and
    validity as float32; times ``chunks`` resampled at once."""
    sh, sw = int(scene.height), int(scene.width)
    mh, mw = int(model.height), int(model.width)
    on_scene = sh * sw * (bands * itemsize + 4 + 4 + 1)
    between = 2 * mh * sw * 4
    on_model = (bands + 2) * mh * mw * 4
    return chunks * (on_scene + between + on_model)


@dataclass(frozen=True)
class ResamplePlan:
    """How a scene's chunks are read at the model's GSD and brought back; plain and picklable.

    ``ratio_x``, ``ratio_y``: model pixels per scene pixel along x (columns) and y (rows), 1.0
    where that axis is not resampled. ``halo`` and ``stride``: model pixels.
    """

    ratio_x: float
    ratio_y: float
    halo: int
    stride: int

    def model_window(self, core: Window) -> Window:
        """The model window (pixels of the virtual model grid) that ``core`` (scene pixels)
        needs: the model pixels its back-resampling reads, widened by the halo, its start
        aligned down to the stride and its size rounded up to it."""
        c0, w = self._model_range(int(core.col_off), int(core.width), self.ratio_x)
        r0, h = self._model_range(int(core.row_off), int(core.height), self.ratio_y)
        return Window(c0, r0, w, h)

    def _model_range(self, start: int, n: int, ratio: float) -> tuple[int, int]:
        back = taps(start, n, 1.0 / ratio)
        first = (back.lo - self.halo) // self.stride * self.stride
        return first, round_up(back.hi + self.halo - first, self.stride)

    def scene_window(self, model: Window, core: Window) -> Window:
        """Scene pixels to read (reflected where they leave the scene) for ``model``: what its
        pixels' taps reach, and ``core`` itself (for its validity)."""
        c0, c1 = self._scene_range(
            model.col_off, model.width, self.ratio_x, core.col_off, core.width
        )
        r0, r1 = self._scene_range(
            model.row_off, model.height, self.ratio_y, core.row_off, core.height
        )
        return Window(c0, r0, c1 - c0, r1 - r0)

    @staticmethod
    def _scene_range(m0: float, mn: float, ratio: float, c0: float, cn: float) -> tuple[int, int]:
        fwd = taps(int(m0), int(mn), ratio)
        return min(fwd.lo, int(c0)), max(fwd.hi, int(c0 + cn))

    def to_model(
        self,
        data: np.ndarray,
        valid: np.ndarray,
        scene: Window,
        model: Window,
        *,
        may_be_invalid: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw pixels (bands, h, w) over ``scene`` → float32 (bands, H, W) over ``model``, and
        the model pixels' validity (H, W).

        Valid pixels only: data × valid and valid are resampled with the same weights and
        divided, also where every pixel of this window is valid (so that a value never
        depends on its window), unless no pixel of the scene can be invalid
        (``may_be_invalid`` False). Model pixels with less than :data:`VALID_FRACTION` valid
        weight are invalid and 0. Normalization commutes with this (the weights sum to 1),
        so it comes after.
        """
        ty = taps(int(model.row_off), int(model.height), self.ratio_y)
        tx = taps(int(model.col_off), int(model.width), self.ratio_x)
        r0, c0 = int(scene.row_off), int(scene.col_off)
        out = np.empty((data.shape[0], int(model.height), int(model.width)), np.float32)
        if not may_be_invalid and valid.all():
            for b in range(data.shape[0]):
                out[b] = _separable(data[b], ty, tx, r0, c0)
            return out, np.ones(out.shape[1:], bool)
        invalid = ~valid
        for b in range(data.shape[0]):  # one band of float32 at a time on the scene grid
            band = data[b].astype(np.float32)
            band[invalid] = 0.0  # nodata values and NaNs carry no weight
            out[b] = _separable(band, ty, tx, r0, c0)
        frac = _separable(valid.astype(np.float32), ty, tx, r0, c0)
        ok = frac >= VALID_FRACTION
        np.divide(out, frac, out=out, where=ok)
        out[:, ~ok] = 0.0
        return out, ok

    def to_scene(self, probs: np.ndarray, model: Window, core: Window) -> np.ndarray:
        """Probabilities (K, H, W) over ``model`` → float32 (K, h, w) over ``core``."""
        ty = taps(int(core.row_off), int(core.height), 1.0 / self.ratio_y)
        tx = taps(int(core.col_off), int(core.width), 1.0 / self.ratio_x)
        return _separable(probs, ty, tx, int(model.row_off), int(model.col_off))


def resample_plan(
    ground_res: tuple[float, float], gsd_m: float | None, halo: int, stride: int
) -> ResamplePlan | None:
    """The plan for a scene of ``ground_res`` (metres per pixel along x, y) and a model of
    ``gsd_m`` (metres), or None when the model has no GSD or no axis is off by more than
    :data:`RESAMPLE_TOLERANCE`."""
    if not gsd_m:
        return None
    rx, ry = (axis_ratio(g, gsd_m) for g in ground_res)
    if rx == 1.0 and ry == 1.0:
        return None
    return ResamplePlan(rx, ry, halo, stride)


def _core_size(chunk: int, ratio: float) -> int:
    """Scene pixels of a core whose model pixels are about ``chunk``."""
    core = max(1, int(chunk / ratio))
    if core >= _CORE_ROUNDED:
        core -= core % _CORE_MULTIPLE
    return core


@dataclass(frozen=True)
class ResampledGrid(Tiling):
    """Chunk cores of a resampled scene: ``core_width`` x ``core_height`` scene pixels that
    partition it, each chunk's ``padded`` its model window (:meth:`ResamplePlan.model_window`,
    pixels of the virtual model grid, not of the scene). Iterates like a ChunkGrid."""

    width: int
    height: int
    core_width: int
    core_height: int
    plan: ResamplePlan

    @classmethod
    def for_chunk(cls, width: int, height: int, chunk: int, plan: ResamplePlan) -> ResampledGrid:
        """Cores of about ``chunk`` model pixels (the forward pass's size without its halo)."""
        return cls(
            width, height, _core_size(chunk, plan.ratio_x), _core_size(chunk, plan.ratio_y), plan
        )

    @property
    def shape(self) -> tuple[int, int]:
        """Number of chunks as (rows, cols)."""
        return (math.ceil(self.height / self.core_height), math.ceil(self.width / self.core_width))

    def at(self, row: int, col: int) -> Chunk:
        r0, c0 = row * self.core_height, col * self.core_width
        core = Window(
            c0, r0, min(self.core_width, self.width - c0), min(self.core_height, self.height - r0)
        )
        return Chunk(row, col, core, self.plan.model_window(core))

    @property
    def chunk(self) -> int:
        """Core size, scene pixels (the larger side)."""
        return max(self.core_width, self.core_height)

    @property
    def halo(self) -> int:
        """The halo in scene pixels (about), on the axis where it is widest."""
        return math.ceil(self.plan.halo / min(self.plan.ratio_x, self.plan.ratio_y))

    @property
    def model_pixels(self) -> int:
        """Model pixels run through the model for the whole scene (every chunk's model
        window). A model window's columns depend on its chunk's column alone and its rows on
        its row alone, so this sums one row and one column of chunks, not every chunk."""
        rows, cols = self.shape
        width = sum(int(self.at(0, c).padded.width) for c in range(cols))
        height = sum(int(self.at(r, 0).padded.height) for r in range(rows))
        return width * height

    @property
    def redundancy(self) -> float:
        """Model pixels run through the model per model pixel of the scene (>= 1)."""
        scene = self.width * self.plan.ratio_x * self.height * self.plan.ratio_y
        return self.model_pixels / scene
