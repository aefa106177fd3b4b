"""An input low-pass filter in front of a network: a model that sees every input at the same
effective resolution, whatever the sharpness of the imagery.

A model trained mostly on satellite imagery resampled to a finer grid (0.5 m pixels shown at
0.3 m) and on one sharp aerial town can learn to tell the two apart by sharpness, and then treat
a sharp aerial scene from another city as that town. ``ModelSpec.input_low_pass_m`` blurs
every input, in training and in prediction, to that ground resolution: a Gaussian whose full
width at half maximum grows the model's pixel size ``gsd_m`` to ``input_low_pass_m``
(σ = √(low_pass² − gsd²) / (2 √(2 ln 2)), in model pixels: ``low_pass_sigma_px`` in
``geoseg.models.input_filter``).

The filter is a fixed depthwise convolution inside the network's forward pass, so every backend
(torch on CPU or GPU, the converted OpenVINO network) runs it, the measured seamless halo
includes its reach, and tiled output stays identical to whole-image output. It holds no weights:
the bundle's weights file is the network's alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geoseg.models.input_filter import filter_reach_px

__all__ = ["LowPassed", "gaussian_blur", "with_low_pass"]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalized 1-D Gaussian of ``sigma`` px, reaching 3 σ each side (float32)."""
    radius = filter_reach_px(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(
    x: torch.Tensor, sigma: float, kernel: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (N, C, H, W) blurred by a separable Gaussian of ``sigma`` px, each band alike,
    edges replicated (``kernel``: :func:`gaussian_kernel` of ``sigma``, when already made)."""
    c = x.shape[1]
    k = gaussian_kernel(sigma).to(x.device) if kernel is None else kernel
    k = k.to(dtype=x.dtype)
    r = k.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class LowPassed(torch.nn.Module):
    """``net`` behind a separable Gaussian blur of ``sigma`` px applied to each band alike
    (edges replicated). ``state_dict`` is ``net``'s, unprefixed, so the weights of a network
    with and without the filter are the same file."""

    kernel: torch.Tensor

    def __init__(self, net: torch.nn.Module, sigma: float) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.net = net
        self.sigma = sigma
        self.register_buffer("kernel", gaussian_kernel(sigma), persistent=False)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, self.sigma, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.blur(x))

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return self.net.load_state_dict(*args, **kwargs)


def with_low_pass(net: torch.nn.Module, sigma: float) -> torch.nn.Module:
    """``net`` behind a filter of ``sigma`` px (``low_pass_sigma_px`` of its spec, in
    :mod:`geoseg.models.input_filter`), or ``net`` itself where ``sigma`` is 0."""
    return LowPassed(net, sigma) if sigma > 0 else net
