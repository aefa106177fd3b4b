"""Training chips: spatial train/validation regions, chip windows, band statistics, reading.

Chips go through exactly the inference path: :func:`geoseg.io.reader.read_padded` then the
bundle's :meth:`~geoseg.models.bundle.Normalization.apply`. Each scene is cut into a few large
regions, and every region goes wholly to training or to validation, so no validation chip has
a training neighbour that shares its pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.windows import Window, intersect

from geoseg.engine.resample import RESAMPLE_TOLERANCE
from geoseg.errors import InputError
from geoseg.io.raster import Scene
from geoseg.io.reader import read_padded
from geoseg.models.bundle import ModelSpec, Normalization
from geoseg.train.labels import IGNORE, SceneLabels
from geoseg.train.scenes import no_georef_warning

__all__ = [
    "Chip",
    "holdout_window",
    "random_windows",
    "read_chip",
    "read_resampled",
    "virtual_grid",
    "ChipSet",
    "band_statistics",
    "blocks",
    "chip_windows",
    "load_chip",
    "plan_chips",
    "split_regions",
]

Split = Literal["train", "val"]


def _cuts(length: int, block: int, size: int) -> list[int]:
    """Edges of about ``block``-pixel parts of an axis, each part at least ``size`` pixels."""
    n = max(1, min(round(length / block), length // size))
    return [round(i * length / n) for i in range(n + 1)]


def split_regions(
    width: int, height: int, block: int, size: int, val_fraction: float, seed: int
) -> list[tuple[Window, Split]]:
    """Partition a scene into regions of about ``block`` px; a seeded share goes to validation.

    With two or more regions and ``val_fraction`` > 0, at least one region is validation and at
    least one is training.
    """
    xs, ys = _cuts(width, block, size), _cuts(height, block, size)
    regions = [
        Window(x0, y0, x1 - x0, y1 - y0)
        for y0, y1 in zip(ys, ys[1:], strict=False)
        for x0, x1 in zip(xs, xs[1:], strict=False)
    ]
    n = len(regions)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [(r, "val" if i in val else "train") for i, r in enumerate(regions)]


def _starts(offset: int, length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [offset]
    last = length - size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return [offset + s for s in starts]


def chip_windows(region: Window, size: int, stride: int) -> list[Window]:
    """``size``² windows every ``stride`` px inside ``region``, the last flush with its edge."""
    return [
        Window(c, r, size, size)
        for r in _starts(int(region.row_off), int(region.height), size, stride)
        for c in _starts(int(region.col_off), int(region.width), size, stride)
    ]


@dataclass(frozen=True)
class Chip:
    """One chip: which scene, which window (pixels), and which split."""

    scene: int
    window: Window
    split: Split


@dataclass(frozen=True)
class ChipSet:
    """The chips of a training run, with the per-scene labels needed to burn them."""

    chips: tuple[Chip, ...]
    labels: tuple[SceneLabels, ...]
    skipped: int

    def split(self, name: Split) -> list[Chip]:
        return [c for c in self.chips if c.split == name]


def plan_chips(
    labels: Sequence[SceneLabels],
    bands: Sequence[int],
    *,
    size: int,
    stride: int,
    block: int,
    val_fraction: float,
    seed: int,
    holdouts: Sequence[Window | None] | None = None,
    train_chips: bool = True,
) -> ChipSet:
    """Every chip window of every scene, all-nodata chips dropped (their pixels are read once).

    A scene with a hold-out window gives validation chips inside it, training chips outside
    it (never touching it); the others are split by seeded regions. ``train_chips=False``
    plans validation chips only (training chips are then drawn at random).
    """
    chips: list[Chip] = []
    skipped = 0
    for i, lab in enumerate(labels):
        s = lab.scene
        held = holdouts[i] if holdouts else None
        if held is not None:
            parts: list[tuple[Window, Split]] = [(held, "val")]
            if train_chips:
                parts += [(r, "train") for r in _outside(s, held)]
        else:
            parts = split_regions(s.width, s.height, block, size, val_fraction, seed + i)
        for region, split in parts:
            if split == "train" and not train_chips:
                continue
            if region.width < size or region.height < size:
                continue
            for window in chip_windows(region, size, stride if split == "train" else size):
                _, valid = read_chip(lab, window, bands)
                if valid.any():
                    chips.append(Chip(i, window, split))
                else:
                    skipped += 1
    return ChipSet(tuple(chips), tuple(labels), skipped)


def _outside(scene: Scene, held: Window) -> list[Window]:
    """Up to four rectangles covering ``scene`` minus ``held`` (left, right, top, bottom)."""
    c0, r0 = int(held.col_off), int(held.row_off)
    c1, r1 = c0 + int(held.width), r0 + int(held.height)
    parts = [
        Window(0, 0, c0, scene.height),
        Window(c1, 0, scene.width - c1, scene.height),
        Window(c0, 0, c1 - c0, r0),
        Window(c0, r1, c1 - c0, scene.height - r1),
    ]
    return [p for p in parts if p.width > 0 and p.height > 0]


def load_chip(
    labels: SceneLabels, window: Window, spec: ModelSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(normalized float32 image (bands, h, w), uint8 labels (h, w) with nodata = IGNORE)."""
    data, valid = read_chip(labels, window, spec.bands)
    x = spec.normalization.apply(data, valid)
    y = labels.burn(window)
    y[~valid] = IGNORE
    return x, y


