"""Tiny scenes, a tiny random model and pipeline files for the pipeline and scheduler tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_samples" / "sample_geotiff.tif"


def make_scene(path: Path, col: int, row: int, size: int = 128) -> Path:
    """Crop a ``size`` x ``size`` px window at (col, row) of the SpaceNet sample chip."""
    with rasterio.open(SAMPLE) as src:
        win = Window(col, row, size, size)
        profile = src.profile
        profile.update(
            width=size,
            height=size,
            transform=src.window_transform(win),
            tiled=True,
            blockxsize=64,
            blockysize=64,
        )
        data = src.read(window=win)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def make_model(path: Path, seed: int = 0) -> Path:
    """A random 1-band uint16 U-Net bundle small enough for tests (chunk 64 px, halo 32 px)."""
    import torch

    from geoseg.models.bundle import ModelSpec, Normalization, build_module, save_bundle

    spec = ModelSpec(
        name="tiny",
        encoder="resnet18",
        encoder_depth=3,
        decoder_channels=[16, 8, 8],
        bands=[1],
        dtype="uint16",
        normalization=Normalization(scale=2047.0),
        classes=["background", "building", "road"],
        chunk=64,
        halo=32,
        gsd_m=0.5,
    )
    torch.manual_seed(seed)
    save_bundle(spec, build_module(spec).state_dict(), path)
    return path


def write_pipeline(path: Path, **overrides: Any) -> Path:
    """A pipeline file for scenes ``scenes/*.tif`` beside it; ``overrides`` replace sections."""
    doc: dict[str, Any] = {
        "schema_version": 1,
        "name": "tiny",
        "inputs": {"paths": ["scenes/*.tif"]},
        "model": "model",
        # the bundle's chunk (OpenVINO would choose a larger one): scenes of several chunks
        "predict": {"device": "cpu", "precision": "fp32", "chunk": 64},
        "outputs": {"dir": "out", "vectors": False, "quicklook_px": 64},
        "compute": {"kind": "local", "workers": 1, "threads": 1, "scenes_in_flight": 2},
        "ledger": "state/ledger.sqlite",
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def leftovers(root: Path) -> list[Path]:
    """Temporary files (``.*.partial*``) anywhere under ``root``."""
    return sorted(p for p in root.rglob(".*partial*"))


def assert_same_rasters(got: Path, want: Path, names: list[str]) -> None:
    """The rasters ``names`` in folders ``got`` and ``want`` have equal profiles, tags and
    pixels (a remote run against a local one, say)."""
    for name in names:
        with rasterio.open(got / name) as a, rasterio.open(want / name) as b:
            assert a.profile == b.profile and a.tags() == b.tags(), name
            assert np.array_equal(a.read(), b.read()), name
