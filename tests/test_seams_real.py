"""Seams with the shipped model: ``data_samples/model`` (a trained EfficientNet-Lite2 U-Net,
halo 352 model px) tiled in small chunks equals one whole-window pass on real crops, read at
the model's GSD (Banepa, 0.13 m on the ground) and as they are (Austin, 0.30 m)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import predict_scene
from geoseg.io.raster import open_scene
from geoseg.models.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "data_samples" / "model"
BANEPA = REPO / "data_samples" / "banepa_rgb.tif"
AUSTIN = "real/austin_buildings_rgb/aerial_sample.tif"

#: Nine forward passes of ~700² px windows and one of ~900² px per test: about 45 s on 2 busy cores.
pytestmark = pytest.mark.slow

#: Share of pixels whose class probabilities must all agree within 2/255: the README's 99.9 %.
AGREE = 0.999


def crop(src_path: Path, out: Path, col: int, row: int, size: int) -> Path:
    """A ``size``² px crop at (col, row), tiled in 256 px blocks (the Banepa file's layout)."""
    with rasterio.open(src_path) as src:
        win = Window(col, row, size, size)
        profile = src.profile
        profile.update(
            driver="GTiff",
            width=size,
            height=size,
            transform=src.window_transform(win),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        data = src.read(window=win)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def predict(scene: Path, out: Path, chunk: int) -> Any:
    """The shipped model on ``scene`` in ``chunk`` model px chunks, its own halo, fp32 on CPU."""
    options = PredictOptions(device="cpu", precision="fp32", chunk=chunk, threads=2)
    with open_client(options) as client:
        return predict_scene(open_scene(scene), load_bundle(MODEL), out, options, client)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def assert_tiled_equals_whole(scene: Path, tmp: Path, chunk: int, n_chunks: int) -> Any:
    """``scene`` in ``n_chunks`` chunks of ``chunk`` model px against one chunk; the tiled
    run's outputs."""
    tiled = predict(scene, tmp / "tiled", chunk)
    whole = predict(scene, tmp / "whole", 2048)
    assert tiled.chunks == n_chunks and whole.chunks == 1  # the tiles cross seams both ways
    a, b = read(tiled.probs).astype(np.int16), read(whole.probs).astype(np.int16)
    close = (np.abs(a - b) <= 2).all(axis=0)
    assert close.mean() >= AGREE, f"only {close.mean():.5f} of pixels within 2/255"
    same = read(tiled.mask) == read(whole.mask)
    assert same.mean() >= AGREE, f"only {same.mean():.5f} of pixels of the same class"
    # the model found buildings here: the comparison is not between two empty outputs
    assert (read(whole.mask) == 1).mean() > 0.02
    return tiled


def test_shipped_model_is_seamless_read_at_its_gsd(tmp_path: Path) -> None:
    """Banepa (0.13 m ground pixels) read at 0.30 m: 3 x 3 chunks of 128 model px."""
    scene = crop(BANEPA, tmp_path / "banepa.tif", 96, 400, 600)
    assert assert_tiled_equals_whole(scene, tmp_path, 128, 9).resampled is not None


def test_shipped_model_is_seamless_at_its_own_gsd(tmp_path: Path, shared_data: Path) -> None:
    """Austin (0.30 m, the model's GSD, read as it is): 3 x 3 chunks of 160 px."""
    scene = crop(shared_data / AUSTIN, tmp_path / "austin.tif", 300, 300, 420)
    assert assert_tiled_equals_whole(scene, tmp_path, 160, 9).resampled is None


@pytest.fixture(autouse=True)
def _model_present() -> None:
    if not (MODEL / "model.json").is_file():
        pytest.skip(f"{MODEL} not present")