def read_chip(
    labels: SceneLabels, window: Window, bands: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels and validity of ``window`` of the labels' grid: a padded read of the image
    itself, or, on a virtual grid at the model's GSD, a resampled read of the window's extent
    (average when shrinking, bilinear when enlarging). Pixels whose every band equals the
    scene's ``fill`` values are invalid (on a resampled grid: the fill test is made on the
    nearest source pixel, so a mixed pixel at the edge of a fill area is not mistaken)."""
    with no_georef_warning():
        if labels.image is None:
            data, valid = read_padded(labels.scene, window, bands)
            if labels.fill is not None:
                valid &= ~is_fill(data, labels.fill)
            return data, valid
        data, valid = read_resampled(labels.image, labels.scene, window, bands)
        if labels.fill is not None:
            nearest, _ = read_resampled(
                labels.image, labels.scene, window, bands, resampling="nearest"
            )
            valid &= ~is_fill(nearest, labels.fill)
        return data, valid


def is_fill(data: np.ndarray, fill: Sequence[float]) -> np.ndarray:
    """(h, w) bool: pixels of ``data`` (bands, h, w) whose every band equals its fill value."""
    values = np.asarray(fill, dtype=np.float64).reshape(-1, 1, 1)
    return np.all(data == values, axis=0)


def virtual_grid(scene: Scene, gsd_m: float, tolerance: float = RESAMPLE_TOLERANCE) -> Scene | None:
    """``scene``'s extent on a grid of ``gsd_m`` ground metres per pixel, or None when its own
    ground resolution is within ``tolerance`` of it on both axes."""
    import dataclasses

    from rasterio.transform import Affine

    gx, gy = scene.ground_res
    fx, fy = gx / gsd_m, gy / gsd_m  # grid pixels per scene pixel
    if abs(fx - 1) <= tolerance and abs(fy - 1) <= tolerance:
        return None
    width, height = max(1, round(scene.width * fx)), max(1, round(scene.height * fy))
    t = scene.transform
    transform = t @ Affine.scale(scene.width / width, scene.height / height)
    return dataclasses.replace(scene, width=width, height=height, transform=Affine(*transform[:6]))


def read_resampled(
    image: Scene,
    grid: Scene,
    window: Window,
    bands: Sequence[int],
    resampling: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` of ``grid`` (same extent and CRS as ``image``) from ``image``, resampled.

    The window must lie inside the grid. ``resampling`` (a rasterio name such as "nearest")
    overrides the choice of average or bilinear. Pixels count as valid when GDAL's mask,
    resampled by nearest neighbour, says so (and, for floats, when finite).
    """
    import rasterio
    from rasterio.enums import Resampling

    from geoseg.io.raster import gdal_env

    sx = image.width / grid.width  # image pixels per grid pixel
    sy = image.height / grid.height
    c0, r0 = float(window.col_off) * sx, float(window.row_off) * sy
    w, h = float(window.width) * sx, float(window.height) * sy
    src = Window(c0, r0, min(w, image.width - c0), min(h, image.height - r0))
    shape = (int(window.height), int(window.width))
    kind = Resampling.average if sx * sy > 1 else Resampling.bilinear
    if resampling is not None:
        kind = Resampling[resampling]
    try:
        with gdal_env(), rasterio.open(image.path) as ds:
            data = ds.read(list(bands), window=src, out_shape=(len(bands), *shape), resampling=kind)
            mask = ds.dataset_mask(window=src, out_shape=shape, resampling=Resampling.nearest)
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise InputError(f"{image.path}: read failed at window {src} ({exc})") from exc
    valid = mask > 0
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data, valid


