"""What a prediction is asked for (``PredictOptions``) and what one scene produced
(``PredictOutputs``); the local worker and thread counts that follow from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from geoseg.engine.resample import (
    MAX_RESAMPLE_RATIO,
)
from geoseg.errors import ConfigError
from geoseg.io.tiles import COMPRESSIONS, DEFAULT_COMPRESS
from geoseg.models.backends import BACKENDS, tta_transforms
from geoseg.models.input_filter import parse_input_filter
from geoseg.runtime import cpu_cores

if TYPE_CHECKING:
    from geoseg.vectorize.options import VectorizeOutputs

from geoseg.models.predictor import resolve_device

MASK_NODATA = 255


#: The rasters a prediction can write: class probabilities (uint8 per class) and class mask.
RASTERS = ("probs", "mask")


@dataclass(frozen=True)
class PredictOptions:
    """How to run: sizes in model pixels; ``None`` takes the bundle's recommendation.

    ``resample``: read each chunk at the model's GSD when the scene's ground resolution differs
    from it by more than :data:`geoseg.engine.resample.RESAMPLE_TOLERANCE` (see
    :mod:`geoseg.engine.resample`). ``max_resample_ratio``: refuse scenes whose ground resolution
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
    #: the COGs' codec, among :data:`geoseg.io.tiles.COMPRESSIONS`
    compress: str = DEFAULT_COMPRESS
    #: test-time augmentation, among :data:`TTA`: the average of each window's model
    #: probabilities over its flips (4 passes) or its flips and quarter turns (8 passes)
    tta: str = "none"
    #: the inference backend, among :data:`geoseg.models.backends.BACKENDS`: auto takes
    #: OpenVINO on a CPU when it is installed, else torch (``geoseg predict`` and pipelines
    #: default to auto)
    backend: str = "torch"
    #: the input filter (:func:`geoseg.models.input_filter.parse_input_filter`): ``model``
    #: keeps the bundle's ``input_low_pass_m``, ``off`` predicts without one, metres blur
    #: every input to that effective ground resolution
    input_filter: str = "model"

    def __post_init__(self) -> None:
        tta_transforms(self.tta)  # raises ConfigError on an unknown mode
        object.__setattr__(self, "input_filter", parse_input_filter(self.input_filter))
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
