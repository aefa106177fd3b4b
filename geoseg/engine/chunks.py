"""One chunk task: read its padded window, normalize, run the predictor, trim to the core and
quantize to uint8, at the scene's resolution or resampled to the model's GSD.

Each chunk is one Dask task that reads its own core plus halo straight from the file (cheaper
than shipping halos between tasks), so a task needs only a small picklable description of its
scene, chunk and model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.engine.grid import Chunk
from geoseg.engine.resample import (
    ResamplePlan,
)
from geoseg.io.raster import Scene
from geoseg.io.reader import read_padded
from geoseg.models.bundle import Normalization

if TYPE_CHECKING:
    pass

from geoseg.engine.options import MASK_NODATA
from geoseg.models.predictor import DEVICE_DTYPES, PredictorFactory, get_predictor


@dataclass(frozen=True)
class ChunkPlan:
    """What every chunk task of one scene shares: input bands, normalization, class count,
    and how to resample its chunks to the model's GSD (None: they are read as they are)."""

    scene: Scene
    bands: tuple[int, ...]
    normalization: Normalization
    n_classes: int
    resample: ResamplePlan | None = None


@dataclass
class ChunkResult:
    """uint8 outputs for a chunk's core: probabilities (K, h, w) 0–255, class ids (1, h, w)."""

    chunk: Chunk
    probs: np.ndarray
    mask: np.ndarray
    valid: np.ndarray
    skipped: bool = False


def _core_window(chunk: Chunk) -> tuple[int, int, int, int]:
    """(row, col, height, width) of the chunk's core inside its padded window."""
    tr, tc = chunk.trim
    return tr, tc, int(chunk.core.height), int(chunk.core.width)


def _core(chunk: Chunk, arr: np.ndarray) -> np.ndarray:
    r, c, h, w = _core_window(chunk)
    return arr[..., r : r + h, c : c + w]


def argmax0(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=0)`` as uint8 (first index wins ties), for few classes.

    One pass per class over contiguous planes: several times faster than numpy's argmax along
    the first axis of a (K, h, w) view.
    """
    best = probs[0].copy()
    classes = np.zeros(best.shape, np.uint8)
    for k in range(1, probs.shape[0]):
        better = probs[k] > best
        classes[better] = k
        np.maximum(best, probs[k], out=best)
    return classes


def quantize(probs: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float probabilities (K, h, w) → uint8 0–255 probabilities and uint8 class ids (1, h, w)."""
    return with_nodata(*_quantize(probs), valid)


def _quantize(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 0–255 probabilities (K, h, w) and uint8 class ids (h, w), nodata not applied."""
    classes = argmax0(probs) if probs.shape[0] <= 16 else np.argmax(probs, 0).astype(np.uint8)
    scaled = np.multiply(np.clip(probs, 0.0, 1.0), 255.0, dtype=np.float32)
    return np.rint(scaled, out=scaled).astype(np.uint8), classes


def with_nodata(
    q: np.ndarray, classes: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quantized outputs with nodata applied: class ids (1, h, w) are 255 and probabilities 0
    where ``valid`` is False."""
    if not valid.all():
        classes[~valid] = MASK_NODATA
        q[:, ~valid] = 0
    return q, classes[None]


def predict_chunks(
    plan: ChunkPlan, chunks: Sequence[Chunk], factory: PredictorFactory
) -> list[ChunkResult]:
    """One task: read each chunk with its halo, run the model on those with valid pixels, trim.

    A predictor that quantizes on its device also normalizes there: the raw pixels travel.
    With a resample plan, see :func:`predict_resampled`.
    """
    if plan.resample is not None:
        return predict_resampled(plan, plan.resample, chunks, factory)
    results: list[ChunkResult | None] = [None] * len(chunks)
    todo: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for i, chunk in enumerate(chunks):
        data, valid = read_padded(plan.scene, chunk.padded, plan.bands)
        core_valid = _core(chunk, valid)
        if not core_valid.any():
            results[i] = _skipped(plan, chunk, core_valid)
            continue
        todo.setdefault(data.shape, []).append((i, data, valid, core_valid))
    if todo:
        predictor = get_predictor(factory)
        on_device = getattr(predictor, "quantizes_on_device", False)
        for items in todo.values():
            if on_device and items[0][1].dtype.name in DEVICE_DTYPES:
                batch: Any = predictor.normalized(  # type: ignore[attr-defined]
                    [d for _, d, _, _ in items], [v for _, _, v, _ in items], plan.normalization
                )
            else:
                batch = np.stack([plan.normalization.apply(d, v) for _, d, v, _ in items])
            if on_device:
                windows = [_core_window(chunks[i]) for i, _, _, _ in items]
                outs = predictor.quantized(batch, windows)  # type: ignore[attr-defined]
            else:
                probs = zip(items, predictor(batch), strict=True)
                outs = [_quantize(_core(chunks[i], p)) for (i, _, _, _), p in probs]
            for (i, _, _, core_valid), (q, classes) in zip(items, outs, strict=True):
                q, classes = with_nodata(q, classes, core_valid)
                results[i] = ChunkResult(chunks[i], q, classes, core_valid)
    return [r for r in results if r is not None]


def _skipped(plan: ChunkPlan, chunk: Chunk, core_valid: np.ndarray) -> ChunkResult:
    """The result of a chunk whose core is all nodata: nothing runs through the model."""
    h, w = core_valid.shape
    return ChunkResult(
        chunk,
        np.zeros((plan.n_classes, h, w), np.uint8),
        np.full((1, h, w), MASK_NODATA, np.uint8),
        core_valid,
        skipped=True,
    )


def predict_resampled(
    plan: ChunkPlan, resample: ResamplePlan, chunks: Sequence[Chunk], factory: PredictorFactory
) -> list[ChunkResult]:
    """:func:`predict_chunks` at the model's GSD: per chunk, read the scene pixels that its
    model window needs, resample them onto that window (:meth:`ResamplePlan.to_model`),
    normalize, run the model, bring the probabilities back onto the core's scene pixels
    (:meth:`ResamplePlan.to_scene`), quantize. Nodata comes from the scene's own validity at
    each core pixel. On the host whatever the device: the model's output is resampled."""
    results: list[ChunkResult | None] = [None] * len(chunks)
    todo: dict[tuple[int, ...], list[tuple[int, Any, np.ndarray, np.ndarray]]] = {}
    for i, chunk in enumerate(chunks):
        core, model = chunk.core, chunk.padded  # padded: the model window (ResampledGrid)
        scene = resample.scene_window(model, core)
        data, valid = read_padded(plan.scene, scene, plan.bands)
        r0, c0 = int(core.row_off - scene.row_off), int(core.col_off - scene.col_off)
        core_valid = valid[r0 : r0 + int(core.height), c0 : c0 + int(core.width)]
        if not core_valid.any():
            results[i] = _skipped(plan, chunk, core_valid)
            continue
        x, x_valid = resample.to_model(
            data, valid, scene, model, may_be_invalid=plan.scene.has_mask
        )
        x = plan.normalization.apply(x, x_valid)
        todo.setdefault(x.shape, []).append((i, model, x, np.ascontiguousarray(core_valid)))
    if todo:
        predictor = get_predictor(factory)
        for items in todo.values():
            probs = predictor(np.stack([x for _, _, x, _ in items]))
            for (i, model, _, core_valid), p in zip(items, probs, strict=True):
                back = resample.to_scene(p, model, chunks[i].core)
                q, classes = with_nodata(*_quantize(back), core_valid)
                results[i] = ChunkResult(chunks[i], q, classes, core_valid)
    return [r for r in results if r is not None]
