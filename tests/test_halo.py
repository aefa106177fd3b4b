"""Receptive-field measurement on models whose reach is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.models.halo import measure_halo
from geoseg.models.predictor import TorchPredictor


def box_model(radius: int) -> TorchPredictor:
    """A single (2r+1)² box filter with zero padding: reach exactly ``radius`` px."""
    conv = torch.nn.Conv2d(1, 1, 2 * radius + 1, padding=radius, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / (2 * radius + 1) ** 2)
    return TorchPredictor(conv, activation=None)


@pytest.mark.parametrize("radius, expected", [(0, 0), (5, 8), (8, 8), (9, 16), (20, 24)])
def test_halo_covers_reach_and_rounds_to_stride(radius: int, expected: int) -> None:
    assert measure_halo(box_model(radius), 1, 8, core=32, max_halo=64, tolerance=1e-6) == expected


def test_halo_capped_when_reach_exceeds_limit() -> None:
    assert measure_halo(box_model(40), 1, 8, core=16, max_halo=32, tolerance=1e-6) == 32


def test_identity_needs_no_halo() -> None:
    assert measure_halo(lambda x: np.asarray(x), 3, 32) == 0
