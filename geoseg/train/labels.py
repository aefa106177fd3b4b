"""Training labels: vector layers and label rasters, brought onto a scene's pixel grid.

Vector labels are read once per scene, checked for a CRS that fits their coordinates,
reprojected to the scene's CRS and buffered (lines, points) in metres. Pixels are burned per
chip window, so no full-scene label array is ever made.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.raster import Scene, gdal_env
from geoseg.io.reader import on_grid, reflect_index
from geoseg.train.config import (
    LabelSource,
    RasterLabels,
    SceneConfig,
    VectorLabels,
    parse_color,
)
from geoseg.train.scenes import no_georef_warning

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = [
    "IGNORE",
    "BurnLayer",
    "MaskLayer",
    "RasterLayer",
    "SceneLabels",
    "check_label_crs",
    "classes_present",
    "load_scene_labels",
    "pack_colours",
]

log = logging.getLogger(__name__)

#: Label value for pixels the loss ignores (scene nodata).
IGNORE = 255


@dataclass(frozen=True)
class BurnLayer:
    """Polygons in the scene CRS, burned with one class id.

    With ``contact_id``, pixels whose (2 ``contact_reach`` + 1)² neighbourhood (pixels) holds two
    different polygons are burned with ``contact_id`` instead: shared walls and narrow gaps.
    """

    class_id: int
    geometries: gpd.GeoSeries
    contact_id: int | None = None
    contact_reach: int = 0


@dataclass(frozen=True)
class RasterLayer:
    """A label raster and its value → class id table."""

    path: str
    lookup: dict[int, int]


@dataclass(frozen=True)
class MaskLayer:
    """A mask on the image's own pixel grid (same size; georeferenced or not), read pixel for
    pixel, and its table: a pixel value, or a colour packed as 0xRRGGBB, → class id (IGNORE for
    "not labelled"). Values missing from the table are background."""

    path: str
    lookup: dict[int, int]
    colour: bool
    width: int
    height: int


@dataclass(frozen=True)
class SceneLabels:
    """All label layers of one scene, burned in order (later layers on top).

    ``scene`` is the pixel grid chips are cut from and burned on: the image's own grid, or a
    virtual grid at the model's GSD over the same extent (then ``image`` is the file read and
    resampled). ``labelled`` holds the class ids the scene labels completely; an unburned pixel
    is background or any class not in ``labelled``.
    """

    scene: Scene
    layers: tuple[BurnLayer | RasterLayer | MaskLayer, ...]
    labelled: frozenset[int] = frozenset()
    image: Scene | None = None
    #: pixel values (one per model band) marking pixels outside the image: invalid like nodata
    fill: tuple[float, ...] | None = None

    def burn(self, window: Window) -> np.ndarray:
        """uint8 class ids (h, w) over ``window``, reflected outside the scene like the image."""
        rows = reflect_index(int(window.row_off), int(window.height), self.scene.height)
        cols = reflect_index(int(window.col_off), int(window.width), self.scene.width)
        r0, c0 = int(rows.min()), int(cols.min())
        inner = Window(c0, r0, int(cols.max()) + 1 - c0, int(rows.max()) + 1 - r0)
        out = np.zeros((int(inner.height), int(inner.width)), dtype=np.uint8)
        for layer in self.layers:
            if isinstance(layer, BurnLayer):
                self._burn_vector(layer, inner, out)
            elif isinstance(layer, MaskLayer):
                self._burn_mask(layer, inner, out)
            else:
                self._burn_raster(layer, inner, out)
        return out[np.ix_(rows - r0, cols - c0)]

    def _burn_vector(self, layer: BurnLayer, inner: Window, out: np.ndarray) -> None:
        from rasterio.features import rasterize
        from rasterio.windows import bounds, transform

        reach = layer.contact_reach if layer.contact_id is not None else 0
        grown = Window(
            inner.col_off - reach,
            inner.row_off - reach,
            inner.width + 2 * reach,
            inner.height + 2 * reach,
        )
        box = bounds(grown, self.scene.transform)
        hits = layer.geometries.sindex.query(_box(box), predicate="intersects")
        if len(hits) == 0:
            return
        hits = np.sort(hits)
        shapes = ((g, i + 1) for i, g in zip(hits, layer.geometries.iloc[hits], strict=True))
        burned = rasterize(
            shapes,
            out_shape=(int(grown.height), int(grown.width)),
            transform=transform(grown, self.scene.transform),
            fill=0,
            dtype="int32",
        )
        inside = burned[reach : reach + out.shape[0], reach : reach + out.shape[1]]
        out[inside > 0] = layer.class_id
        if layer.contact_id is not None:
            contact = contact_zone(burned, reach)
            out[contact[reach : reach + out.shape[0], reach : reach + out.shape[1]]] = (
                layer.contact_id
            )

    def _burn_raster(self, layer: RasterLayer, inner: Window, out: np.ndarray) -> None:
        try:
            with (
                gdal_env(),
                rasterio.open(layer.path) as src,
                on_grid(src, self.scene) as vrt,
            ):
                values = vrt.read(1, window=inner)
        except RasterioError as exc:
            raise InputError(f"{layer.path}: cannot read label raster ({exc})") from exc
        for value, class_id in layer.lookup.items():
            out[values == value] = class_id

    def _burn_mask(self, layer: MaskLayer, inner: Window, out: np.ndarray) -> None:
        from rasterio.enums import Resampling

        sx, sy = layer.width / self.scene.width, layer.height / self.scene.height
        src = Window(
            float(inner.col_off) * sx,
            float(inner.row_off) * sy,
            float(inner.width) * sx,
            float(inner.height) * sy,
        )
        bands = [1, 2, 3] if layer.colour else [1]
        try:
            with no_georef_warning(), gdal_env(), rasterio.open(layer.path) as ds:
                raw = ds.read(
                    bands,
                    window=src,
                    out_shape=(len(bands), *out.shape),
                    resampling=Resampling.nearest,
                )
        except RasterioError as exc:
            raise InputError(f"{layer.path}: cannot read label mask ({exc})") from exc
        values = pack_colours(raw) if layer.colour else raw[0].astype(np.int64)
        for value, class_id in layer.lookup.items():
            out[values == value] = class_id


def pack_colours(rgb: np.ndarray) -> np.ndarray:
    """(3, h, w) uint8 colours → (h, w) int64 packed as 0xRRGGBB."""
    r, g, b = (rgb[i].astype(np.int64) for i in range(3))
    return (r << 16) | (g << 8) | b


def classes_present(layer: BurnLayer | RasterLayer | MaskLayer) -> frozenset[int]:
    """The class ids that ``layer`` burns on at least one pixel of its whole file (IGNORE
    left out): a vector layer's class when it has a feature, a raster's classes whose values
    occur in it."""
    if isinstance(layer, BurnLayer):
        if len(layer.geometries) == 0:
            return frozenset()
        contact = {layer.contact_id} if layer.contact_id is not None else set()
        return frozenset({layer.class_id} | (contact if len(layer.geometries) > 1 else set()))
    used = distinct_values(layer.path, isinstance(layer, MaskLayer) and layer.colour)
    return frozenset(layer.lookup[v] for v in used if v in layer.lookup) - {IGNORE}


def contact_zone(ids: np.ndarray, reach: int) -> np.ndarray:
    """Pixels whose (2 reach + 1)² neighbourhood holds two different non-zero ids."""
    from scipy import ndimage

    size = 2 * reach + 1
    big = np.iinfo(ids.dtype).max
    hi = ndimage.maximum_filter(ids, size=size, mode="nearest")
    lo = ndimage.minimum_filter(np.where(ids > 0, ids, big), size=size, mode="nearest")
    return (lo != big) & (hi != lo)


def _box(bounds: tuple[float, float, float, float]) -> object:
    from shapely.geometry import box

    return box(*bounds)


def check_label_crs(gdf: gpd.GeoDataFrame, source: str) -> None:
    """Refuse a layer whose coordinates cannot be in its declared CRS (e.g. metres as degrees)."""
    from pyproj import CRS, Transformer

    if gdf.crs is None:
        raise InputError(f"{source}: has no CRS; save it with one (GeoJSON is always EPSG:4326)")
    if gdf.empty:
        return
    crs = CRS.from_user_input(gdf.crs)
    x0, y0, x1, y1 = (float(v) for v in gdf.total_bounds)
    if crs.is_geographic:
        if not (-180.5 <= x0 <= x1 <= 360 and -90.5 <= y0 <= y1 <= 90.5):
            raise InputError(
                f"{source}: coordinates span x {x0:.6g}..{x1:.6g}, y {y0:.6g}..{y1:.6g}, which "
                f"are not degrees, but the file says its CRS is {crs.to_string()}; the declared "
                "CRS is wrong (projected coordinates saved as GeoJSON?)"
            )
        return
    area = crs.area_of_use
    if area is None:
        return
    lon0, lat0, lon1, lat1 = Transformer.from_crs(
        crs, "EPSG:4326", always_xy=True
    ).transform_bounds(x0, y0, x1, y1)
    margin = 10.0  # degrees: projected data often reaches a little beyond the area of use
    finite = all(math.isfinite(v) for v in (lon0, lat0, lon1, lat1))
    if not finite or (
        lon1 < area.west - margin
        or lon0 > area.east + margin
        or lat1 < area.south - margin
        or lat0 > area.north + margin
    ):
        raise InputError(
            f"{source}: coordinates x {x0:.6g}..{x1:.6g}, y {y0:.6g}..{y1:.6g} lie outside the "
            f"area of use of its CRS {crs.to_string()} ({area.name}); the declared CRS is wrong"
        )


def _read_vector(src: VectorLabels) -> gpd.GeoDataFrame:
    import pyogrio

    try:
        return pyogrio.read_dataframe(src.path, layer=src.layer, columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as exc:
        raise InputError(f"{src.path}: cannot read vector labels ({exc})") from exc


def vector_layer(
    src: VectorLabels, scene: Scene, class_id: int, contact_id: int | None = None
) -> BurnLayer:
    """Read, check, reproject and buffer one vector source for ``scene``."""
    from shapely.geometry import box

    gdf = _read_vector(src)
    check_label_crs(gdf, str(src.path))
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if gdf.empty:
        log.warning(
            "%s: has no features; every pixel of %s it covers is taught as not %s",
            src.path,
            scene.path,
            src.class_name,
        )
    geoms = gdf.geometry
    kinds = set(geoms.geom_type)
    thin = geoms.geom_type.isin(["LineString", "MultiLineString", "Point", "MultiPoint"])
    if thin.any():
        if src.width_m is None:
            raise InputError(
                f"{src.path}: has {', '.join(sorted(kinds))} features; set width_m (metres) "
                "so that lines and points can be buffered into areas"
            )
        metric = geoms.estimate_utm_crs()
        buffered = geoms[thin].to_crs(metric).buffer(src.width_m / 2.0)
        geoms = geoms.copy()
        geoms[thin] = buffered.to_crs(geoms.crs).values
    geoms = geoms.to_crs(scene.crs)
    invalid = ~geoms.is_valid
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = geoms[invalid].make_valid().values
    left, bottom, right, top = rasterio.transform.array_bounds(
        scene.height, scene.width, scene.transform
    )
    if len(geoms) and not geoms.intersects(box(left, bottom, right, top)).any():
        raise InputError(
            f"{src.path}: none of its {len(geoms)} features overlap scene {scene.path} after "
            f"reprojection to {scene.crs.to_string()}; the labels belong to another place or "
            "their CRS is wrong"
        )
    # half the contact width on each side of a wall, in pixels of this grid (at least one)
    reach = max(1, round(src.contact_width_m / scene.gsd_m / 2)) if contact_id is not None else 0
    return BurnLayer(class_id, geoms.reset_index(drop=True), contact_id, reach)


def raster_layer(
    src: RasterLabels, scene: Scene, classes: list[str], image: Scene | None = None
) -> RasterLayer | MaskLayer:
    """Check a label raster against the image it labels (``image``, default ``scene``) and the
    grid chips are burned on (``scene``).

    A mask of the image's own size that has no georeference, or the image's very grid, is
    read pixel for pixel (:class:`MaskLayer`); another georeferenced raster is warped onto the
    grid. A colour table is checked against every colour the mask holds, so that an unmapped
    colour fails before training starts.
    """
    from rasterio.coords import disjoint_bounds
    from rasterio.warp import transform_bounds

    image = image or scene
    path = str(src.path)
    try:
        with no_georef_warning(), gdal_env(), rasterio.open(path) as ds:
            same_size = (ds.width, ds.height) == (image.width, image.height)
            same_grid = same_size and (
                ds.crs is None
                or (ds.crs == image.crs and ds.transform.almost_equals(image.transform))
            )
            if ds.crs is None and not same_grid:
                raise InputError(
                    f"{path}: label mask is {ds.width}x{ds.height} px but its image "
                    f"{image.path} is {image.width}x{image.height} px; a mask without a "
                    "georeference must have its image's size"
                )
            lookup, colour = _table(src, ds, classes)
            if not same_grid:
                b = transform_bounds(ds.crs, scene.crs, *ds.bounds)
    except RasterioError as exc:
        raise InputError(f"{path}: cannot open label raster ({exc})") from exc
    if same_grid:
        return MaskLayer(path, lookup, colour, image.width, image.height)
    if colour:
        raise InputError(
            f"{path}: a colour-coded mask must be on its image's pixel grid (same size); this "
            "one is georeferenced on another grid: warp it onto the image first"
        )
    scene_b = rasterio.transform.array_bounds(scene.height, scene.width, scene.transform)
    sb = (scene_b[0], scene_b[1], scene_b[2], scene_b[3])
    if disjoint_bounds(b, sb):
        raise InputError(f"{path}: label raster does not overlap scene {scene.path}")
    return RasterLayer(path, lookup)


def _table(src: RasterLabels, ds: Any, classes: list[str]) -> tuple[dict[int, int], bool]:
    """(pixel value or packed colour → class id or IGNORE, whether pixels are colours) for an
    open mask; a palette image's indices are translated through its colour map."""
    if src.values is not None:
        lookup = {v: classes.index(n) for v, n in src.values.items()}
        lookup.update({int(v): IGNORE for v in src.unlabelled})
        return lookup, False
    assert src.colors is not None
    table = {parse_color(c): classes.index(n) for c, n in src.colors.items()}
    table.update({parse_color(str(c)): IGNORE for c in src.unlabelled})
    palette = _palette(ds)
    if palette is not None:
        used = distinct_values(str(src.path), colour=False)
        lookup = {}
        for index in used:
            packed = palette.get(index, -1)
            if packed not in table:
                _unmapped(src, ds, packed if packed >= 0 else index, used[index])
            lookup[index] = table[packed]
        return lookup, False
    if ds.count < 3:
        raise InputError(
            f"{src.path}: colors need an RGB mask or a palette image, but it has {ds.count} "
            "band(s) and no colour map; use values for a mask of class values"
        )
    used = distinct_values(str(src.path), colour=True)
    for packed, count in used.items():
        if packed not in table:
            _unmapped(src, ds, packed, count)
    return table, True


