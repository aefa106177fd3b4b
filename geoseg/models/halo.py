"""Measure the halo a model needs for seamless tiling: its effective receptive field (px).

A chunk's core is exact when everything that influences it lies inside the padded window.
We compare the model's output on a crop with growing halo against the output on a much larger
window, and keep the smallest halo (a multiple of the stride) whose core matches within
``tolerance`` on at least ``fraction`` of pixels — the same test the tiling must pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geoseg.models.bundle import ModelSpec

__all__ = ["bundle_halo", "measure_halo"]


def measure_halo(
    predictor: Callable[[np.ndarray], np.ndarray],
    bands: int,
    stride: int,
    *,
    core: int = 128,
    max_halo: int = 512,
    tolerance: float = 2 / 255,
    fraction: float = 0.9999,
    seed: int = 0,
    samples: Sequence[np.ndarray] = (),
) -> int:
    """Smallest halo (px, multiple of ``stride``) that reproduces a wide window's core.

    Measured on standard-normal noise (every band and offset carries signal), on smooth
    low-frequency noise with sharp-edged blocks (large uniform areas, which let a random
    network's activations run further), and on each of ``samples``: normalized real windows
    (bands, h, w), which trained models often need more context for; the largest answer wins.
    ``fraction`` is ten times stricter than the 99.9 % that tiling promises, a margin for
    content the measurement did not see. Returns ``max_halo`` when even that is not enough.
    """
    core = -(-core // stride) * stride
    max_halo = -(-max_halo // stride) * stride
    size = core + 2 * max_halo
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((bands, size, size)).astype(np.float32)
    inputs = [noise, _blocks(rng, bands, size)] + [_centre_crop(s, size) for s in samples]
    return max(
        _halo_for(predictor, x[None], core, max_halo, stride, tolerance, fraction) for x in inputs
    )


def _blocks(rng: np.random.Generator, bands: int, size: int) -> np.ndarray:
    """Uniform blocks of 8-64 px with sharp edges over a gentle gradient, unit variance."""
    out = np.zeros((bands, size, size), np.float32)
    for cell in (64, 16, 8):
        n = -(-size // cell)
        coarse = rng.standard_normal((bands, n, n)).astype(np.float32)
        out += np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :size, :size]
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    out += ramp[None, :, None] + ramp[None, None, :]
    out -= out.mean()
    return out / out.std()


def _centre_crop(sample: np.ndarray, size: int) -> np.ndarray:
    """``sample`` cropped (or reflect-padded) to size x size around its centre."""
    out = sample
    for axis in (1, 2):
        n = out.shape[axis]
        if n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad, mode="symmetric")
        else:
            start = (n - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _halo_for(
    predictor: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    core: int,
    max_halo: int,
    stride: int,
    tolerance: float,
    fraction: float,
) -> int:
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


def bundle_halo(
    module: Any, spec: ModelSpec, max_halo: int = 512, samples: Sequence[np.ndarray] = ()
) -> int:
    """Measure the seamless halo of ``module`` built from ``spec`` (px), on the CPU.

    Warns when even ``max_halo`` is not enough: such a model draws on global context
    (squeeze-and-excitation, global pooling), and tiled output cannot equal a whole-scene pass.
    """
    from geoseg.models.predictor import TorchPredictor

    halo = measure_halo(
        TorchPredictor(module), len(spec.bands), spec.stride, max_halo=max_halo, samples=samples
    )
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
