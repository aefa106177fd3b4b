"""The COG layout that the writer builds from tiles compressed once: GDAL's own layout, byte
for byte where it matters (IFDs, tags, tile framing), read back by GDAL."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import tifffile
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from geoseg.errors import OutputError
from geoseg.io import cog
from geoseg.io.raster import open_scene
from geoseg.io.writer import RasterWriter
from tests.conftest import write_tif


def _write(
    tmp_path: Path,
    bands: int,
    with_mask: bool,
    compress: str = "deflate",
    step: int = 700,
    shape: tuple[int, int] = (1300, 1100),
    nodata: int | None = None,
) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(bands)
    h, w = shape
    data = rng.integers(0, 254, (bands, h, w), dtype=np.uint8)
    data[:, 200:650, 300:333] = 255
    scene = open_scene(write_tif(tmp_path / "in.tif", data, nodata=255))
    valid = data[0] != 255
    final = tmp_path / "out" / f"o-{bands}-{with_mask}-{compress}.tif"
    final.parent.mkdir(exist_ok=True)
    writer = RasterWriter(scene, {"K": "v", "NAME": "é"}, background=True, compress=compress)
    names = [f"band {i}" for i in range(bands)]
    resampling = "average" if bands > 1 else "nearest"
    writer.add(
        "o",
        final,
        bands,
        nodata=nodata,
        band_names=names,
        resampling=resampling,
        with_mask=with_mask,
    )
    with writer:
        for r in range(0, h, step):
            for c in range(0, w, step):
                win = Window(c, r, min(step, w - c), min(step, h - r))
                sl = np.s_[r : r + int(win.height), c : c + int(win.width)]
                writer.write("o", win, data[(slice(None), *sl)], valid[sl])
    return final, data, valid


def _tags(page: tifffile.TiffPage) -> dict[int, tuple[int, int, object]]:
    return {
        t.code: (int(t.dtype), t.count, None if t.code in (273, 279, 324, 325) else t.value)
        for t in page.tags.values()
    }


def _pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Every IFD of ``tif`` (tifffile gives TiffPages unless asked for frames)."""
    pages = []
    for page in tif.pages:
        assert isinstance(page, tifffile.TiffPage)
        pages.append(page)
    return pages


@pytest.mark.parametrize("with_mask", [True, False])
def test_same_ifds_and_tile_framing_as_gdals_cog_driver(tmp_path: Path, with_mask: bool) -> None:
    """GDAL's COG driver, copying our file with its overviews, writes the same IFDs (order,
    tags and values but the tile offsets) and the same header and ghost area; every IFD comes
    before the data; and our tiles are framed
    as that header says: size before, last 4 bytes after, each mask tile after its image
    tile, the smallest level's data first."""
    ours, _, _ = _write(tmp_path, 2, with_mask)
    gdals = tmp_path / "gdal.tif"
    rasterio.shutil.copy(
        ours,
        gdals,
        driver="COG",
        compress="deflate",
        level=1,
        predictor=2,
        overviews="force_use_existing",
        blocksize=512,
    )
    with tifffile.TiffFile(ours) as a, tifffile.TiffFile(gdals) as b:
        assert not a.is_bigtiff
        pages = _pages(a)
        assert [_tags(p) for p in pages] == [_tags(p) for p in _pages(b)]
        assert a.pages[0].offset == b.pages[0].offset < 300
    raw_a, raw_b = ours.read_bytes(), gdals.read_bytes()
    assert raw_a[: pages[0].offset] == raw_b[: pages[0].offset]  # header and ghost area

    def subfile(page: tifffile.TiffPage) -> int:
        tag = page.tags.get(254)
        return 0 if tag is None else int(tag.value)

    images = [p for p in pages if not subfile(p) & 4]
    masks = [p for p in pages if subfile(p) & 4]
    assert len(masks) == (len(images) if with_mask else 0)
    firsts = []
    for level, image in enumerate(images):
        offsets, sizes = image.dataoffsets, image.databytecounts
        firsts.append(offsets[0])
        for i, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
            assert struct.unpack("<I", raw_a[o - 4 : o])[0] == n
            assert raw_a[o + n : o + n + 4] == raw_a[o + n - 4 : o + n]
            if masks:
                assert masks[level].dataoffsets[i] == o + n + 8  # the mask's leader right after
    assert firsts == sorted(firsts, reverse=True)  # smallest level first, full resolution last
    assert [p.offset for p in pages] == sorted(p.offset for p in pages) and pages[-1].offset < min(
        firsts
    )
    assert cog_validate(str(ours))[0]