def _palette(ds: Any) -> dict[int, int] | None:
    """A one-band palette image's index → packed colour, or None."""
    if ds.count != 1:
        return None
    try:
        cmap = ds.colormap(1)
    except ValueError:  # no colour map
        return None
    return {int(i): (int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2]) for i, c in cmap.items()}


def distinct_values(path: str, colour: bool) -> dict[int, int]:
    """Every pixel value (or colour packed as 0xRRGGBB) of a label file, with its pixel count.

    Kept per file (path, size, modification time): a mask is scanned once, whether its colour
    table or its classes are being checked.
    """
    st = os.stat(path)
    return dict(_distinct(path, st.st_size, st.st_mtime_ns, colour))


@functools.lru_cache(maxsize=256)
def _distinct(path: str, size: int, mtime_ns: int, colour: bool) -> tuple[tuple[int, int], ...]:
    counts: dict[int, int] = {}
    block = 2048
    try:
        with no_georef_warning(), gdal_env(), rasterio.open(path) as ds:
            for r in range(0, ds.height, block):
                win = Window(0, r, ds.width, min(block, ds.height - r))
                raw = ds.read([1, 2, 3] if colour else [1], window=win)
                values = pack_colours(raw) if colour else raw[0].astype(np.int64)
                uniq, n = np.unique(values, return_counts=True)
                for v, c in zip(uniq.tolist(), n.tolist(), strict=True):
                    counts[v] = counts.get(v, 0) + c
    except RasterioError as exc:
        raise InputError(f"{path}: cannot read label raster ({exc})") from exc
    return tuple(sorted(counts.items()))


