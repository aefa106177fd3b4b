"""The engine: per-chunk read → normalize → forward → trim, and the Dask graph for one scene.

Each chunk is one Dask task that reads its own core plus halo straight from the file (cheaper
than shipping halos between tasks), so a task needs only a small picklable description of its
scene, chunk and model. Results stream back to the single writer on the client as they finish,
with a bounded number of tasks in flight: no full-scene array exists anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from geoseg.backends import BACKENDS, TTA, tta_transforms
from geoseg.errors import ConfigError, InputError, ModelError, call_portably
from geoseg.grid import Chunk, ChunkGrid
from geoseg.model import Bundle, ModelSpec, Normalization, load_module
from geoseg.raster import Scene, check_writable
from geoseg.reader import read_padded
from geoseg.remote import redact
from geoseg.resample import (
    MAX_RESAMPLE_RATIO,
    ResampledGrid,
    ResamplePlan,
    check_ratio,
    resample_bytes,
    resample_plan,
)
from geoseg.runtime import cpu_cores
from geoseg.writer import BLOCK, COMPRESSIONS, DEFAULT_COMPRESS, RasterWriter

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from geoseg.vectorize.options import VectorizeOptions, VectorizeOutputs
    from geoseg.vectorize.source import Prediction

__all__ = [
    "BundleFactory",
    "DEVICE_DTYPES",
    "TTA",
    "ChunkPlan",
    "ChunkResult",
    "PredictOptions",
    "PredictOutputs",
    "Predictor",
    "PredictorFactory",
    "QUIET_LOCAL_CLUSTER",
    "QUIET_WORKERS",
    "TorchPredictor",
    "bundle_factory",
    "check_compatible",
    "check_resolution",
    "get_predictor",
    "open_client",
    "predict_chunks",
    "predict_resampled",
    "predict_scene",
    "resolve_device",
    "resolve_precision",
    "scene_grid",
    "tta_transforms",
    "warm_up",
]

log = logging.getLogger(__name__)

MASK_NODATA = 255

#: The rasters a prediction can write: class probabilities (uint8 per class) and class mask.
RASTERS = ("probs", "mask")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class Predictor(Protocol):
    """Maps a normalized float32 batch (N, bands, H, W) to class probabilities (N, K, H, W)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class PredictorFactory(Protocol):
    """A small, picklable, hashable recipe that builds a :class:`Predictor` on a worker."""

    def build(self) -> Predictor: ...

    def __hash__(self) -> int: ...


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 instructions (AVX512-BF16 or AMX), where autocast pays."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: Device nodes of a GPU driver torch can use (NVIDIA's, AMD's ROCm, WSL's): without any of
#: them no CUDA device can be visible.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """Whether this machine has a GPU driver's device node (:data:`GPU_DEVICE_NODES`). When it
    has none, 'auto' is the CPU without importing torch (500 MiB of resident memory that the
    OpenVINO backend does not need)."""
    return any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a CUDA device is visible, else 'cpu'."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but no CUDA device is available")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """'auto' → what the device runs fast: bf16 (or fp16) on CUDA, bf16 on CPUs that have it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


