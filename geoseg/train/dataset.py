"""The training data: scenes opened and checked, labels loaded, band statistics computed and
chips planned into training and validation sets (:func:`prepare`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rasterio.windows import Window

from geoseg.engine.plan import check_compatible
from geoseg.engine.resample import check_ratio
from geoseg.errors import ConfigError, InputError
from geoseg.io.raster import Scene
from geoseg.models.bundle import ModelSpec
from geoseg.train.chips import (
    ChipSet,
    band_statistics,
    holdout_window,
    mean_gsd,
    plan_chips,
    virtual_grid,
)
from geoseg.train.config import LabelSource, TrainConfig
from geoseg.train.labels import SceneLabels, classes_present, load_scene_labels
from geoseg.train.scenes import SceneItem, expand_scene, open_image

__all__ = ["Prepared", "prepare"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Chips and the spec with statistics filled in, ready to train on.

    ``chips.labels``, ``holdouts`` and ``weights`` have one entry per image: a configured scene
    that is a glob of images gives one each. ``weights`` are the shares of random training
    chips (0 for an image that is wholly validation).
    """

    spec: ModelSpec
    chips: ChipSet
    holdouts: tuple[Window | None, ...] = ()
    weights: tuple[float, ...] = ()
    #: per image, the index of its configured scene; and the scenes' names
    groups: tuple[int, ...] = ()
    group_names: tuple[str, ...] = ()


def prepare(cfg: TrainConfig) -> Prepared:
    """Open scenes, check labels, compute band statistics and plan the chips.

    With ``model.gsd_m`` set and ``resample`` on, scenes at another ground resolution are cut
    into chips on a virtual grid at the model's GSD (resampled reads, no copy of the scene);
    a scene more than ``max_resample_ratio`` times finer or coarser than it is refused.
    Every label file is checked (sizes, colours) before any chip is read.
    """
    spec = cfg.model
    expanded = [expand_scene(s) for s in cfg.scenes]
    items = [item for group in expanded for item in group]
    groups = tuple(g for g, group in enumerate(expanded) for _ in group)
    scenes = [open_image(item.image, item.config.gsd_m) for item in items]
    for scene in scenes:
        check_compatible(scene, spec)
    gsd = spec.gsd_m if spec.gsd_m else round(mean_gsd(scenes), 4)
    if cfg.resample and spec.gsd_m:
        for item, scene in zip(items, scenes, strict=True):
            check_ratio(
                item.image,
                scene.ground_res,
                gsd,
                cfg.max_resample_ratio,
                f"warp the scene near {gsd:.3g} m first (gdalwarp -tr), train on it as it is "
                "(resample: false), or raise the limit (max_resample_ratio)",
            )
    grids = [
        virtual_grid(scene, gsd) if (cfg.resample and spec.gsd_m) else None for scene in scenes
    ]
    labels = [
        load_scene_labels(
            item.config,
            scene,
            spec.classes,
            grid,
            sources=item.labels,
            fill=_fill(item.config.fill, len(spec.bands), item.image),
        )
        for item, scene, grid in zip(items, scenes, grids, strict=True)
    ]
    _check_classes_present(labels, spec.classes, [item.labels for item in items])
    if spec.normalization.mean:
        norm = spec.normalization
    else:
        norm = band_statistics(
            scenes, spec.bands, spec.normalization.scale, fills=[lab.fill for lab in labels]
        )
    spec = spec.model_copy(update={"normalization": norm, "gsd_m": gsd})
    spec = ModelSpec.model_validate(spec.model_dump())
    c = cfg.chips
    holdouts = [_holdout(item, lab.scene) for item, lab in zip(items, labels, strict=True)]
    chips = plan_chips(
        labels,
        spec.bands,
        size=c.size,
        stride=c.stride,
        block=c.block,
        val_fraction=c.val_fraction,
        seed=cfg.optim.seed,
        holdouts=holdouts,
        train_chips=c.sampling == "grid",
    )
    n_train, n_val = len(chips.split("train")), len(chips.split("val"))
    if c.sampling == "random":
        n_train = c.chips_per_epoch
    if n_train == 0:
        raise InputError("no training chips: every chip is nodata or in a validation region")
    if n_val == 0:
        hint = (
            "the hold-outs hold no chip with valid pixels: make them larger than chips.size "
            f"({c.size} px on the model's grid)"
            if any(s.holdout for s in cfg.scenes)
            else "make chips.block smaller than the scenes so that each scene has several "
            "regions, or set chips.val_fraction above 0"
        )
        raise ConfigError(f"no validation chips: {hint}")
    weights = _weights(items, labels, groups)
    log.info(
        "%d image(s) in %d scene(s): %d training and %d validation chips (%d all-nodata "
        "skipped); normalization %s",
        len(items),
        len(cfg.scenes),
        n_train,
        n_val,
        chips.skipped,
        norm.model_dump(),
    )
    return Prepared(spec, chips, tuple(holdouts), weights, groups, _names(cfg))


