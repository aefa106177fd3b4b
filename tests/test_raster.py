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

from geoseg import writer as raster
from geoseg.raster import open_scene
from geoseg.writer import RasterWriter, downsample2
from tests.conftest import write_tif


@pytest.mark.parametrize(
    "step, streamed",
    [
        (1024, 2),  # 512 and 256 px at levels 1 and 2: both written window by window
        (600, 1),  # 150 px at level 2, too small to write window by window: made from level 1
        (514, 1),  # level 2 would need offsets on a 4 px grid: made from level 1 at the end
        (97, 0),  # odd offsets: every level made at the end, level 1 from full resolution
    ],
)
@pytest.mark.parametrize("background", [False, True])
def test_writer_levels_equal_the_cells_of_the_level_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int, streamed: int, background: bool
) -> None:
    """Written on the calling thread into one file, or in the background one band per file and
    thread: the same COG, each level the cells of the one above, whichever way it was made."""
    rng = np.random.default_rng(step)
    h, w = 900, 1100  # levels 1 and 2 (550 and 275 px wide)
    data = rng.integers(0, 255, (2, h, w), dtype=np.uint8)
    data[:, 300:420, 51:640] = 255  # nodata across windows, at odd offsets
    scene = open_scene(write_tif(tmp_path / "in.tif", data, nodata=255))
    valid = data[0] != 255
    made: list[int] = []
    finish = RasterWriter._finish_levels

    def spy(self: RasterWriter, out: raster._Output, part: raster._Part) -> None:
        made.append(part.streamed)
        finish(self, out, part)

    monkeypatch.setattr(RasterWriter, "_finish_levels", spy)
    final = tmp_path / "out" / "probs.tif"
    final.parent.mkdir()
    writer = RasterWriter(scene, {"K": "v"}, background=background)
    writer.add("probs", final, 2, band_names=["a", "b"], resampling="average", with_mask=True)
    with writer:
        for r in range(0, h, step):
            for c in range(0, w, step):
                win = Window(c, r, min(step, w - c), min(step, h - r))
                sl = np.s_[r : r + int(win.height), c : c + int(win.width)]
                writer.write("probs", win, data[(slice(None), *sl)], valid[sl])
    assert made == [streamed] * (3 if background else 2)  # the bands' parts and the mask
    assert not [p for p in final.parent.iterdir() if p != final]  # no scratch or level files
    with rasterio.open(final) as out:
        assert out.overviews(1) == [2, 4]
        assert out.tags()["K"] == "v" and out.descriptions == ("a", "b")
        assert out.interleaving.name == "pixel" and out.nodata is None
        assert out.crs == scene.crs and out.transform == scene.transform
        assert (out.dataset_mask() > 0).tolist() == valid.tolist()
        prev, prev_valid = data, valid
        for f in out.overviews(1):
            shape = (2, -(-h // f), -(-w // f))
            got, got_valid = out.read(out_shape=shape), out.dataset_mask(out_shape=shape[1:]) > 0
            expect, expect_valid = downsample2(prev, prev_valid, "average")
            np.testing.assert_array_equal(got_valid, expect_valid)
            np.testing.assert_array_equal(got[:, got_valid], expect[:, got_valid])
            prev, prev_valid = got, got_valid
    assert cog_validate(str(final))[0]


def test_block_cache_is_limited_once_for_the_process() -> None:
    """GDAL's block cache is process-wide: set once to 64 MiB, never swung by a thread's
    environment coming and going while other threads write (that crashed GDAL now and then)."""
    code = """
import threading
from rasterio.env import get_gdal_config
from geoseg.raster import BLOCK_CACHE_MB, gdal_env
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


@pytest.mark.parametrize("free_factor, expect", [(10.0, "none"), (1.0, "zstd")])
def test_scratch_is_compressed_only_when_the_disk_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_factor: float, expect: str
) -> None:
    """Scratch files are uncompressed (faster to write and to convert) when the output's file
    system has room for them several times over, else ZSTD; the COG is the same either way."""
    from collections import namedtuple

    rng = np.random.default_rng(1)
    h, w = 700, 900
    data = rng.integers(0, 255, (3, h, w), dtype=np.uint8)
    scene = open_scene(write_tif(tmp_path / "in.tif", data))

    def write(final: Path) -> str:
        writer = RasterWriter(scene)
        writer.add("probs", final, 3, resampling="average")
        need = writer.scratch_bytes()
        assert need == 3 * (h * w + 350 * 450)  # full resolution and its one level
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(
            raster.shutil, "disk_usage", lambda p: usage(0, 0, int(free_factor * need))
        )
        with writer:
            (part,) = writer._outputs["probs"].all_parts()
            compression = part.profile["compress"]
            for r in range(0, h, 512):
                win = Window(0, r, w, min(512, h - r))
                writer.write("probs", win, data[:, r : r + int(win.height)])
        monkeypatch.undo()
        return compression

    final = tmp_path / "a" / "probs.tif"
    final.parent.mkdir()
    assert write(final) == expect
    forced = "zstd" if expect == "none" else "none"
    monkeypatch.setattr(raster, "SCRATCH_COMPRESSION", forced)
    other = tmp_path / "b" / "probs.tif"
    other.parent.mkdir()
    assert write(other) == forced
    with rasterio.open(final) as a, rasterio.open(other) as b:
        assert a.overviews(1) == b.overviews(1) == [2]
        np.testing.assert_array_equal(a.read(), b.read())
        level = (3, 350, 450)
        np.testing.assert_array_equal(a.read(out_shape=level), b.read(out_shape=level))
