"""Open a ``geoseg predict`` output and read one class of it window by window."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.errors import InputError, first_line
from geoseg.io.raster import gdal_env, ground_resolution
from geoseg.io.remote import exists, gdal_path, is_remote, redact, remote_name

if TYPE_CHECKING:
    from geoseg.io.tiles import StoredTiles

__all__ = [
    "ClassWindow",
    "Prediction",
    "describe_prediction",
    "open_prediction",
    "read_class",
    "read_valleys",
    "with_context",
]


#: The tag of a prediction raster that holds the vectorizer settings chosen for its model.
VECTORIZE_TAG = "GEOSEG_VECTORIZE"


@dataclass(frozen=True)
class Prediction:
    """Metadata of a ``<stem>.probs.tif`` or ``<stem>.mask.tif``; holds no pixels.

    ``probs`` is the probability raster used for thresholds and confidences (None when only a
    class mask is available); ``mask`` is the class-id raster when that was the input.
    ``staged``: where a raster still being written is read from instead (its tiles in the
    writer's scratch file, by path; see :class:`geoseg.io.tiles.StoredTiles`).
    ``model_settings``: the vectorizer settings chosen for the model that made it (its
    ``GEOSEG_VECTORIZE`` tag; see :class:`geoseg.models.bundle.VectorizeDefaults`).
    """

    path: str
    stem: str
    kind: str
    classes: tuple[str, ...]
    width: int
    height: int
    crs_wkt: str
    transform: Affine
    geographic: bool
    metric: bool
    scene: str
    model: str
    probs: str | None
    mask: str | None
    staged: dict[str, StoredTiles] = field(default_factory=dict, compare=False, repr=False)
    model_settings: dict[str, float] = field(default_factory=dict)

    def class_index(self, name: str) -> int:
        """Index of class ``name`` (its id in the mask, its band - 1 in the probabilities)."""
        return self.classes.index(name)

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the raster in its CRS (x, y)."""
        x, y = self.transform @ (self.width / 2, self.height / 2)
        return (x, y)


def _classes(src: rasterio.io.DatasetReader, p: Path | str) -> tuple[str, ...]:
    raw = src.tags().get("GEOSEG_CLASSES")
    if raw:
        try:
            names = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: GEOSEG_CLASSES tag is not JSON ({exc})") from exc
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return tuple(names)
        raise InputError(f"{p}: GEOSEG_CLASSES tag must be a JSON list of names, got {raw!r}")
    if src.count > 1 and all(src.descriptions):
        return tuple(str(d) for d in src.descriptions)
    raise InputError(
        f"{p}: has no class names (GEOSEG_CLASSES tag); vectorize the outputs of geoseg predict"
    )


def open_prediction(path: str | os.PathLike[str]) -> Prediction:
    """Validate a prediction raster (a file, or a URL or object, see :mod:`geoseg.io.remote`) and
    describe it; raise :class:`InputError` if unusable."""
    remote = is_remote(path)
    name = os.fspath(path)
    p: Path | str = redact(name) if remote else Path(path)
    if not remote and not Path(path).is_file():
        raise InputError(f"{p}: no such file")
    file_name = remote_name(name) if remote else Path(path).name
    try:
        with gdal_env(), rasterio.open(gdal_path(name)) as src:
            t = src.transform
            classes = _classes(src, p)
            is_probs = file_name.endswith(".probs.tif") or (
                src.count == len(classes) and src.count > 1
            )
            if not is_probs and src.count != 1:
                raise InputError(f"{p}: a class mask must have one band, found {src.count}")
            if is_probs and src.count != len(classes):
                raise InputError(
                    f"{p}: has {src.count} bands but {len(classes)} class names {list(classes)}"
                )
            tags = src.tags()
            crs = src.crs
            width, height = src.width, src.height
    except (RasterioError, CPLE_BaseError) as exc:
        raise InputError(f"{p}: not a readable raster ({first_line(exc)})") from exc
    stem = prediction_stem(file_name)
    probs: str | None = name if is_probs else None
    if not is_probs:
        sibling = name[: len(name) - len(file_name)] + f"{stem}.probs.tif"
        if exists(sibling) if remote else Path(sibling).is_file():
            with gdal_env(), rasterio.open(gdal_path(sibling)) as s:
                if (s.width, s.height, s.count) == (width, height, len(classes)):
                    probs = sibling
    return describe_prediction(
        name, classes, width, height, crs, t, tags, probs, file_name=file_name
    )


def describe_prediction(
    path: str,
    classes: tuple[str, ...],
    width: int,
    height: int,
    crs: Any,
    transform: Affine,
    tags: dict[str, str],
    probs: str | None,
    *,
    file_name: str | None = None,
) -> Prediction:
    """A :class:`Prediction` of the raster ``path`` (the probabilities when it is ``probs``,
    else a class mask) from its metadata: for :func:`open_prediction`, and for a prediction
    vectorized while it is written. Raises :class:`InputError` if it cannot be vectorized."""
    shown = redact(path) if is_remote(path) else path
    if crs is None:
        raise InputError(
            f"{shown}: has no CRS, so its vectors could not be georeferenced; "
            "assign one first (for example: gdal_edit.py -a_srs EPSG:32614 FILE)"
        )
    t = transform
    if t.b != 0 or t.d != 0 or t.e > 0:
        raise InputError(f"{shown}: needs a north-up geotransform, got {tuple(t)[:6]}")
    file_name = file_name or Path(path).name
    is_probs = probs == path
    linear = crs.linear_units_factor[1] if crs.is_projected else math.nan
    return Prediction(
        path=path,
        stem=prediction_stem(file_name),
        kind="probs" if is_probs else "mask",
        classes=classes,
        width=width,
        height=height,
        crs_wkt=crs.to_wkt(),
        transform=t,
        geographic=bool(crs.is_geographic),
        metric=_metric(crs, t, width, height, linear),
        scene=tags.get("GEOSEG_SCENE", file_name),
        model=tags.get("GEOSEG_MODEL", ""),
        probs=probs,
        mask=None if is_probs else path,
        model_settings=_model_settings(shown, tags),
    )


def _model_settings(shown: str, tags: dict[str, str]) -> dict[str, float]:
    """The ``GEOSEG_VECTORIZE`` tag of a prediction, checked; {} when it has none."""
    from pydantic import ValidationError

    from geoseg.errors import describe_validation_error
    from geoseg.models.bundle import VectorizeDefaults

    raw = tags.get(VECTORIZE_TAG)
    if raw is None:
        return {}
    try:
        return VectorizeDefaults.model_validate_json(raw).settings()
    except ValidationError as exc:
        raise InputError(
            f"{shown}: its {VECTORIZE_TAG} tag (the model's vectorizer settings) is not "
            f"valid: {describe_validation_error(exc)}"
        ) from exc


@dataclass
class ClassWindow:
    """One class over a window: foreground (h, w) bool and confidence (h, w) uint8 0–255."""

    fg: np.ndarray
    conf: np.ndarray | None


def inside(window: Window, width: int, height: int) -> tuple[int, int, int, int]:
    """(row, column, end row, end column) of the part of ``window`` inside the raster; empty
    (end <= start) when none is."""
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    return max(r0, 0), max(c0, 0), min(r0 + h, height), min(c0 + w, width)


def _read_band(pred: Prediction, path: str, band: int, window: Window) -> np.ndarray:
    """Read ``band`` of ``path`` over ``window``, padding with zeros outside the raster."""
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    rr0, cc0, rr1, cc1 = inside(window, pred.width, pred.height)
    out = np.zeros((h, w), dtype=np.uint8)
    if rr1 <= rr0 or cc1 <= cc0:
        return out
    try:
        staged = pred.staged.get(path)
        if staged is not None:
            data = staged.read(band, rr0, cc0, rr1, cc1)
        else:
            with gdal_env(), rasterio.open(gdal_path(path)) as src:
                data = src.read(band, window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
    except (RasterioError, CPLE_BaseError, OSError) as exc:  # OSError: a staged tile
        shown = redact(path)
        raise InputError(f"{shown}: read failed at window {window} ({first_line(exc)})") from exc
    out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = data
    return out


def read_class(
    pred: Prediction,
    name: str,
    window: Window,
    threshold: float,
    also: tuple[str, ...] = (),
    cut: tuple[str, float] | None = None,
) -> ClassWindow:
    """Foreground and confidence of class ``name`` over ``window`` (zeros outside the raster).

    Pixels of the classes ``also`` count as foreground too (the confidence stays ``name``'s);
    with ``cut`` = (class, p), pixels where that class has probability >= p are not.
    """
    k = pred.class_index(name)
    extra = [pred.class_index(a) for a in also]
    conf = None
    if pred.probs is not None:
        conf = _read_band(pred, pred.probs, k + 1, window)
    if pred.mask is not None:
        ids = _read_band(pred, pred.mask, 1, window)
        fg = ids == k
        for e in extra:
            fg |= ids == e
        if k == 0:
            fg &= _inside(window, pred.width, pred.height)
    else:
        assert conf is not None and pred.probs is not None
        total = conf.astype(np.float32)
        for e in extra:
            total += _read_band(pred, pred.probs, e + 1, window)
        fg = total >= np.float32(threshold * 255.0)
    if cut is not None and pred.probs is not None:
        c = pred.class_index(cut[0])
        p = _read_band(pred, pred.probs, c + 1, window)
        fg &= p < np.float32(cut[1] * 255.0)
    return ClassWindow(fg, conf)


def with_context(core: Window, halo: int) -> Window:
    """``core`` grown by ``halo`` pixels on every side: the window a task reads when its
    result needs that much context (a skeleton, a valley cut's closing)."""
    return Window(
        core.col_off - halo, core.row_off - halo, core.width + 2 * halo, core.height + 2 * halo
    )


def read_valleys(
    pred: Prediction, name: str, window: Window, size: int, depth: float
) -> np.ndarray:
    """Pixels of ``window`` where class ``name``'s probability lies at least ``depth`` below
    its grey-level closing over a ``size`` × ``size`` square (``size`` odd): thin dips, such as
    the lines along shared walls between roofs.

    The closing (a dilation, then an erosion) reaches ``size - 1`` pixels, so that much
    context is read around the window (zeros outside the raster): a pixel's result is the same
    whichever window holds it, and tiles stay seamless.
    """
    from scipy import ndimage

    assert pred.probs is not None and size % 2 == 1
    r = size - 1
    h, w = int(window.height), int(window.width)
    p = _read_band(pred, pred.probs, pred.class_index(name) + 1, with_context(window, r))
    closed = ndimage.grey_closing(p, size=(size, size))
    inner = (slice(r, r + h), slice(r, r + w))
    dip = closed[inner].astype(np.int16) - p[inner].astype(np.int16)
    return dip >= np.float32(depth * 255.0)


def _inside(window: Window, width: int, height: int) -> np.ndarray:
    rows = np.arange(int(window.row_off), int(window.row_off) + int(window.height))
    cols = np.arange(int(window.col_off), int(window.col_off) + int(window.width))
    return ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]


#: Largest departure of a projection's scale from 1 (at the raster's centre) for which its own
#: metres are used as ground metres; beyond it a local transverse Mercator is used.
SCALE_TOLERANCE = 0.005


def _metric(crs: Any, t: Affine, width: int, height: int, linear: float) -> bool:
    """Whether the CRS's units are ground metres at the raster: projected, in metres, and with a
    scale factor within :data:`SCALE_TOLERANCE` of 1 (UTM: 0.9996; Web Mercator at 27.6° N:
    1.13, so not)."""
    if not crs.is_projected or linear != 1.0:
        return False
    gx, gy = ground_resolution(crs, t, width, height)
    return abs(gx / abs(t.a) - 1) <= SCALE_TOLERANCE and abs(gy / abs(t.e) - 1) <= SCALE_TOLERANCE


def prediction_stem(path: Path | str) -> str:
    """The scene stem of ``<stem>.probs.tif`` or ``<stem>.mask.tif`` (else the file's stem);
    ``path`` may be a file name."""
    name = path.name if isinstance(path, Path) else path
    for suffix in (".probs.tif", ".mask.tif"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
