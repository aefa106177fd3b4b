"""The chip cache: scenes decoded once, chips sliced from it equal to chips read from the file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.train.cache import ChipCache
from geoseg.train.chips import load_chip
from geoseg.train.config import parse_config
from geoseg.train.dataset import Prepared, prepare
from geoseg.train.feed import Prefetch
from geoseg.train.loop import Speedups, train

from .test_train import H, W, _config

#: inside, across every edge and corner, and larger than the scene
WINDOWS = [
    Window(64, 48, 32, 32),
    Window(0, 0, 32, 32),
    Window(-10, 20, 32, 32),
    Window(W - 20, -7, 32, 32),
    Window(W - 16, H - 16, 40, 24),
    Window(-5, -5, W + 10, H + 10),
]


def _prepared(tmp_path: Path, **model: Any) -> tuple[Any, Prepared]:
    raw = _config(tmp_path)
    raw["model"].update(model)
    cfg = parse_config(raw, "test")
    return cfg, prepare(cfg)


def test_cached_chips_equal_chips_read_from_the_file(tmp_path: Path) -> None:
    _, prep = _prepared(tmp_path)
    labels = prep.chips.labels[0]
    cache = ChipCache(prep.chips.labels, prep.spec, tmp_path / "cache")
    assert cache.scenes[0] is not None  # really cached, not the fallback
    for window in WINDOWS:
        x, y = cache.load(0, window)
        x_ref, y_ref = load_chip(labels, window, prep.spec)
        assert x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
        assert np.array_equal(x, x_ref), window
        assert np.array_equal(y, y_ref), window
    ignored = cache.load(0, Window(0, 0, 32, 32))[1]
    assert (ignored == 255).all()  # the nodata corner


@pytest.mark.parametrize("gsd", [1.5, 0.7])  # shrinking (average) and enlarging (bilinear)
def test_cached_chips_on_a_resampled_grid(tmp_path: Path, gsd: float) -> None:
    """Labels and validity are equal; pixels within one grey level (GDAL rounds a few pixels
    of a resampled window read differently depending on the window's origin)."""
    _, prep = _prepared(tmp_path, gsd_m=gsd)
    labels = prep.chips.labels[0]
    assert labels.image is not None  # a virtual grid
    grid = labels.scene
    cache = ChipCache(prep.chips.labels, prep.spec, tmp_path / "cache")
    assert cache.scenes[0] is not None
    std = np.float32(prep.spec.normalization.std[0] * prep.spec.normalization.scale)
    windows = [Window(0, 0, 32, 32), Window(grid.width - 32, grid.height - 32, 32, 32)]
    windows += [Window(c, r, 32, 32) for c, r in [(17, 9), (40, 33), (5, grid.height - 40)]]
    for window in windows:
        x, y = cache.load(0, window)
        x_ref, y_ref = load_chip(labels, window, prep.spec)
        assert np.array_equal(y, y_ref), window
        grey = np.abs(x - x_ref) * std  # grey levels
        assert grey.max() < 1.001, window
        assert np.count_nonzero(grey > 0.5) <= 0.01 * grey.size, window


def test_cache_is_reused_and_rebuilt_when_the_scene_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, prep = _prepared(tmp_path)
    root = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="geoseg.train.cache"):
        ChipCache(prep.chips.labels, prep.spec, root)
        assert "cached" in caplog.text
        files = sorted(root.glob("*.npy"))
        assert len(files) == 3
        caplog.clear()
        ChipCache(prep.chips.labels, prep.spec, root)
        assert "cached" not in caplog.text  # opened, not written again
    assert sorted(root.glob("*.npy")) == files

    with rasterio.open(cfg.scenes[0].image, "r+") as ds:  # brighter scene, same size
        ds.write(np.clip(ds.read(1).astype(int) + 7, 0, 255).astype(np.uint8), 1)
    prep = prepare(cfg)
    cache = ChipCache(prep.chips.labels, prep.spec, root)
    assert not set(root.glob("*.npy")) & set(files)  # new key, stale arrays removed
    assert len(list(root.glob("*.npy"))) == 3
    window = Window(64, 48, 32, 32)
    assert np.array_equal(
        cache.load(0, window)[0], load_chip(prep.chips.labels[0], window, prep.spec)[0]
    )


def test_training_with_cache_and_prefetch_equals_the_plain_path(tmp_path: Path) -> None:
    """fp32, same memory format: reading chips from the cache, batches made by a background
    thread, gives bit for bit the weights of reading every chip from its file in line."""
    from safetensors.torch import load_file

    weights = []
    for name, speed in [
        ("fast", Speedups(channels_last=False)),
        ("plain", Speedups(cache=False, prefetch=0, channels_last=False)),
    ]:
        d = tmp_path / name
        d.mkdir()
        raw = _config(d, epochs=1, precision="fp32")
        train(parse_config(raw, name), speed=speed)
        weights.append(load_file(str(d / "model.checkpoint" / "state" / "weights.safetensors")))
        assert (d / "model.checkpoint" / "cache").is_dir() == speed.cache
    a, b = weights
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_prefetch_keeps_order_and_raises_where_the_item_would_come() -> None:
    def items(fail_at: int | None = None):  # type: ignore[no-untyped-def]
        for i in range(20):
            if i == fail_at:
                raise ValueError("boom")
            yield i

    with Prefetch(items(), 3) as feed:
        assert list(feed) == list(range(20))
    got: list[int] = []
    with pytest.raises(ValueError, match="boom"), Prefetch(items(7), 2) as feed:
        got.extend(feed)
    assert got == list(range(7))
    with Prefetch(items(), 2) as feed:  # leaving early stops the thread
        for i in feed:
            if i == 3:
                break
    assert feed._thread is None
