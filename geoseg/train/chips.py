"""Training chips: spatial train/validation regions, chip windows, band statistics, reading.

Chips go through exactly the inference path: :func:`geoseg.raster.read_padded` then the
bundle's :meth:`~geoseg.model.Normalization.apply`. Each scene is cut into a few large regions,
and every region goes wholly to training or to validation, so no validation chip has a
training neighbour that shares its pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.model import ModelSpec, Normalization
from geoseg.raster import Scene, read_padded
from geoseg.train.labels import IGNORE, SceneLabels

__all__ = [
    "Chip",
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
) -> ChipSet:
    """Every chip window of every scene, all-nodata chips dropped (their pixels are read once)."""
    chips: list[Chip] = []
    skipped = 0
    for i, lab in enumerate(labels):
        s = lab.scene
        for region, split in split_regions(s.width, s.height, block, size, val_fraction, seed + i):
            for window in chip_windows(region, size, stride):
                _, valid = read_padded(s, window, bands)
                if valid.any():
                    chips.append(Chip(i, window, split))
                else:
                    skipped += 1
    return ChipSet(tuple(chips), tuple(labels), skipped)


def load_chip(
    labels: SceneLabels, window: Window, spec: ModelSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(normalized float32 image (bands, h, w), uint8 labels (h, w) with nodata = IGNORE)."""
    data, valid = read_padded(labels.scene, window, spec.bands)
    x = spec.normalization.apply(data, valid)
    y = labels.burn(window)
    y[~valid] = IGNORE
    return x, y


def band_statistics(
    scenes: Sequence[Scene], bands: Sequence[int], scale: float, block: int = 1024
) -> Normalization:
    """Per-band mean and std of valid pixels over whole scenes, after dividing by ``scale``."""
    n = 0
    total = np.zeros(len(bands))
    squares = np.zeros(len(bands))
    for scene in scenes:
        for window in blocks(scene.width, scene.height, block):
            data, valid = read_padded(scene, window, bands)
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