def _names(cfg: TrainConfig) -> tuple[str, ...]:
    """The configured scenes' display names, made unique with a suffix where they repeat."""
    names = [s.display_name() for s in cfg.scenes]
    return tuple(n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names))


def _check_classes_present(
    labels: Sequence[SceneLabels],
    classes: Sequence[str],
    sources: Sequence[Sequence[LabelSource]],
) -> None:
    """Refuse a class that scenes claim to label but no label file holds a pixel of: it would
    be taught as background everywhere (an empty label file, a wrong value or colour).
    ``sources`` are each image's label sources, for the message."""
    present: set[int] = set()
    for lab in labels:
        for layer in lab.layers:
            present |= classes_present(layer)
    claimed = {c for lab in labels for c in lab.labelled} - {0}
    for c in sorted(claimed - present):
        files = sorted(
            {
                str(src.path)
                for lab, srcs in zip(labels, sources, strict=True)
                if c in lab.labelled
                for src in srcs
                if classes[c] in src.classes()
            }
        )
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise InputError(
            f"class {classes[c]!r}: no label source ({shown or 'none'}) holds a single feature "
            "or pixel of it, so training would teach it as background everywhere; check the "
            "label files and their values or colours, or leave the class out of the scenes' "
            "classes"
        )


def _fill(fill: list[float] | None, n_bands: int, image: str) -> tuple[float, ...] | None:
    """The scene's fill values, one per model band."""
    if fill is None:
        return None
    if len(fill) == 1:
        return tuple(fill) * n_bands
    if len(fill) != n_bands:
        raise ConfigError(
            f"{image}: fill has {len(fill)} values; give one for all bands or one per model "
            f"band ({n_bands})"
        )
    return tuple(fill)


def _holdout(item: SceneItem, grid: Scene) -> Window | None:
    """The hold-out window of one image on its chip grid: a rectangle, the whole image
    ("all"), an empty window (no hold-out: all training) or None (seeded regions)."""
    if item.holdout is None:
        return None
    if item.holdout == "all":
        return Window(0, 0, grid.width, grid.height)
    if isinstance(item.holdout, str):  # "none"
        return Window(0, 0, 0, 0)
    x, y = item.holdout
    return holdout_window(grid, x, y)


def _weights(
    items: Sequence[SceneItem], labels: Sequence[SceneLabels], groups: Sequence[int]
) -> tuple[float, ...]:
    """Each image's share of random training chips: its scene's weight split among the
    scene's training images (``groups``: each image's configured scene) by area (pixels of
    the chip grid); an image held out whole gets none."""
    area = [
        0.0 if item.holdout == "all" else float(lab.scene.width * lab.scene.height)
        for item, lab in zip(items, labels, strict=True)
    ]
    totals = [0.0] * (max(groups, default=0) + 1)
    for g, a in zip(groups, area, strict=True):
        totals[g] += a
    return tuple(
        item.config.weight * a / totals[g] if a else 0.0
        for item, a, g in zip(items, area, groups, strict=True)
    )