@pytest.mark.parametrize("compress", ["deflate", "zstd", "lzw"])
def test_codecs_read_back_exactly(tmp_path: Path, compress: str) -> None:
    """Each codec, with a 1-bit mask and with nodata, reads back exactly through GDAL."""
    final, data, valid = _write(tmp_path, 3, True, compress, step=512)
    with rasterio.open(final) as out:
        assert out.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == compress.upper()
        np.testing.assert_array_equal(out.read(), data)
        assert ((out.dataset_mask() > 0) == valid).all()
        assert out.tags()["NAME"] == "é" and out.descriptions[2] == "band 2"
    final, data, _ = _write(tmp_path, 1, False, compress, step=300, nodata=255)
    with rasterio.open(final) as out:
        assert out.nodata == 255 and out.overviews(1) == [2, 4]
        np.testing.assert_array_equal(out.read(), data)
        np.testing.assert_array_equal(out.read(out_shape=(1, 650, 550)), data[:, ::2, ::2])
    assert cog_validate(str(final))[0]


def test_bigtiff_when_offsets_would_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file past 4 GiB gets 64-bit offsets (forced here by lowering the limit): GDAL reads
    the same pixels, tags and overviews, and it is still a valid COG."""
    small, data, valid = _write(tmp_path, 2, True)
    monkeypatch.setattr(cog, "CLASSIC_MAX", 1000)
    (tmp_path / "big").mkdir()
    big, _, _ = _write(tmp_path / "big", 2, True)
    with tifffile.TiffFile(big) as t:
        assert t.is_bigtiff
    with rasterio.open(small) as a, rasterio.open(big) as b:
        assert a.profile == b.profile and a.tags() == b.tags()
        assert b.overviews(1) == [2, 4]
        np.testing.assert_array_equal(b.read(), data)
        assert ((b.dataset_mask() > 0) == valid).all()
        for f in b.overviews(1):
            shape = (2, -(-1300 // f), -(-1100 // f))
            np.testing.assert_array_equal(a.read(out_shape=shape), b.read(out_shape=shape))
    assert cog_validate(str(big))[0]


def test_a_failed_write_names_the_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while tiles are stored: one error naming the output; no COG, no scratch."""
    import os

    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError, match=r"o-2-True-deflate\.tif.*(space|full)"):
        _write(tmp_path, 2, True)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("background", [False, True])
def test_cpu_writer_threads_yield_to_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """When the model runs on this CPU (tiles waited for), tiles compress on threads of lower
    priority, so that the forward pass's threads are not held up; when it runs elsewhere
    (tiles queued), at the process's own priority."""
    import os
    import threading

    seen: list[tuple[str, int]] = []
    real = RasterWriter._encode_image

    def spy(self: RasterWriter, data: np.ndarray) -> bytes:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen.append((threading.current_thread().name, nice))
        return real(self, data)

    monkeypatch.setattr(RasterWriter, "_encode_image", spy)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (1, 600, 700), dtype=np.uint8)
    scene = open_scene(write_tif(tmp_path / "in.tif", data))
    writer = RasterWriter(scene, background=background, threads=2)
    writer.add("o", tmp_path / "o.tif", 1)
    with writer:
        writer.write("o", Window(0, 0, 700, 600), data)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen and all(name.startswith("geoseg-write") for name, _ in seen)
    expect = own if background else max(own, 10)
    assert {nice for _, nice in seen} == {expect}
