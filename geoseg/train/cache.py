"""Training scenes decoded once onto their chip grid, then cut into chips by slicing.

Each scene is read in blocks onto the grid chips are cut from (``SceneLabels.scene``: the
image's own grid, or a virtual grid at the model's GSD), with its validity and burned labels,
into three ``.npy`` files opened memory-mapped. Their name is a hash of everything that
shapes them (image file, its size and modification time, the grid, the bands, the label
layers), so a resumed or repeated run reuses them and a changed input gets new ones.

A chip is then a slice of these arrays, reflected outside the scene exactly as
:func:`geoseg.io.reader.read_padded` and :meth:`SceneLabels.burn` reflect, and normalized by the
bundle's normalization. On the image's own grid the chips equal :func:`load_chip`'s. On a
virtual grid every grid pixel has one value, where GDAL's resampled window reads round a few
pixels (about 1 in 10⁴) one grey level differently depending on the window's origin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.reader import reflect_index
from geoseg.io.remote import is_remote
from geoseg.io.tempfiles import sweep, temporary_path
from geoseg.models.bundle import ModelSpec
from geoseg.train.chips import blocks, load_chip, read_chip
from geoseg.train.labels import IGNORE, BurnLayer, SceneLabels

__all__ = ["CACHE_VERSION", "CachedScene", "ChipCache", "cache_key", "cache_scene"]

log = logging.getLogger(__name__)

#: Bumped whenever the cached arrays change meaning; part of every key.
CACHE_VERSION = 1

#: Side of the blocks a scene is read in, grid pixels.
BLOCK = 1024

_PARTS = ("pixels", "valid", "labels")


@dataclass(frozen=True)
class CachedScene:
    """One scene on its chip grid: raw pixels (bands, h, w) in the file's dtype, validity
    (h, w) bool and labels (h, w) uint8 with IGNORE where invalid; memory-mapped arrays."""

    pixels: np.ndarray
    valid: np.ndarray
    labels: np.ndarray

    def window(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw pixels, valid, labels) over ``window`` (pixels), reflected outside the scene."""
        h, w = self.valid.shape
        r0, c0 = int(window.row_off), int(window.col_off)
        rh, cw = int(window.height), int(window.width)
        if min(r0, c0) >= 0 and r0 + rh <= h and c0 + cw <= w:
            rows, cols = slice(r0, r0 + rh), slice(c0, c0 + cw)
            return (
                np.array(self.pixels[:, rows, cols]),
                np.array(self.valid[rows, cols]),
                np.array(self.labels[rows, cols]),
            )
        ri, ci = np.ix_(reflect_index(r0, rh, h), reflect_index(c0, cw, w))
        return self.pixels[:, ri, ci], self.valid[ri, ci], self.labels[ri, ci]


def _file_stamp(path: str) -> list[object]:
    """Path, size (bytes) and modification time (ns) of a local file; a URL as it is."""
    if is_remote(path):
        return [path]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


_PLAIN = (str, int, float, bool, type(None))


