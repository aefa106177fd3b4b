"""Training: chips from GeoTIFF scenes and labels, the training loop, and its configuration."""

from __future__ import annotations

from geoseg.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
