"""A model's input filter as a spec describes it and a run chooses it, without torch: the
Gaussian's σ for a ground resolution (``input_low_pass_m``), its reach (which a halo must
cover), and a run's own choice (``--input-filter``, ``predict.input_filter``) applied to a
spec. The filter itself, inside the network, is :mod:`geoseg.models.lowpass`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from geoseg.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from geoseg.models.bundle import ModelSpec

__all__ = [
    "FWHM_PER_SIGMA",
    "INPUT_FILTERS",
    "blur_sigma_px",
    "filter_reach_px",
    "filtered_spec",
    "low_pass_sigma_px",
    "parse_input_filter",
]


#: Gaussian full width at half maximum over σ.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def low_pass_sigma_px(spec: ModelSpec) -> float:
    """The σ (model pixels) of the Gaussian that ``spec``'s input filter blurs with
    (:mod:`geoseg.models.lowpass`); 0.0 for a spec without ``input_low_pass_m``."""
    if spec.input_low_pass_m is None:
        return 0.0
    if spec.gsd_m is None:
        raise ModelError(
            f"input_low_pass_m ({spec.input_low_pass_m} m) needs the model's gsd_m to be set"
        )
    return blur_sigma_px(spec.gsd_m, spec.input_low_pass_m)


def blur_sigma_px(gsd_m: float, resolution_m: float) -> float:
    """The σ (pixels of ``gsd_m``) of the Gaussian that blurs imagery at ``gsd_m`` to the
    effective ground resolution ``resolution_m``: its full width at half maximum grows the
    pixel size to it (σ = √(resolution² − gsd²) / 2.355 / gsd; 0.0 for one not coarser)."""
    extra = math.sqrt(max(resolution_m**2 - gsd_m**2, 0.0))
    return extra / FWHM_PER_SIGMA / gsd_m


def filter_reach_px(sigma: float) -> int:
    """How far (model pixels) a Gaussian of ``sigma`` px reaches each side: 3 σ, at least 1;
    0 for no filter (``sigma`` 0). The radius of :func:`geoseg.models.lowpass.gaussian_kernel`,
    and what a halo must add for it (here without torch, which that module imports)."""
    return max(1, math.ceil(3.0 * sigma)) if sigma > 0 else 0


#: A run's input filter besides a resolution in metres: ``model`` keeps the bundle's
#: ``input_low_pass_m``, ``off`` predicts on the inputs as they are.
INPUT_FILTERS = ("model", "off")


def parse_input_filter(value: str | float) -> str:
    """A run's input filter in its canonical form (``model``, ``off``, or the effective
    resolution in metres, e.g. ``0.8``); :class:`ConfigError` on anything else."""
    text = str(value).strip().lower()
    if text in INPUT_FILTERS:
        return text
    try:
        metres = float(text)
    except ValueError:
        metres = math.nan
    if not (math.isfinite(metres) and metres > 0):
        raise ConfigError(
            f"input filter must be {', '.join(INPUT_FILTERS)} or an effective ground resolution "
            f"in metres (> 0), got {value!r}"
        )
    return f"{metres:g}"


def filtered_spec(spec: ModelSpec, choice: str, source: str = "model") -> ModelSpec:
    """``spec`` with the input filter a run asks for (:func:`parse_input_filter`): ``model``
    keeps its own, ``off`` none, metres that effective resolution. A filter that reaches
    further than the model's own grows the halo by the difference, so tiles stay seamless.
    :class:`ConfigError` naming ``source`` for a resolution not coarser than the model's
    ``gsd_m``, or a model without one."""
    choice = parse_input_filter(choice)
    if choice == "model":
        return spec
    low_pass = None if choice == "off" else float(choice)
    if low_pass is not None:
        if spec.gsd_m is None:
            raise ConfigError(
                f"{source}: an input filter of {choice} m needs the model's gsd_m, which "
                "model.json does not give"
            )
        if low_pass <= spec.gsd_m:
            raise ConfigError(
                f"{source}: the input filter ({choice} m) must be coarser than the model's "
                f"gsd_m ({spec.gsd_m:g} m)"
            )
    if low_pass == spec.input_low_pass_m:
        return spec
    new = spec.model_copy(update={"input_low_pass_m": low_pass})
    extra = filter_reach_px(low_pass_sigma_px(new)) - filter_reach_px(low_pass_sigma_px(spec))
    if extra > 0:
        stride = spec.stride
        new = new.model_copy(update={"halo": spec.halo + math.ceil(extra / stride) * stride})
    return new