def holdout_window(scene: Scene, x: tuple[float, float], y: tuple[float, float]) -> Window:
    """The hold-out rectangle (fractions of the width and height) in pixels of ``scene``."""
    c0, c1 = round(x[0] * scene.width), round(x[1] * scene.width)
    r0, r1 = round(y[0] * scene.height), round(y[1] * scene.height)
    return Window(c0, r0, c1 - c0, r1 - r0)


def random_windows(
    scenes: Sequence[tuple[Scene, Window | None, float]],
    size: int,
    count: int,
    rng: random.Random,
) -> list[tuple[int, Window]]:
    """``count`` (scene index, ``size``² window) pairs, scenes drawn by weight, positions uniform
    among those inside the scene that do not touch its hold-out window."""
    weights = [w for _, _, w in scenes]
    out: list[tuple[int, Window]] = []
    while len(out) < count:
        i = rng.choices(range(len(scenes)), weights)[0]
        scene, held, _ = scenes[i]
        for _ in range(100):
            col = rng.randint(0, max(0, scene.width - size))
            row = rng.randint(0, max(0, scene.height - size))
            win = Window(col, row, size, size)
            if held is None or not intersect(win, held):
                out.append((i, win))
                break
        else:
            raise InputError(
                f"{scene.path}: no room for a {size} px training chip outside its holdout"
            )
    return out


def band_statistics(
    scenes: Sequence[Scene],
    bands: Sequence[int],
    scale: float,
    block: int = 1024,
    fills: Sequence[Sequence[float] | None] | None = None,
) -> Normalization:
    """Per-band mean and std of valid pixels over whole scenes, after dividing by ``scale``;
    ``fills`` (one per scene, or None) marks pixels outside the image, left out like nodata."""
    n = 0
    total = np.zeros(len(bands))
    squares = np.zeros(len(bands))
    for i, scene in enumerate(scenes):
        fill = fills[i] if fills else None
        for window in blocks(scene.width, scene.height, block):
            with no_georef_warning():
                data, valid = read_padded(scene, window, bands)
            if fill is not None:
                valid &= ~is_fill(data, fill)
            values = data[:, valid].astype(np.float64) / scale
            n += values.shape[1]
            total += values.sum(axis=1)
            squares += np.square(values).sum(axis=1)
    if n == 0:
        raise InputError("the training scenes have no valid pixels (all nodata)")
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return Normalization(
        scale=scale,
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(v), 6) for v in std],
    )


def blocks(width: int, height: int, size: int) -> Iterator[Window]:
    """Windows of at most ``size`` x ``size`` pixels tiling a ``width`` x ``height`` grid."""
    for r in range(0, height, size):
        for c in range(0, width, size):
            yield Window(c, r, min(size, width - c), min(size, height - r))


def mean_gsd(scenes: Sequence[Scene]) -> float:
    """Geometric mean ground sample distance of ``scenes``, metres."""
    return float(math.exp(np.mean([math.log(s.gsd_m) for s in scenes])))