def _unmapped(src: RasterLabels, ds: Any, value: int, count: int) -> None:
    share = 100.0 * count / max(1, ds.width * ds.height)
    raise InputError(
        f"{src.path}: colour #{value:06X} ({count} px, {share:.2g} % of the mask) is in neither "
        "colors nor unlabelled; map it to a class (background included) or list it as "
        "unlabelled"
    )


def load_scene_labels(
    cfg: SceneConfig,
    scene: Scene,
    classes: list[str],
    grid: Scene | None = None,
    *,
    sources: Sequence[LabelSource] | None = None,
    fill: tuple[float, ...] | None = None,
) -> SceneLabels:
    """All label layers of one configured scene, ready to burn on ``grid`` (default: the
    scene's own pixel grid). ``sources`` overrides the config's label sources (the label files
    of one image of a glob scene); ``fill`` marks pixels outside the image (one value per
    model band)."""
    layers: list[BurnLayer | RasterLayer | MaskLayer] = []
    target = grid or scene
    for src in cfg.labels if sources is None else sources:
        if isinstance(src, VectorLabels):
            contact = classes.index(src.contact_class) if src.contact_class else None
            layers.append(vector_layer(src, target, classes.index(src.class_name), contact))
        else:
            layers.append(raster_layer(src, target, classes, scene))
    labelled = frozenset(classes.index(n) for n in cfg.labelled())
    if len(labelled - {0}) == len(classes) - 1:
        labelled |= {0}  # every foreground class labelled: unburned pixels are background
    return SceneLabels(target, tuple(layers), labelled, scene if grid is not None else None, fill)
