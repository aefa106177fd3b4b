"""Training scenes as users have them: single GeoTIFFs, or folders of chips.

A configured scene whose ``image`` is a glob stands for many images, each one scene with its
own labels: a label path that is a glob too is paired image by image through the parts its
wildcards match (``tile_*/images/*.jpg`` with ``tile_*/masks/*.png`` pairs ``tile_3/images/
a.jpg`` with ``tile_3/masks/a.png``). Images without a georeference (plain PNG or JPEG) are
placed on a local metric grid at the scene's declared ``gsd_m``.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from affine import Affine
from rasterio.crs import CRS

from geoseg.errors import InputError
from geoseg.io.raster import Scene, open_scene
from geoseg.io.remote import glob_regex, is_remote
from geoseg.train.config import HoldOut, LabelSource, SceneConfig

__all__ = [
    "LOCAL_CRS",
    "SceneItem",
    "expand_scene",
    "has_magic",
    "no_georef_warning",
    "open_image",
    "pair_paths",
]

#: The CRS of images without a georeference: a local engineering grid in metres.
LOCAL_CRS = CRS.from_wkt(
    'LOCAL_CS["geoseg local grid (metres)",LOCAL_DATUM["none",32767],UNIT["metre",1],'
    'AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)

#: How far (relative) a georeferenced image's ground resolution may be from a declared gsd_m.
GSD_TOLERANCE = 0.05


@dataclass(frozen=True)
class SceneItem:
    """One image of a configured scene, with its label sources bound to concrete files.

    ``holdout`` is the hold-out rectangle in fractions, ``"all"`` (the whole image is
    validation), ``"none"`` (the whole image is training) or None (seeded regions).
    """

    config: SceneConfig
    image: str
    labels: tuple[LabelSource, ...]
    holdout: tuple[tuple[float, float], tuple[float, float]] | str | None


@contextlib.contextmanager
def no_georef_warning() -> Iterator[None]:
    """Silence rasterio's warning about images without a georeference (expected here)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def has_magic(path: str) -> bool:
    """True when ``path`` holds glob wildcards (``*``, ``?`` or ``[...]``)."""
    return glob.has_magic(path)


def _matches(pattern: str, what: str) -> list[str]:
    """Files matching ``pattern`` (sorted); an error naming the pattern when there are none."""
    found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not found:
        raise InputError(f"{pattern}: the {what} glob matches no file")
    return found


def pair_paths(images: str, labels: str) -> dict[str, str]:
    """Image path → label path, pairing the files of two globs by what their wildcards match.

    Both globs need the same number of wildcards. An image without a label file, or a label
    file without an image, is an error naming the file.
    """
    image_files = _matches(images, "image")
    label_files = _matches(labels, "label")
    ip, lp = glob_regex(images, capture=True), glob_regex(labels, capture=True)
    if ip.groups != lp.groups:
        raise InputError(
            f"{labels}: has {lp.groups} wildcard(s) but the image glob {images} has "
            f"{ip.groups}; they must match part for part to pair images with labels"
        )
    by_key: dict[tuple[str | None, ...], str] = {}
    for path in label_files:
        m = lp.fullmatch(path)
        if m is not None:
            by_key[m.groups()] = path
    pairs: dict[str, str] = {}
    for path in image_files:
        m = ip.fullmatch(path)
        key = m.groups() if m is not None else None
        if key is None or key not in by_key:
            raise InputError(f"{path}: no label file for this image matches {labels}")
        pairs[path] = by_key.pop(key)
    if by_key:
        extra = sorted(by_key.values())
        raise InputError(
            f"{extra[0]}: label file without an image matching {images}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return pairs


def _item_holdout(
    holdout: HoldOut | None, image: str
) -> tuple[tuple[float, float], tuple[float, float]] | str | None:
    if holdout is None:
        return None
    if holdout.images is None:
        return (holdout.x, holdout.y)
    return "all" if PurePath(image).match(holdout.images) else "none"


def expand_scene(cfg: SceneConfig) -> list[SceneItem]:
    """The images of one configured scene, each with its own label files and hold-out."""
    if is_remote(cfg.image) or not has_magic(cfg.image):
        for src in cfg.labels:
            if has_magic(str(src.path)):
                raise InputError(
                    f"{src.path}: a label glob needs an image glob, but the image is {cfg.image}"
                )
        images = [cfg.image]
        bound: dict[str, list[LabelSource]] = {cfg.image: list(cfg.labels)}
    else:
        images = _matches(cfg.image, "image")
        bound = {path: [] for path in images}
        for src in cfg.labels:
            if has_magic(str(src.path)):
                for image, label in pair_paths(cfg.image, str(src.path)).items():
                    bound[image].append(src.model_copy(update={"path": Path(label)}))
            else:
                for image in images:
                    bound[image].append(src)
    items = [
        SceneItem(cfg, image, tuple(bound[image]), _item_holdout(cfg.holdout, image))
        for image in images
    ]
    if cfg.holdout is not None and cfg.holdout.images is not None:
        if not any(i.holdout == "all" for i in items):
            raise InputError(
                f"{cfg.image}: holdout.images {cfg.holdout.images!r} matches none of its "
                f"{len(items)} image(s)"
            )
        if all(i.holdout == "all" for i in items):
            raise InputError(
                f"{cfg.image}: holdout.images {cfg.holdout.images!r} matches every image, so "
                "none is left for training"
            )
    return items


def open_image(path: str, gsd_m: float | None) -> Scene:
    """Open a training image: a georeferenced raster as :func:`geoseg.io.raster.open_scene` does,
    or, with ``gsd_m``, an image without a georeference on a local metric grid (north up, the
    top-left corner at the origin, ``gsd_m`` metres per pixel)."""
    import rasterio
    from rasterio.errors import RasterioError

    from geoseg.io.raster import gdal_env

    if not is_remote(path):
        try:
            with no_georef_warning(), gdal_env(), rasterio.open(path) as src:
                plain = src.crs is None and src.transform.is_identity and not src.gcps[0]
        except (RasterioError, OSError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from exc
        if plain:
            return _local_scene(path, gsd_m)
    scene = open_scene(path)
    if gsd_m is not None and abs(scene.gsd_m / gsd_m - 1) > GSD_TOLERANCE:
        raise InputError(
            f"{path}: is georeferenced at {scene.gsd_m:.3g} m per pixel, but the scene declares "
            f"gsd_m {gsd_m:g}; remove gsd_m (it is for images without a georeference) or fix it"
        )
    return scene


def _local_scene(path: str, gsd_m: float | None) -> Scene:
    """A scene on :data:`LOCAL_CRS` for an image that carries no georeference."""
    import rasterio

    from geoseg.io.raster import describe_ungeoreferenced, gdal_env

    if gsd_m is None:
        raise InputError(
            f"{path}: has no georeference; declare the scene's ground resolution with gsd_m "
            "(metres per pixel)"
        )
    if not math.isfinite(gsd_m) or gsd_m <= 0:
        raise InputError(f"{path}: gsd_m must be a positive number of metres, got {gsd_m}")
    with no_georef_warning(), gdal_env(), rasterio.open(path) as src:
        grid = Affine(gsd_m, 0.0, 0.0, 0.0, -gsd_m, src.height * gsd_m)
        return describe_ungeoreferenced(src, (LOCAL_CRS, grid))
