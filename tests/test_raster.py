"""The chunked writer on its own: any windows, overview levels streamed or made at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from geoseg.io.raster import open_scene
from geoseg.io.tiles import downsample2
from geoseg.io.writer import RasterWriter
from tests.conftest import write_tif


@pytest.mark.parametrize(
    "step",
    [
        1024,  # chunks of two tiles a side: every tile complete from one chunk
        600,  # tiles shared by chunks wait for their last piece
        514,  # level-1 tiles from four chunks' cells
        97,  # odd offsets: every tile pieced together
    ],
)
@pytest.mark.parametrize("background", [False, True])
def test_writer_levels_equal_the_cells_of_the_level_above(
    tmp_path: Path, step: int, background: bool
) -> None:
    """Chunks of any size, in any order, waited for or queued: the same COG, each level the
    cells of the one above, its mask valid where any pixel of a cell is."""
    rng = np.random.default_rng(step)
    h, w = 900, 1100  # levels 1 and 2 (550 and 275 px wide)
    data = rng.integers(0, 255, (2, h, w), dtype=np.uint8)
    data[:, 300:420, 51:640] = 255  # nodata across windows, at odd offsets
    scene = open_scene(write_tif(tmp_path / "in.tif", data, nodata=255))
    valid = data[0] != 255
    final = tmp_path / "out" / "probs.tif"
    final.parent.mkdir()
    writer = RasterWriter(scene, {"K": "v"}, background=background, threads=3)
    writer.add("probs", final, 2, band_names=["a", "b"], resampling="average", with_mask=True)
    windows = [
        Window(c, r, min(step, w - c), min(step, h - r))
        for r in range(0, h, step)
        for c in range(0, w, step)
    ]
    rng.shuffle(windows)  # type: ignore[arg-type]
    with writer:
        for win in windows:
            r, c = int(win.row_off), int(win.col_off)
            sl = np.s_[r : r + int(win.height), c : c + int(win.width)]
            writer.write("probs", win, data[(slice(None), *sl)], valid[sl])
    assert not [p for p in final.parent.iterdir() if p != final]  # no scratch files
    with rasterio.open(final) as out:
        assert out.overviews(1) == [2, 4]
        assert out.tags()["K"] == "v" and out.descriptions == ("a", "b")
        assert out.interleaving.name == "pixel" and out.nodata is None
        assert out.crs == scene.crs and out.transform == scene.transform
        assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        np.testing.assert_array_equal(out.read(), data)
        assert (out.dataset_mask() > 0).tolist() == valid.tolist()
        prev, prev_valid = data, valid
        for f in out.overviews(1):
            shape = (2, -(-h // f), -(-w // f))
            got, got_valid = out.read(out_shape=shape), out.dataset_mask(out_shape=shape[1:]) > 0
            expect, expect_valid = downsample2(prev, prev_valid, "average")
            np.testing.assert_array_equal(got_valid, expect_valid)
            np.testing.assert_array_equal(got, expect)
            prev, prev_valid = got, got_valid
    assert cog_validate(str(final))[0]


def test_block_cache_is_limited_once_for_the_process() -> None:
    """GDAL's block cache is process-wide: set once to 64 MiB, never swung by a thread's
    environment coming and going while other threads write (that crashed GDAL now and then)."""
    code = """
import threading
from rasterio.env import get_gdal_config
from geoseg.io.raster import BLOCK_CACHE_MB, gdal_env
before = get_gdal_config("GDAL_CACHEMAX")
seen = []
def work():
    with gdal_env():
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
    seen.append(get_gdal_config("GDAL_CACHEMAX"))
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
seen.append(get_gdal_config("GDAL_CACHEMAX"))
assert before > BLOCK_CACHE_MB << 20, before
assert seen == [BLOCK_CACHE_MB] * 7, seen  # MiB, as set (GDAL's own default: in bytes)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
