"""Seeded synthetic scenes of any size: roads and building blocks on a textured background.

Every pixel is a pure function of its global position and the seed, so a scene is written
window by window (memory does not depend on its size) and any window can be regenerated alone.
The aligned label raster uses 0 = background, 1 = building, 2 = road.

Usage: ``python -m geoseg.synthetic OUT.tif --size 8192 --seed 0 --labels LABELS.tif``
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from geoseg.io.raster import atomic_path, gdal_env
from geoseg.runtime import cpu_cores

__all__ = ["BACKGROUND", "BUILDING", "ROAD", "SyntheticScene", "write_scene"]

BACKGROUND, BUILDING, ROAD = 0, 1, 2
CELL = 64  # building grid cell, pixels


def _hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A uint32 hash of integer coordinates: deterministic per-pixel noise."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ (
        b.astype(np.uint64) * np.uint64(0x85EBCA77)
    )
    h ^= np.uint64(seed * 0xC2B2AE3D + 0x27D4EB2F)
    h ^= h >> np.uint64(15)
    h *= np.uint64(0x2C1B3C6D)
    h ^= h >> np.uint64(12)
    return (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)


@dataclass(frozen=True)
class Road:
    """A straight road: the set of pixels within ``width / 2`` of a line a*x + b*y = c (px)."""

    a: float
    b: float
    c: float
    width: float


@dataclass(frozen=True)
class SyntheticScene:
    """A synthetic scene of ``width`` x ``height`` pixels at ``res`` metres in ``crs``."""

    width: int
    height: int
    seed: int = 0
    res: float = 0.3
    crs: str = "EPSG:32633"
    origin: tuple[float, float] = (500_000.0, 5_000_000.0)
    road_spacing: int = 700
    building_density: float = 0.85

    @property
    def transform(self) -> Affine:
        return Affine(self.res, 0, self.origin[0], 0, -self.res, self.origin[1])

    def roads(self) -> list[Road]:
        """Axis-aligned roads every ~``road_spacing`` px plus a few diagonals."""
        rng = np.random.default_rng(self.seed)
        roads: list[Road] = []
        for size, horizontal in ((self.height, True), (self.width, False)):
            pos = float(rng.uniform(0.3, 0.7) * self.road_spacing)
            while pos < size:
                w = float(rng.uniform(8, 16))
                roads.append(Road(0, 1, pos, w) if horizontal else Road(1, 0, pos, w))
                pos += float(rng.uniform(0.7, 1.3) * self.road_spacing)
        n_diag = max(1, (self.width + self.height) // (4 * self.road_spacing))
        for _ in range(n_diag):
            angle = float(rng.uniform(0.2, 1.35))
            a, b = math.sin(angle), math.cos(angle)
            cx, cy = rng.uniform(0, self.width), rng.uniform(0, self.height)
            roads.append(Road(a, b, a * cx + b * cy, float(rng.uniform(10, 14))))
        return roads

    def labels(self, window: Window, roads: list[Road] | None = None) -> np.ndarray:
        """Class ids (h, w) uint8 over ``window``."""
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        out = np.zeros((h, w), np.uint8)
        rows = np.arange(r0, r0 + h)[:, None] + 0.5
        cols = np.arange(c0, c0 + w)[None, :] + 0.5
        for y0, x0, y1, x1 in self._buildings(r0, c0, h, w):
            ys, xs = (
                slice(max(y0 - r0, 0), max(y1 - r0, 0)),
                slice(max(x0 - c0, 0), max(x1 - c0, 0)),
            )
            out[ys, xs] = BUILDING
        for road in roads if roads is not None else self.roads():
            dist = np.abs(road.a * cols + road.b * rows - road.c)
            out[dist <= road.width / 2] = ROAD
        return out

    def _buildings(self, r0: int, c0: int, h: int, w: int) -> Iterator[tuple[int, int, int, int]]:
        """Rectangles (y0, x0, y1, x1) in pixels whose cells are near the window."""
        for cr in range(max(r0 // CELL - 1, 0), (r0 + h) // CELL + 2):
            for cc in range(max(c0 // CELL - 1, 0), (c0 + w) // CELL + 2):
                u = _hash(np.array([cr]), np.array([cc]), self.seed + 1)[0]
                rng = np.random.default_rng(int(u))
                if rng.random() > self.building_density:
                    continue
                bh, bw = rng.integers(14, 58, size=2)
                cy = cr * CELL + int(rng.integers(0, CELL))
                cx = cc * CELL + int(rng.integers(0, CELL))
                y0, x0 = cy - bh // 2, cx - bw // 2
                y1, x1 = min(y0 + bh, self.height), min(x0 + bw, self.width)
                y0, x0 = max(y0, 0), max(x0, 0)
                if y1 > r0 and x1 > c0 and y0 < r0 + h and x0 < c0 + w and y1 > y0 and x1 > x0:
                    yield int(y0), int(x0), int(y1), int(x1)

    def image(self, window: Window, labels: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (3, h, w) over ``window``: textured ground, roofs and asphalt."""
        if labels is None:
            labels = self.labels(window)
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = labels.shape
        yy, xx = np.meshgrid(np.arange(r0, r0 + h), np.arange(c0, c0 + w), indexing="ij")
        noise = (_hash(yy, xx, self.seed) % 41).astype(np.float32) - 20.0
        low = 18.0 * np.sin(yy / 97.0) * np.cos(xx / 131.0)
        ground = np.array([88, 110, 64], np.float32)[:, None, None] + low + noise
        img = ground
        roof_tone = (_hash(yy // CELL, xx // CELL, self.seed + 2) % 90).astype(np.float32)
        roof = np.stack([150 + roof_tone, 120 + roof_tone / 2, 110 + roof_tone / 3]) + noise / 2
        asphalt = np.array([70, 72, 76], np.float32)[:, None, None] + noise / 3
        img = np.where(labels == BUILDING, roof, img)
        img = np.where(labels == ROAD, asphalt, img)
        return np.clip(img, 0, 255).astype(np.uint8)


def write_scene(
    path: str | os.PathLike[str],
    size: int | tuple[int, int],
    seed: int = 0,
    labels: str | os.PathLike[str] | None = None,
    *,
    block: int = 1024,
    res: float = 0.3,
) -> SyntheticScene:
    """Write a synthetic RGB GeoTIFF (and optionally its label raster), window by window."""
    width, height = (size, size) if isinstance(size, int) else size
    scene = SyntheticScene(width, height, seed=seed, res=res)
    roads = scene.roads()
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "crs": scene.crs,
        "transform": scene.transform,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "dtype": "uint8",
        "bigtiff": "if_safer",
        "num_threads": "all_cpus",  # GDAL compresses blocks in parallel
    }
    targets = [(Path(path), 3)] + ([(Path(labels), 1)] if labels is not None else [])
    tmps = [atomic_path(p) for p, _ in targets]
    try:
        with gdal_env():
            dsts = [
                rasterio.open(
                    t, "w", count=n, photometric="rgb" if n == 3 else "minisblack", **profile
                )
                for t, (_, n) in zip(tmps, targets, strict=True)
            ]
            wins = [
                Window(c, r, min(block, width - c), min(block, height - r))
                for r in range(0, height, block)
                for c in range(0, width, block)
            ]

            def make(win: Window) -> tuple[np.ndarray, np.ndarray]:
                lab = scene.labels(win, roads)
                return lab, scene.image(win, lab)

            # windows are made on every core (numpy releases the GIL) and written in order,
            # a few ahead at most
            workers = min(8, cpu_cores())
            try:
                with ThreadPoolExecutor(workers) as pool:
                    for i in range(0, len(wins), 2 * workers):
                        batch = wins[i : i + 2 * workers]
                        for win, (lab, img) in zip(batch, pool.map(make, batch), strict=True):
                            dsts[0].write(img, window=win)
                            if len(dsts) > 1:
                                dsts[1].write(lab[None], window=win)
            finally:
                for d in dsts:
                    d.close()
        for t, (p, _) in zip(tmps, targets, strict=True):
            os.replace(t, p)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    return scene


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="Output RGB GeoTIFF.")
    parser.add_argument("--size", type=int, default=2048, help="Width and height, pixels.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", type=Path, default=None, help="Also write the label raster.")
    parser.add_argument("--res", type=float, default=0.3, help="Pixel size, metres.")
    args = parser.parse_args(argv)
    write_scene(args.out, args.size, args.seed, args.labels, res=args.res)


if __name__ == "__main__":
    main()