def _plain(value: object) -> object | None:
    """``value`` as JSON-able plain data (scalars, and tuples, lists and dicts of them), or
    None when it holds anything else."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple | list | frozenset):
        items = [_plain(v) for v in value]
        bad = any(i is None and v is not None for i, v in zip(items, value, strict=True))
        return None if bad else items
    if isinstance(value, dict):
        return _plain(sorted((str(k), v) for k, v in value.items()))
    return None


def _layer_key(layer: object) -> list[object] | None:
    """What shapes one label layer's pixels; None for a layer that cannot be keyed.

    Vector layers are keyed by their geometries (WKB); raster and mask layers by their fields,
    a ``path`` field by the file's size and modification time too.
    """
    if isinstance(layer, BurnLayer):
        wkb = hashlib.sha256()
        for g in layer.geometries.to_wkb():
            wkb.update(g)
        return ["vector", layer.class_id, layer.contact_id, layer.contact_reach, wkb.hexdigest()]
    if not dataclasses.is_dataclass(layer):
        return None
    key: list[object] = [type(layer).__name__]
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        plain = _file_stamp(value) if f.name == "path" else _plain(value)
        if plain is None and value is not None:
            return None
        key.append([f.name, plain])
    return key


def _labels_key(labels: SceneLabels) -> list[object] | None:
    """The scene's own settings that shape pixels or validity (such as fill values), besides
    its grid, image and layers; None when one cannot be keyed."""
    key: list[object] = []
    for f in dataclasses.fields(labels):
        if f.name in ("scene", "layers", "image", "labelled"):
            continue
        value = getattr(labels, f.name)
        plain = _plain(value)
        if plain is None and value is not None:
            return None
        key.append([f.name, plain])
    return key


def cache_key(labels: SceneLabels, bands: Sequence[int]) -> str | None:
    """Hash of the image file, the grid, the bands and the label layers of a scene; None when
    something cannot be keyed (that scene is then read chip by chip)."""
    layers = [_layer_key(layer) for layer in labels.layers]
    own = _labels_key(labels)
    if own is None or any(k is None for k in layers):
        return None
    grid = labels.scene
    image = labels.image or labels.scene
    parts = {
        "version": CACHE_VERSION,
        "image": _file_stamp(image.path),
        "grid": [grid.width, grid.height, list(grid.transform)[:6], grid.crs.to_wkt()],
        "resampled": labels.image is not None,
        "bands": list(bands),
        "layers": layers,
        "labels": own,
    }
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _open(root: Path, key: str) -> CachedScene | None:
    paths = [root / f"{key}.{part}.npy" for part in _PARTS]
    if not all(p.exists() for p in paths):
        return None
    try:
        arrays = [np.load(p, mmap_mode="r") for p in paths]
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable chip cache, rebuilding it (%s)", paths[0], exc)
        return None
    return CachedScene(*arrays)


def cache_scene(labels: SceneLabels, bands: Sequence[int], root: Path, key: str) -> CachedScene:
    """Open the cached arrays of ``key`` under ``root``, writing them first when missing.

    The scene is read in :data:`BLOCK`-pixel blocks (no full-size float array); each file is
    written under a temporary name and renamed when complete.
    """
    found = _open(root, key)
    if found is not None:
        return found
    grid = labels.scene
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    first, _ = read_chip(labels, Window(0, 0, 1, 1), bands)
    shapes = {
        "pixels": ((len(bands), grid.height, grid.width), first.dtype),
        "valid": ((grid.height, grid.width), np.dtype(bool)),
        "labels": ((grid.height, grid.width), np.dtype(np.uint8)),
    }
    temps = {part: temporary_path(root / f"{key}.{part}.npy") for part in _PARTS}
    try:
        out = {
            part: np.lib.format.open_memmap(temps[part], mode="w+", dtype=dt, shape=shape)
            for part, (shape, dt) in shapes.items()
        }
        for win in blocks(grid.width, grid.height, BLOCK):
            rows = slice(int(win.row_off), int(win.row_off + win.height))
            cols = slice(int(win.col_off), int(win.col_off + win.width))
            data, valid = read_chip(labels, win, bands)
            y = labels.burn(win)
            y[~valid] = IGNORE
            out["pixels"][:, rows, cols] = data
            out["valid"][rows, cols] = valid
            out["labels"][rows, cols] = y
        for part in _PARTS:
            out[part].flush()
        del out
        for part in _PARTS:
            os.replace(temps[part], root / f"{key}.{part}.npy")
    except OSError as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise InputError(f"{root}: cannot write the chip cache of {grid.path} ({exc})") from exc
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    log.info(
        "cached %s on its %d x %d px chip grid in %.1f s (%s)",
        grid.path,
        grid.width,
        grid.height,
        time.perf_counter() - t0,
        root,
    )
    opened = _open(root, key)
    if opened is None:
        raise InputError(f"{root}: chip cache of {grid.path} vanished after writing it")
    return opened


class ChipCache:
    """Chips of a run's scenes from cached arrays (see module); a scene without a cache entry
    (``root`` None, or an unkeyable label layer) is read chip by chip as before."""

    def __init__(
        self, labels: Sequence[SceneLabels], spec: ModelSpec, root: Path | None = None
    ) -> None:
        self.labels = tuple(labels)
        self.spec = spec
        self.scenes: list[CachedScene | None] = [None] * len(self.labels)
        if root is None:
            return
        root.mkdir(parents=True, exist_ok=True)
        sweep(root)
        keys = [cache_key(lab, spec.bands) for lab in self.labels]
        for i, (lab, key) in enumerate(zip(self.labels, keys, strict=True)):
            if key is None:
                log.info("%s: not cached (label layers of another kind)", lab.scene.path)
                continue
            self.scenes[i] = cache_scene(lab, spec.bands, root, key)
        _prune(root, {k for k in keys if k})

    def load(self, scene: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(normalized float32 image (bands, h, w), uint8 labels (h, w), IGNORE on nodata) of
        ``window`` (pixels of the scene's chip grid), as :func:`load_chip` gives them."""
        cached = self.scenes[scene]
        if cached is None:
            return load_chip(self.labels[scene], window, self.spec)
        data, valid, y = cached.window(window)
        return self.spec.normalization.apply(data, valid), y


def _prune(root: Path, keep: set[str]) -> None:
    """Remove cached arrays of scenes this run does not use (older inputs, other grids)."""
    for p in root.glob("*.npy"):
        if p.name.split(".", 1)[0] not in keep:
            log.info("removing stale chip cache %s", p)
            p.unlink(missing_ok=True)
