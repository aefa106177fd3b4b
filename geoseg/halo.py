"""Measure the halo a model needs for seamless tiling: its effective receptive field (px).

A chunk's core is exact when everything that influences it lies inside the padded window.
We compare the model's output on a crop with growing halo against the output on a much larger
window, and keep the smallest halo (a multiple of the stride) whose core matches within
``tolerance`` on at least ``fraction`` of pixels — the same test the tiling must pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geoseg.model import ModelSpec

__all__ = ["bundle_halo", "measure_halo"]


def measure_halo(
    predictor: Callable[[np.ndarray], np.ndarray],
    bands: int,
    stride: int,
    *,
    core: int = 128,
    max_halo: int = 512,
    tolerance: float = 2 / 255,
    fraction: float = 0.999,
    seed: int = 0,
) -> int:
    """Smallest halo (px, multiple of ``stride``) that reproduces a wide window's core.

    Returns ``max_halo`` when even that is not enough. Inputs are standard-normal noise in
    normalized units, so every band and offset carries signal.
    """
    core = -(-core // stride) * stride
    max_halo = -(-max_halo // stride) * stride
    size = core + 2 * max_halo
    x = np.random.default_rng(seed).standard_normal((1, bands, size, size)).astype(np.float32)
    centre = slice(max_halo, max_halo + core)
    reference = predictor(x)[0][:, centre, centre]
    for halo in range(0, max_halo, stride):
        lo, hi = max_halo - halo, max_halo + core + halo
        out = predictor(np.ascontiguousarray(x[:, :, lo:hi, lo:hi]))[0]
        got = out[:, halo : halo + core, halo : halo + core]
        close = (np.abs(got - reference) <= tolerance).all(axis=0)
        if close.mean() >= fraction:
            return halo
    return max_halo


def bundle_halo(module: Any, spec: ModelSpec, max_halo: int = 512) -> int:
    """Measure the seamless halo of ``module`` built from ``spec`` (px), on the CPU.

    Warns when even ``max_halo`` is not enough: such a model draws on global context
    (squeeze-and-excitation, global pooling), and tiled output cannot equal a whole-scene pass.
    """
    from geoseg.predict import TorchPredictor

    halo = measure_halo(TorchPredictor(module), len(spec.bands), spec.stride, max_halo=max_halo)
    if halo >= max_halo:
        warnings.warn(
            f"{spec.name}: {spec.encoder} output still changes with a {max_halo} px halo; the "
            "model uses global context (e.g. squeeze-and-excitation or global pooling), so "
            "tiled output will not equal a whole-scene pass. Prefer an encoder without it "
            "(resnet, mobilenet_v2, efficientnet-b*)",
            UserWarning,
            stacklevel=2,
        )
    return halo
