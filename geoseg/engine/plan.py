"""Planning a scene before any work: does it fit the model, its chunk grid (at the model's GSD
when resampled), the chunk size from the halo and the memory budget, the memory a forward pass
needs, and the order chunks run in."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.engine.grid import Chunk, ChunkGrid
from geoseg.engine.resample import (
    ResampledGrid,
    check_ratio,
    resample_plan,
)
from geoseg.errors import ConfigError, InputError
from geoseg.io.raster import Scene
from geoseg.io.remote import redact
from geoseg.io.tiles import BLOCK
from geoseg.models.bundle import ModelSpec

if TYPE_CHECKING:
    pass

from geoseg.engine.options import PredictOptions
from geoseg.models.predictor import resolve_device, resolve_precision


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
#: precision. Measured on the Lite0 demo model (EfficientNet-Lite0 U-Net, 108 bytes per window
#: pixel as that bound), end to end: 1.72x in bf16 (peak RSS 777 MiB at a 1600² window,
#: 1130 MiB at 2112², 1461 MiB at 2624²); fp32 keeps 1.33x bf16's activations. With a margin.
#: The Lite2 U-Net shipped since: estimated 1.35 GiB at a 2240² window in bf16, 1236 MiB measured.
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
        from geoseg.models.backends import resolve_backend

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


#: Source bytes that one stripe of chunk rows may span (see :meth:`ChunkGrid.in_stripes`): a
#: fraction of the reader's cache of decoded blocks (:data:`geoseg.io.reader.BLOCK_CACHE_BYTES`),
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


def chunk_batches(chunks: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
    :func:`geoseg.engine.resample.resample_bytes`); on a GPU it is checked against this machine's
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


def redundancy(chunk: int, halo: int) -> float:
    """Model pixels per output pixel for an interior chunk: ((core + 2 halo) / core)²."""
    return math.pow((chunk + 2 * halo) / chunk, 2)