class TorchPredictor:
    """Runs a torch module on a device with optional autocast, returning softmax probabilities.

    ``tta`` (among :data:`TTA`): average the probabilities of the module's passes on the
    flipped and rotated windows, each brought back onto the window (see :meth:`_forward`).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: str = "cpu",
        precision: str = "fp32",
        activation: str | None = "softmax",
        tta: str = "none",
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.precision = precision
        self.activation = activation
        self.transforms = tta_transforms(tta)
        self.memory_format = torch.channels_last
        self.module = module.eval().to(self.device).to(memory_format=self.memory_format)
        #: quantize on the device (see :meth:`quantized`): a quarter of the bytes come back
        self.quantizes_on_device = self.device.type == "cuda"
        # one pass at a time on a GPU; on a CPU passes may run side by side (each thread's
        # ops use torch's intra-op threads, see :func:`torch_threads`)
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.device.type == "cuda" else contextlib.nullcontext()
        )
        self._norms: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}

    def _forward(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 probabilities (N, K, H, W), left on the device. ``batch``: normalized float32
        pixels, as an array or as a tensor already on the device.

        With test-time augmentation, one pass per transform, one after another (the memory of
        one pass plus a float32 sum), each pass's probabilities transformed back, summed in the
        order of :func:`tta_transforms` and divided by their number. A window's sides are
        multiples of the encoder's stride, so a flipped or turned window keeps the pooling grid
        of the whole scene flipped or turned alike: tiles stay as seamless as without it."""
        import torch

        if isinstance(batch, torch.Tensor):
            x = batch
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
        if len(self.transforms) == 1:
            return self._pass(x)
        with torch.inference_mode():
            (k, flip), *rest = self.transforms
            # a copy: without an activation, a module's output may be its input's memory
            total = _untransform(self._pass(_transform(x, k, flip)), k, flip).clone()
            for k, flip in rest:
                total.add_(_untransform(self._pass(_transform(x, k, flip)), k, flip))
            return total.div_(len(self.transforms))

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the module on float32 pixels ``x`` (N, bands, H, W): float32
        probabilities (N, K, H, W), on the device."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        x = x.contiguous(memory_format=self.memory_format)
        with (
            self._lock,
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ),
        ):
            y = self.module(x)
        with torch.inference_mode():
            y = y.float()
            if self.activation == "softmax":
                y = torch.softmax(y, dim=1)
        return y

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch).cpu().numpy()

    def warm(self, shape: tuple[int, ...]) -> None:
        """One pass on zeros of ``shape`` (N, bands, H, W) on the device: CUDA loads its kernels
        and picks its convolution algorithms for that shape now, not in the first chunk."""
        import torch

        with torch.inference_mode():
            self._forward(torch.zeros(shape, device=self.device)).cpu()

    def quantized(
        self, batch: np.ndarray | torch.Tensor, windows: Sequence[tuple[int, int, int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch item, :func:`quantize` of its window (row, col, height, width), on the device.

        Returns uint8 probabilities (K, h, w) 0–255 and uint8 class ids (h, w), equal to what
        :func:`quantize` makes of the same float probabilities (nodata is not applied here).
        """
        import torch

        y = self._forward(batch)
        out = []
        with torch.inference_mode():
            for item, (r, c, h, w) in zip(y, windows, strict=True):
                p = item[:, r : r + h, c : c + w]
                classes = p.argmax(0).to(torch.uint8)  # the first index wins ties, as argmax0
                q = p.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
                out.append((q.cpu().numpy(), classes.cpu().numpy()))
        return out

    def _constants(
        self, normalization: Normalization, bands: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, mean, std) as float32 tensors on the device, made once per normalization (a
        copy from pageable memory would wait for the device's queue)."""
        import torch

        key = (normalization.scale, tuple(normalization.mean), tuple(normalization.std), bands)
        got = self._norms.get(key)
        if got is None:
            mean, std = normalization.arrays(bands)
            scale = np.array(normalization.scale, np.float32)
            got = tuple(torch.from_numpy(a).to(self.device) for a in (scale, mean, std))
            self._norms[key] = got
        return got  # type: ignore[return-value]

    def normalized(
        self, raw: Sequence[np.ndarray], valid: Sequence[np.ndarray], normalization: Normalization
    ) -> torch.Tensor:
        """:meth:`Normalization.apply` of each raw (bands, H, W) array, stacked, on the device.

        The raw pixels travel instead of float32 ones (a quarter of the bytes for uint8), and
        the same float32 operations run in the same order, so the result is the same.
        """
        import torch

        cuda = self.device.type == "cuda"
        stacked = torch.empty((len(raw), *raw[0].shape), dtype=getattr(torch, raw[0].dtype.name))
        if cuda:
            stacked = stacked.pin_memory()
        np.stack(raw, out=stacked.numpy())
        invalid = None
        if not all(v.all() for v in valid):
            invalid = torch.from_numpy(~np.stack(valid))
            invalid = invalid.pin_memory().to(self.device, non_blocking=True) if cuda else invalid
        scale, mean, std = self._constants(normalization, raw[0].shape[0])
        with torch.inference_mode():
            x = stacked.to(self.device, non_blocking=True).to(torch.float32)
            # tensors, not Python numbers: a scalar divisor becomes a multiplication by its
            # reciprocal on CUDA, which rounds differently from numpy's division
            x.div_(scale).sub_(mean).div_(std)
            if invalid is not None:
                x.masked_fill_(invalid[:, None], 0.0)
        return x


def _transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``x`` (..., H, W) flipped left to right when ``flip``, then turned ``k`` quarter turns
    counter-clockwise: (..., W, H) for odd ``k``."""
    import torch

    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, (-2, -1)) if k else x


def _untransform(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`_transform`: ``y`` back onto the untransformed window."""
    import torch

    if k:
        y = torch.rot90(y, -k, (-2, -1))
    return y.flip(-1) if flip else y


#: Pixel types that :meth:`TorchPredictor.normalized` takes as they are (torch has each).
DEVICE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "int32", "float32", "float64"})


@dataclass(frozen=True)
class BundleFactory:
    """Builds a predictor from a bundle directory: a :class:`TorchPredictor`, or with
    ``backend`` openvino a :class:`geoseg.backends.OpenVINOPredictor` (the network converted
    once per machine and cached); cached once per worker process."""

    path: str
    sha256: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    #: test-time augmentation, among :data:`TTA`
    tta: str = "none"
    #: the inference backend, resolved (see :func:`geoseg.backends.resolve_backend`)
    backend: str = "torch"
    #: passes that may run side by side in one process (worker threads; OpenVINO's streams)
    streams: int = 1

    def build(self) -> Predictor:
        from geoseg.model import load_bundle

        bundle = load_bundle(self.path)
        if bundle.sha256 != self.sha256:
            raise ModelError(
                f"{self.path}: weights changed while running (hash {bundle.sha256[:12]})"
            )
        if self.backend == "openvino":
            from geoseg.backends import openvino_predictor

            try:
                return openvino_predictor(
                    bundle,
                    partial(load_module, bundle),
                    self.precision,
                    self.tta,
                    self.threads,
                    self.streams,
                )
            except ModelError as exc:
                raise ModelError(f"{self.path}: {exc}") from exc
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return TorchPredictor(
            load_module(bundle), self.device, self.precision, bundle.spec.activation, self.tta
        )


def bundle_factory(bundle: Bundle, options: PredictOptions) -> BundleFactory:
    """The predictor recipe that :func:`predict_scene` uses for ``bundle`` by default."""
    from geoseg.backends import resolve_backend

    device = resolve_device(options.device)
    return BundleFactory(
        str(bundle.path.resolve()),
        bundle.sha256,
        device,
        resolve_precision(options.precision, device),
        torch_threads(options, device),
        options.tta,
        resolve_backend(options.backend, device),
        local_threads(options) if not options.scheduler else 1,
    )


_PREDICTORS: dict[Hashable, Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()
LOAD_COUNT: dict[Hashable, int] = {}


def get_predictor(factory: PredictorFactory) -> Predictor:
    """The predictor for ``factory`` in this process, built on first use only."""
    with _PREDICTORS_LOCK:
        pred = _PREDICTORS.get(factory)
        if pred is None:
            pred = factory.build()
            _PREDICTORS[factory] = pred
            LOAD_COUNT[factory] = LOAD_COUNT.get(factory, 0) + 1
        return pred


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


def check_compatible(scene: Scene, spec: ModelSpec, *, resample: bool = False) -> list[str]:
    """Raise if ``scene`` cannot feed the model; return warnings for doubtful fits.

    ``resample``: whether the caller reads the scene at the model's GSD (then a different
    ground sample distance is no reason for a warning)."""
    name = redact(scene.path)
    usable = [b for b in range(1, scene.count + 1) if b != scene.alpha_band]
    missing = [b for b in spec.bands if b > scene.count]
    if missing:
        raise InputError(
            f"{name}: has {scene.count} band(s) but the model reads bands "
            f"{spec.bands} ({len(spec.bands)} bands)"
        )
    if scene.alpha_band in spec.bands:
        raise InputError(f"{name}: model band {scene.alpha_band} is this scene's alpha band")
    if scene.dtype != spec.dtype:
        raise InputError(
            f"{name}: pixel type is {scene.dtype} but the model expects {spec.dtype} "
            f"(its normalization assumes {spec.dtype} values); rescale the scene or use a "
            "model trained on this data type"
        )
    notes = []
    if len(usable) > len(spec.bands):
        notes.append(f"{name}: has {len(usable)} image bands; the model reads bands {spec.bands}")
    if spec.gsd_m and not resample:
        ratio = scene.gsd_m / spec.gsd_m
        if ratio > 2 or ratio < 0.5:
            notes.append(
                f"{name}: ground sample distance {scene.gsd_m:.3g} m is {ratio:.2g}x the "
                f"model's {spec.gsd_m:.3g} m; expect poor results (resample the scene, or "
                "let geoseg read it at the model's GSD: --resample)"
            )
    return notes


@dataclass(frozen=True)
class PredictOptions:
    """How to run: sizes in model pixels; ``None`` takes the bundle's recommendation.

    ``resample``: read each chunk at the model's GSD when the scene's ground resolution differs
    from it by more than :data:`geoseg.resample.RESAMPLE_TOLERANCE` (see
    :mod:`geoseg.resample`). ``max_resample_ratio``: refuse scenes whose ground resolution
    differs from the model's GSD by more than this many times either way (see
    :func:`check_resolution`).
    """

    chunk: int | None = None
    halo: int | None = None
    batch_size: int = 1
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    max_in_flight: int | None = None
    resample: bool = True
    max_resample_ratio: float = MAX_RESAMPLE_RATIO
    #: which rasters to write, among :data:`RASTERS`
    rasters: tuple[str, ...] = RASTERS
    #: the COGs' codec, among :data:`geoseg.writer.COMPRESSIONS`
    compress: str = DEFAULT_COMPRESS
    #: test-time augmentation, among :data:`TTA`: the average of each window's model
    #: probabilities over its flips (4 passes) or its flips and quarter turns (8 passes)
    tta: str = "none"
    #: the inference backend, among :data:`geoseg.backends.BACKENDS`: auto takes OpenVINO on a
    #: CPU when it is installed, else torch (``geoseg predict`` and pipelines default to auto)
    backend: str = "torch"

    def __post_init__(self) -> None:
        tta_transforms(self.tta)  # raises ConfigError on an unknown mode
        if not (math.isfinite(self.max_resample_ratio) and self.max_resample_ratio >= 1):
            raise ConfigError(
                f"max resample ratio must be a finite number >= 1, got {self.max_resample_ratio}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        unknown = sorted(set(self.rasters) - set(RASTERS))
        if unknown or not self.rasters:
            raise ConfigError(
                f"rasters must be one or more of {', '.join(RASTERS)}, got {list(self.rasters)}"
            )
        if self.compress not in COMPRESSIONS:
            raise ConfigError(
                f"compress must be one of {', '.join(COMPRESSIONS)}, got {self.compress!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass
class PredictOutputs:
    """What one scene produced."""

    scene: str
    probs: Path | None  # None when not asked for
    mask: Path | None
    chunks: int
    skipped: int
    redundancy: float
    warnings: list[str] = field(default_factory=list)
    #: model pixels per scene pixel (x, y) when the scene was read at the model's GSD
    resampled: tuple[float, float] | None = None
    #: the vector layers, when asked for (``vectorize``)
    vectors: VectorizeOutputs | None = None

    def rasters(self) -> dict[str, Path]:
        """The rasters written, by name among :data:`RASTERS`."""
        return {n: p for n, p in (("probs", self.probs), ("mask", self.mask)) if p is not None}


def local_threads(options: PredictOptions) -> int:
    """Worker threads of the local cluster.

    On CUDA, half the cores (2 to 8), so that reading, normalizing and handing back chunks
    keep up with the GPU while one thread at a time runs the model on it. On a CPU, one: its
    forward pass uses every core. ``--workers 2`` runs two passes side by side instead, the
    cores shared between them (see :func:`torch_threads`): faster (a pass spread over every
    core stalls in each parallel region whenever something else takes a core; on 2 cores two
    single-threaded passes side by side take 8–13 % less time even bare), at the price of a
    second pass's activations and a heap that fragments as the passes interleave (peak RSS
    1.4–1.6 GiB, growing with the scene, against a flat 1.0 GiB with one worker, for a
    resnet18 at 512 px chunks).
    """
    if options.workers:
        return options.workers
    if resolve_device(options.device).startswith("cuda"):
        return max(2, min(8, cpu_cores() // 2))
    return 1


def torch_threads(options: PredictOptions, device: str) -> int | None:
    """Torch threads per forward pass: ``--threads``; else, with several worker threads on a
    local CPU cluster, torch's default shared among them; else torch's default."""
    if options.threads:
        return options.threads
    workers = local_threads(options)
    if device == "cpu" and not options.scheduler and workers > 1:
        import torch

        return max(1, torch.get_num_threads() // workers)
    return None


#: Dask settings for every local cluster geoseg starts. The worker's statistical profiler
#: samples every thread's stack 100 times a second on the event loop, under the GIL; beside an
#: in-process forward pass that cost 5–18 % of its time on a 2-core CPU.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False}

#: More for :func:`open_client`'s in-process cluster, whose scheduler and worker share an event
#: loop thread with the forward pass: each wake-up of that loop takes the GIL and a core from
#: it. With the profiler off, the other periodic callbacks (a tick every 20 ms on both, a
#: worker memory check every 100 ms, system monitors every 500 ms, work stealing, the active
#: memory manager) still cost 5 % of every pass (+31 ± 6 ms on a 580 ms pass, passes alternated
#: with and without a cluster); at the settings below, 3 % (+17 ± 6 ms). None of them has work
#: here: a single worker holds every task, tasks are few and long, their memory bounded.
QUIET_LOCAL_CLUSTER = {
    **QUIET_WORKERS,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
    "distributed.scheduler.active-memory-manager.start": False,
}


#: The share of model pixels beyond the scene's that the default chunk on a GPU aims for:
#: ((chunk + 2 halo) / chunk)² at most this.
MAX_REDUNDANCY = 1.15

#: A forward pass's peak memory, as a multiple of :func:`forward_bytes_lower_bound` (the
#: encoder's features and the decoder's stages come on top of that bound).
FORWARD_PEAK_FACTOR = 8

#: The share of a GPU's memory that the default chunk's forward pass may take.
GPU_MEMORY_SHARE = 0.5


#: The memory a whole CPU run may take (the README's promise), per process.
CPU_MEMORY_BUDGET = 1.5 * 2**30

#: What a CPU run with OpenVINO holds besides its chunks' forward passes and arrays: the
#: imports (OpenVINO, GDAL, Dask, NumPy: 260 MiB measured), GDAL's block cache (64 MiB), the
#: writer's tiles and its readers (a margin above the 300 MiB measured).
CPU_BASE_BYTES = 400 * 2**20

#: The peak of an OpenVINO forward pass plus the chunk's arrays around it (input, float
#: probabilities, uint8 outputs), as a multiple of :func:`forward_bytes_lower_bound`, by
#: precision. Measured on the shipped model (EfficientNet-Lite0 U-Net, 108 bytes per window
#: pixel as that bound), end to end: 1.72x in bf16 (peak RSS 777 MiB at a 1600² window,
#: 1130 MiB at 2112², 1461 MiB at 2624²); fp32 keeps 1.33x bf16's activations. With a margin.
OPENVINO_PEAK_FACTOR = {"fp32": 2.3, "bf16": 1.9, "fp16": 1.9}


def default_chunk(
    spec: ModelSpec,
    halo: int,
    batch: int,
    memory_bytes: int,
    longest_side: int,
    *,
    factor: float = FORWARD_PEAK_FACTOR,
    share: float = GPU_MEMORY_SHARE,
    base_bytes: int = 0,
    augmented: bool = False,
) -> int:
    """The chunk for a forward pass with ``memory_bytes`` of device memory: the smallest
    multiple of the output tile (512 px, and of the encoder's stride) from the bundle's chunk
    up whose redundant compute is at most :data:`MAX_REDUNDANCY`, unless its forward pass
    (``factor`` times :func:`forward_bytes_lower_bound`; ``augmented``: with test-time
    augmentation) and ``base_bytes`` would take more than ``share`` of the memory: then the
    largest that fits (the redundancy stays above the target), and never below the bundle's
    chunk. No larger than the scene needs (``longest_side``). On a GPU with a 32 px halo this
    is 1024 px (1.13x), with 64 px 2048 px (1.13x), with 288 px 8192 px (1.15x) where memory
    allows."""
    base = spec.chunk
    if redundancy(base, halo) <= MAX_REDUNDANCY or base >= longest_side:
        return base
    step = math.lcm(BLOCK, spec.stride)
    budget = share * memory_bytes - base_bytes
    best, chunk = base, -(-base // step) * step
    while True:
        side = chunk + 2 * halo
        need = factor * forward_bytes_lower_bound(spec, batch, side, side, augmented=augmented)
        if need > budget:
            return best
        best = chunk
        if redundancy(chunk, halo) <= MAX_REDUNDANCY or chunk >= longest_side:
            return best
        chunk += step


def gpu_memory_bytes(device: str) -> int | None:
    """Total memory of the CUDA ``device`` (not the free memory, which changes as the model
    loads: every call for a scene must choose the same chunk); None when unknown."""
    import torch

    try:
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    except (RuntimeError, AssertionError, ValueError):
        return None


def chunk_for(spec: ModelSpec, halo: int, options: PredictOptions, scene: Scene) -> int:
    """The chunk core size: the options', else :func:`default_chunk` on a local GPU (from its
    memory) and with OpenVINO on this CPU (from :data:`CPU_MEMORY_BUDGET`: OpenVINO's time per
    pixel does not grow with the window, so a larger chunk only saves halo pixels), else the
    bundle's. torch on a CPU keeps the bundle's chunk: its imports alone take 700 MiB, so a
    smaller chunk barely lowers its peak (1651 MiB at 832 px against 1726 MiB at 1024 px with
    the shipped model), and its time per pixel grows with the window. The choice depends on
    the bundle, the options and the scene's size only (never on free memory), so a run is
    repeatable."""
    if options.chunk:
        return options.chunk
    longest = max(scene.width, scene.height)
    device = resolve_device(options.device)
    if device == "cpu":  # the budget is per process, on this machine or a cluster's worker
        from geoseg.backends import resolve_backend

        precision = resolve_precision(options.precision, device)
        augmented = options.tta != "none"
        if resolve_backend(options.backend, device) != "openvino":
            return spec.chunk
        factor = OPENVINO_PEAK_FACTOR[precision]
        return default_chunk(
            spec,
            halo,
            options.batch_size,
            int(CPU_MEMORY_BUDGET),
            longest,
            factor=factor,
            share=1.0,
            base_bytes=CPU_BASE_BYTES,
            augmented=augmented,
        )
    if options.scheduler:  # the workers' GPUs are not this machine's
        return spec.chunk
    memory = gpu_memory_bytes(device)
    if memory is None:
        return spec.chunk
    return default_chunk(spec, halo, options.batch_size, memory, longest)


def check_resolution(scene: Scene, spec: ModelSpec, options: PredictOptions) -> None:
    """Refuse, in one line, a scene that would be read at the model's GSD (``options.resample``)
    with a ground resolution more than ``options.max_resample_ratio`` times finer or coarser
    than it, or one without a usable pixel size: the work and memory of a resampled scene grow
    with that ratio, whatever the chunk."""
    if not (options.resample and spec.gsd_m):
        return
    check_ratio(
        redact(str(scene.path)),
        scene.ground_res,
        spec.gsd_m,
        options.max_resample_ratio,
        f"warp the scene near {spec.gsd_m:.3g} m first (gdalwarp -tr), predict it as it is "
        "(--no-resample, pipelines: predict.resample: false), or raise the limit "
        "(--max-resample-ratio, pipelines: predict.max_resample_ratio)",
    )


def scene_grid(scene: Scene, spec: ModelSpec, options: PredictOptions) -> ChunkGrid | ResampledGrid:
    """The chunk grid of ``scene``: the options' chunk and halo, else the bundle's halo and
    :func:`chunk_for` (model pixels). A :class:`ResampledGrid` when the scene is read at the
    model's GSD (after :func:`check_resolution`)."""
    check_resolution(scene, spec, options)
    halo = spec.halo if options.halo is None else options.halo
    grid = ChunkGrid(
        scene.width,
        scene.height,
        chunk_for(spec, halo, options, scene),
        halo,
        multiple=spec.stride,
    )
    if not (options.resample and spec.gsd_m):
        return grid
    plan = resample_plan(scene.ground_res, spec.gsd_m, grid.halo, grid.multiple)
    if plan is None:
        return grid
    return ResampledGrid.for_chunk(scene.width, scene.height, grid.chunk, plan)


def warm_up(
    bundle: Bundle, options: PredictOptions, scene: Scene, *, on_cpu: bool = False
) -> threading.Thread | None:
    """On CUDA, build the predictor that :func:`predict_scene` will use and run one pass at the
    scene's chunk shape, in a thread of this process, while the caller starts its local
    cluster and opens its outputs. Only for an in-process cluster (no ``scheduler``), whose
    workers then find the predictor built. Errors are left to the workers, which build it
    again and report them. Returns the started thread, or None.

    On a CPU (``on_cpu``: build only) it gains a fraction of a second of a run that takes
    minutes, and the weights would live in another thread's malloc arena: not by default."""
    device = resolve_device(options.device)
    if options.scheduler or not (device.startswith("cuda") or on_cpu):
        return None
    factory = bundle_factory(bundle, options)
    spec = bundle.spec
    padded = scene_grid(scene, spec, options).at(0, 0).padded
    shape = (options.batch_size, len(spec.bands), int(padded.height), int(padded.width))

    def work() -> None:
        try:
            predictor = get_predictor(factory)
            if factory.device.startswith("cuda") and isinstance(predictor, TorchPredictor):
                predictor.warm(shape)
        except Exception:  # noqa: S110  (reported by the worker that builds it again)
            log.debug("warm-up failed", exc_info=True)

    thread = threading.Thread(target=work, name="geoseg-warm-up", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def open_client(options: PredictOptions) -> Iterator[Client]:
    """A Dask client: the given scheduler, or an in-process local cluster of worker threads."""
    import dask
    from distributed import Client, LocalCluster

    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach Dask scheduler {options.scheduler}: {exc}") from exc
        with client:
            yield client
        return
    with dask.config.set(QUIET_LOCAL_CLUSTER):  # read when the cluster starts, not later
        cluster = LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=local_threads(options),
            dashboard_address=":0",  # any free port: no clash with a running cluster
            silence_logs=logging.WARNING,
        )
    with cluster, Client(cluster) as client:
        yield client


#: Source bytes that one stripe of chunk rows may span (see :meth:`ChunkGrid.in_stripes`): a
#: fraction of the reader's cache of decoded blocks (:data:`geoseg.reader.BLOCK_CACHE_BYTES`),
#: so that blocks shared by neighbouring chunk rows are decoded once.
STRIPE_BYTES = 24 << 20


def chunk_order(grid: ChunkGrid | ResampledGrid, scene: Scene, n_bands: int) -> Iterator[Chunk]:
    """The order to run chunks in: stripes that keep shared source blocks cached when the
    scene is tiled (for strip-organised files every chunk row needs whole strips anyway)."""
    bh, bw = scene.block_shape
    if bw >= scene.width:
        return iter(grid)
    rows_px = grid.chunk + 2 * grid.halo + bh
    item = np.dtype(scene.dtype).itemsize
    cols = max(1, STRIPE_BYTES // (rows_px * grid.chunk * n_bands * item))
    return grid.in_stripes(cols)


def _batches(chunks: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def stream_tasks(
    client: Client,
    fn: Callable[..., Any],
    args: Iterator[tuple[Any, ...]],
    max_in_flight: int,
    name: str,
) -> Iterator[Any]:
    """Submit ``fn(*a)`` for each ``a``, at most ``max_in_flight`` at once; yield results as done.

    On error the remaining tasks are cancelled and the task's exception is re-raised.
    """
    from distributed import as_completed

    pending = as_completed()
    futures = set()

    def submit_next() -> bool:
        a = next(args, None)
        if a is None:
            return False
        key = f"{name}-{uuid.uuid4().hex}"
        fut = client.submit(call_portably, fn, *a, key=key, pure=False, retries=1)
        futures.add(fut)
        pending.add(fut)
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    try:
        for fut in pending:
            result = fut.result()
            futures.discard(fut)
            fut.release()
            yield result
            submit_next()
    finally:
        if futures:
            client.cancel(list(futures))


def output_paths(scene: Scene, out_dir: Path) -> tuple[Path, Path]:
    """(probabilities, class mask) output paths for ``scene`` in ``out_dir``."""
    return out_dir / f"{scene.stem}.probs.tif", out_dir / f"{scene.stem}.mask.tif"


#: Extensions of the vector layers' formats (see :data:`geoseg.vectorize.options.FORMATS`).
_VECTOR_EXTENSIONS = ("geojson", "gpkg", "fgb", "parquet")


def stale_outputs(out_dir: Path, stem: str, written: Sequence[Path]) -> list[Path]:
    """Outputs of scene ``stem`` in ``out_dir`` that an earlier run wrote and this one did not
    (``written``, every file this run wrote for the scene): its probabilities or class mask
    when geoseg's tags show that geoseg wrote them, its quicklook, and its vector layers
    ``<stem>.<layer>.<format>`` (change layers included; a layer name without a dot, so that
    another scene's files, ``<stem>.x.<layer>.geojson``, never match). They describe another
    prediction than the files beside them."""
    keep = {os.path.abspath(p) for p in written}
    found: list[Path] = []
    for kind in ("probs", "mask"):
        path = out_dir / f"{stem}.{kind}.tif"
        if os.path.abspath(path) not in keep and path.is_file() and _written_by_geoseg(path):
            found.append(path)
    layer = re.compile(
        re.escape(stem) + r"\.(?:quicklook\.png|[^./\\]+\.(?:" + "|".join(_VECTOR_EXTENSIONS) + "))"
    )
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
            name, full = entry.name, os.path.abspath(entry.path)
            if layer.fullmatch(name) and entry.is_file() and full not in keep:
                found.append(Path(full))
    return sorted(found)


def _written_by_geoseg(path: Path) -> bool:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return "GEOSEG_MODEL" in src.tags()
    except rasterio.errors.RasterioError:
        return False


def remove_stale_outputs(
    out_dir: Path, stem: str, written: Sequence[Path], scene: str
) -> list[Path]:
    """Delete :func:`stale_outputs` of scene ``scene`` (outputs named ``stem``) once every
    output of this run (``written``) is in place, with a warning naming them; returns those
    removed. So a folder never holds a mask of one model beside the layers of another.
    (:func:`predict_scene` leaves this to its caller, which knows every file it writes.)"""
    stale = stale_outputs(out_dir, stem, written)
    removed = []
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("%s: cannot remove the earlier run's %s (%s)", redact(scene), path, exc)
            continue
        removed.append(path)
    if removed:
        log.warning(
            "%s: removed %d output(s) of an earlier run that this one did not write: %s",
            redact(scene),
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def output_tags(bundle: Bundle, scene: Scene, tta: str = "none") -> dict[str, str]:
    """Metadata stored in every output raster, read back by ``geoseg vectorize``; the
    test-time augmentation mode (``GEOSEG_TTA``) when there was one."""
    tags = {
        "GEOSEG_CLASSES": json.dumps(bundle.spec.classes),
        "GEOSEG_MODEL": bundle.ident,
        "GEOSEG_MODEL_NAME": bundle.spec.name,
        "GEOSEG_MODEL_SHA256": bundle.sha256,
        "GEOSEG_SCENE": os.path.basename(redact(scene.path)),
    }
    if tta != "none":
        tags["GEOSEG_TTA"] = tta
    return tags


def predict_scene(
    scene: Scene,
    bundle: Bundle,
    out_dir: str | os.PathLike[str],
    options: PredictOptions,
    client: Client,
    *,
    factory: PredictorFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_tags: dict[str, str] | None = None,
    vectorize: VectorizeOptions | None = None,
    vector_client: Client | None = None,
) -> PredictOutputs:
    """Predict one scene into ``<stem>.probs.tif`` and ``<stem>.mask.tif`` COGs in ``out_dir``.

    ``extra_tags`` are stored in the outputs beside :func:`output_tags` (e.g. the scene's STAC
    item id).

    ``vectorize``: also write the vector layers, made from the probabilities when they are
    written, else from the class mask, while the scene is predicted (see
    :class:`geoseg.vectorize.run.StreamingVectorizer`); their tasks run on ``vector_client``
    (default: ``client``; give one of worker processes when ``client`` runs threads).

    ``factory`` overrides how workers build the predictor (default: the bundle on the options'
    device and precision, with their test-time augmentation; the outputs' ``GEOSEG_TTA`` tag
    names the options' mode whatever the factory). ``progress(done, total)`` is called after
    each chunk is written.
    """
    spec = bundle.spec
    notes = check_compatible(scene, spec, resample=options.resample)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    grid = scene_grid(scene, spec, options)
    chunk = getattr(grid, "chunk", spec.chunk)
    resample = grid.plan if isinstance(grid, ResampledGrid) else None
    host = 0
    if resample is not None:
        first = grid.at(0, 0)
        scene_window = resample.scene_window(first.padded, first.core)
        host = resample_bytes(
            scene_window,
            first.padded,
            len(spec.bands),
            np.dtype(scene.dtype).itemsize,
            chunks=options.batch_size,
        )
    if not options.scheduler:
        check_working_set(
            spec,
            grid.at(0, 0).padded,
            options.batch_size,
            options.device,
            options.tta,
            host_bytes=host,
        )
    if not options.chunk and chunk != spec.chunk:
        log.info(
            "%s: %d px chunks for the %d px halo on %s (redundant compute %.2fx; the "
            "bundle's %d px: %.2fx)",
            redact(scene.path),
            chunk,
            grid.halo,
            resolve_device(options.device),
            grid.redundancy,
            spec.chunk,
            redundancy(spec.chunk, grid.halo),
        )
    if isinstance(grid, ResampledGrid):
        gx, gy = scene.ground_res
        log.info(
            "%s: read at the model's %.3g m (ground pixels %.3g x %.3g m; %.3g x %.3g model "
            "pixels per scene pixel): %d chunks, %.3g model pixels",
            redact(scene.path),
            spec.gsd_m,
            gx,
            gy,
            grid.plan.ratio_x,
            grid.plan.ratio_y,
            len(grid),
            float(grid.model_pixels),
        )
    device = resolve_device(options.device)
    if factory is None:
        factory = bundle_factory(bundle, options)
    out = Path(out_dir)
    check_writable(out)
    probs_path, mask_path = output_paths(scene, out)
    plan = ChunkPlan(scene, tuple(spec.bands), spec.normalization, len(spec.classes), resample)
    n_workers = max(1, sum(client.nthreads().values()))
    max_in_flight = options.max_in_flight or 2 * n_workers
    total, done, skipped = len(grid), 0, 0
    writer = RasterWriter(
        scene,
        {**output_tags(bundle, scene, options.tta), **(extra_tags or {})},
        write_in_background(options, device),
        compress=options.compress,
    )
    want_probs, want_mask = "probs" in options.rasters, "mask" in options.rasters
    if want_probs:
        writer.add(
            "probs",
            probs_path,
            len(spec.classes),
            band_names=spec.classes,
            resampling="average",
            with_mask=scene.has_mask,  # else every pixel is valid: no mask to write or to read
        )
    if want_mask:
        writer.add("mask", mask_path, 1, nodata=MASK_NODATA, band_names=["class_id"])
    order = chunk_order(grid, scene, len(spec.bands))
    vec = None
    if vectorize is not None:
        from geoseg.vectorize.run import StreamingVectorizer

        chunks = list(order)
        order = iter(chunks)
        source = "probs" if want_probs else "mask"
        pred = _prediction(scene, bundle, probs_path if want_probs else mask_path, want_probs)
        vec = StreamingVectorizer(
            pred,
            source,
            out,
            vectorize,
            vector_client or client,
            [c.core for c in chunks],
            not options.scheduler,  # on this machine: the model and its feed come first
        )
    tasks = ((plan, batch, factory) for batch in _batches(order, options.batch_size))
    name = f"geoseg-predict-{scene.stem}"
    try:
        with writer:
            for results in stream_tasks(client, predict_chunks, tasks, max_in_flight, name):
                for r in results:
                    if want_probs:
                        writer.write("probs", r.chunk.core, r.probs, r.valid)
                    if want_mask:
                        writer.write("mask", r.chunk.core, r.mask)
                    done += 1
                    skipped += r.skipped
                if vec is not None:
                    vec.poll(writer)
                if progress is not None:
                    progress(done, total)
            if vec is not None:
                left = vec.total - vec.finished
                log.info("%s: finishing %d vectorize chunks", redact(scene.path), left)
                vec.finish(writer, _every(VECTOR_PROGRESS_S, partial(_vector_progress, scene)))
        vectors = None if vec is None else vec.publish()
    except BaseException:
        if vec is not None:
            vec.abort()
        raise
    log.info("%s: %d chunks (%d all-nodata) → %s", redact(scene.path), total, skipped, out)
    return PredictOutputs(
        scene.path,
        probs_path if want_probs else None,
        mask_path if want_mask else None,
        total,
        skipped,
        grid.redundancy,
        notes,
        None if resample is None else (resample.ratio_x, resample.ratio_y),
        vectors,
    )


#: Seconds between two log lines on the vectorize chunks still running after a prediction.
VECTOR_PROGRESS_S = 10.0


def _vector_progress(scene: Scene, done: int, total: int) -> None:
    log.info("%s: %d/%d vectorize chunks", redact(scene.path), done, total)


def _every(seconds: float, report: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """``report(done, total)`` at most once every ``seconds``, and always for the last one."""
    last = time.monotonic()

    def call(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done >= total or now - last >= seconds:
            last = now
            report(done, total)

    return call


def _prediction(scene: Scene, bundle: Bundle, path: Path, probs: bool) -> Prediction:
    """The vectorizer's description of output ``path`` of :func:`predict_scene`, made before
    any chunk runs: a scene the vectorizer cannot georeference fails before the model's work."""
    from geoseg.vectorize.source import describe_prediction

    return describe_prediction(
        os.fspath(path),
        tuple(bundle.spec.classes),
        scene.width,
        scene.height,
        scene.crs,
        scene.transform,
        {"GEOSEG_SCENE": os.path.basename(redact(scene.path)), "GEOSEG_MODEL": bundle.ident},
        os.fspath(path) if probs else None,
    )


def forward_bytes_lower_bound(
    spec: ModelSpec, batch: int, height: int, width: int, *, augmented: bool = False
) -> int:
    """A lower bound of one forward pass's memory (bytes, fp32) on ``batch`` windows of
    ``height`` x ``width`` px: at the end of the pass the input, the last decoder stage's output
    and the class scores exist at full resolution at once (the encoder's features and every
    earlier stage come on top, so the real peak is several times this).

    ``augmented``: with test-time augmentation, whose passes run one after another, the
    transformed input (and its channels-last copy), the probabilities transformed back and
    their running sum come on top."""
    last = spec.decoder_channels[-1] if spec._takes_decoder_channels() else len(spec.classes)
    bands, classes = len(spec.bands), len(spec.classes)
    per_px = bands + last + 2 * classes
    if augmented:
        per_px += 2 * bands + 2 * classes
    return 4 * batch * height * width * per_px


def available_bytes(device: str) -> int | None:
    """Memory free for a forward pass on ``device``: the GPU's free memory, or the system's
    available memory (``MemAvailable``); None when unknown."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


def check_working_set(
    spec: ModelSpec,
    window: Any,
    batch: int,
    device: str,
    tta: str = "none",
    *,
    host_bytes: int = 0,
) -> None:
    """Refuse chunk, halo and batch sizes whose forward pass cannot fit in memory, before
    anything is allocated (a 100000 px halo once asked for 112 GiB). ``tta``: the test-time
    augmentation mode, among :data:`TTA`. ``host_bytes``: memory (bytes) the chunks take on
    this machine besides the forward pass (resampling them to the model's GSD, see
    :func:`geoseg.resample.resample_bytes`); on a GPU it is checked against this machine's
    memory."""
    h, w = int(window.height), int(window.width)
    need = forward_bytes_lower_bound(spec, batch, h, w, augmented=tta != "none")
    device = resolve_device(device)
    if device == "cpu":
        need += host_bytes
    elif host_bytes:
        have = available_bytes("cpu")
        if have is not None and host_bytes > have:
            raise ConfigError(
                f"resampling {batch} window(s) of {w} x {h} model px needs at least "
                f"{host_bytes / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available "
                "on this machine; use a smaller --chunk or --batch-size"
            )
    have = available_bytes(device)
    if have is not None and need > have:
        also = " and resampling" if device == "cpu" and host_bytes else ""
        raise ConfigError(
            f"a forward pass{also} on {batch} window(s) of {w} x {h} px (chunk plus halo) needs "
            f"at least {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available on "
            f"{device}; use a smaller --chunk, --halo or --batch-size"
        )


def write_in_background(options: PredictOptions, device: str) -> bool:
    """Queue each chunk's tiles for the writer's threads without waiting (see
    :class:`RasterWriter`) when the model runs elsewhere (a GPU, a remote cluster) and this
    machine's cores are free for it; when the forward pass fills this CPU, wait for each
    chunk's tiles, so that the writer does not run ahead of the model."""
    return (device != "cpu" or bool(options.scheduler)) and cpu_cores() > 1


def redundancy(chunk: int, halo: int) -> float:
    """Model pixels per output pixel for an interior chunk: ((core + 2 halo) / core)²."""
    return math.pow((chunk + 2 * halo) / chunk, 2)
