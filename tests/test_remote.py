"""Remote scenes over HTTP: read window by window from a real server on the loopback interface,
with the same outputs as the local file; unreachable, missing, stalling and dropping servers
fail with one line, in bounded time, leaving nothing behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.io.raster import open_scene
from geoseg.io.remote import is_remote, redact, remote_stem
from tests.conftest import write_tif
from tests.http_support import serve
from tests.pipeline_support import assert_same_rasters, leftovers


def predict(*args: str) -> Any:
    return CliRunner().invoke(cli, ["predict", *args, "--device", "cpu"])


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """A tiled, compressed 3-band scene in a folder the server serves."""
    root = tmp_path / "www"
    root.mkdir()
    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, (3, 40, 36)).astype(np.uint8)
    data = np.kron(base, np.ones((8, 8), np.uint8))[:, :300, :280]
    write_tif(root / "scene.tif", data)
    return root


def test_names() -> None:
    assert is_remote("https://h/a.tif") and is_remote("S3://b/k.tif") and is_remote("/vsis3/b/k")
    assert not is_remote("data/a.tif") and not is_remote("/data/https.tif")
    assert remote_stem("https://h/x/scene.v2.tif?X-Amz-Signature=abc") == "scene.v2"
    assert remote_stem("/vsis3/bucket/dir/s.tif") == "s"
    assert redact("https://user:pw@h:8/a.tif?sig=1") == "https://h:8/a.tif"


def test_http_scene_gives_the_local_outputs(tmp_path: Path, served: Path, make_bundle: Any) -> None:
    model = str(make_bundle().path)
    with serve(served) as server:
        url = f"{server.url}/scene.tif"
        scene = open_scene(url)
        assert scene.path == url and scene.stem == "scene"
        res = predict(url, "-m", model, "-o", str(tmp_path / "remote"))
        assert res.exit_code == 0, res.output
        assert server.requests > 2  # windowed range reads, not one download
    res = predict(str(served / "scene.tif"), "-m", model, "-o", str(tmp_path / "local"))
    assert res.exit_code == 0, res.output
    assert_same_rasters(
        tmp_path / "remote", tmp_path / "local", ["scene.probs.tif", "scene.mask.tif"]
    )


def _one_line_failure(res: Any, out: Path, needle: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), res.output
    assert needle in lines[0], lines[0]
    assert not out.exists() or (not list(out.glob("*.tif")) and leftovers(out) == [])


def test_missing_and_unreachable_scenes_are_one_line(
    tmp_path: Path, served: Path, make_bundle: Any
) -> None:
    model = str(make_bundle().path)
    with serve(served) as server:
        url = f"{server.url}/nothing.tif?token=secret"
        res = predict(url, "-m", model, "-o", str(tmp_path / "o"))
        _one_line_failure(res, tmp_path / "o", f"{server.url}/nothing.tif: cannot be read")
        assert "secret" not in res.output
    # the server is gone: nothing listens on that port any more
    res = predict(f"{server.url}/scene.tif", "-m", model, "-o", str(tmp_path / "o"))
    _one_line_failure(res, tmp_path / "o", "cannot be read")


@pytest.mark.parametrize("fault", ["stall", "drop"])
def test_a_server_that_stalls_or_drops_fails_in_bounded_time(
    tmp_path: Path, served: Path, make_bundle: Any, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")
    model = str(make_bundle().path)
    name = f"{fault}.tif"  # a name of its own: GDAL caches what it read of each URL
    (served / name).write_bytes((served / "scene.tif").read_bytes())
    with serve(served) as server:
        server.fault, server.fault_after = fault, 16384  # the header reads succeed
        t = time.monotonic()
        res = predict(f"{server.url}/{name}", "-m", model, "-o", str(tmp_path / "o"))
        elapsed = time.monotonic() - t
    _one_line_failure(res, tmp_path / "o", f"{server.url}/{name}")
    assert elapsed < 60, elapsed  # a bound, not a timing: the stall would last 120 s


def test_in_a_pipeline_a_stalling_scene_fails_alone(
    tmp_path: Path, served: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geoseg.pipeline import load_pipeline, run_pipeline
    from tests.pipeline_support import make_model, make_scene, write_pipeline

    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")
    for name in ("ok", "slow"):
        make_scene(served / f"{name}.tif", 0, 0, 128)
    make_model(tmp_path / "model")
    with serve(served) as server:
        server.fault, server.fault_after, server.fault_only = "stall", 16384, {"slow.tif"}
        urls = [f"{server.url}/ok.tif", f"{server.url}/slow.tif"]
        job = write_pipeline(tmp_path / "p.yml", inputs={"paths": urls})
        t = time.monotonic()
        summary = run_pipeline(load_pipeline(job))
        elapsed = time.monotonic() - t
    by_stem = {r.stem: r for r in summary.results}
    assert by_stem["ok"].status == "done"
    assert by_stem["slow"].status == "failed" and urls[1] in (by_stem["slow"].error or "")
    assert elapsed < 60, elapsed  # bounded by the timeout, not by the stall (120 s)
    assert leftovers(tmp_path / "out") == []


def test_the_ledger_keeps_no_signature_of_a_presigned_url(tmp_path: Path, served: Path) -> None:
    from geoseg.pipeline import Ledger, load_pipeline, run_pipeline
    from tests.pipeline_support import make_model, make_scene, write_pipeline

    make_scene(served / "signed.tif", 0, 0, 64)
    make_model(tmp_path / "model")
    with serve(served) as server:
        url = f"{server.url}/signed.tif?X-Amz-Signature=secret123"
        job = write_pipeline(tmp_path / "p.yml", inputs={"paths": [url]})
        first = run_pipeline(load_pipeline(job))
        assert [r.status for r in first.results] == ["done"]
        assert [r.status for r in run_pipeline(load_pipeline(job)).results] == ["skipped"]
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        rows = ledger.scenes(first.run_id)
    assert [r.path for r in rows] == [f"{server.url}/signed.tif"]
    assert "secret123" not in (tmp_path / "state" / "ledger.sqlite").read_bytes().decode("latin1")


def test_a_small_window_of_a_large_remote_cog_fetches_a_small_part_of_it(tmp_path: Path) -> None:
    """Opening a 4096² px COG over HTTP and reading one 256² px chunk window (with a reflected
    edge) fetches its header and the tiles it needs, not the file."""
    from rasterio.windows import Window

    from geoseg.io.reader import close_readers, read_padded

    root = tmp_path / "www"
    root.mkdir()
    rng = np.random.default_rng(11)
    data = rng.integers(0, 255, (3, 4096, 4096), dtype=np.uint8)
    write_tif(root / "big.tif", data, tiled=True, blockxsize=512, blockysize=512)
    size = (root / "big.tif").stat().st_size
    with serve(root) as server:
        scene = open_scene(f"{server.url}/big.tif")
        opened = server.bytes_served
        got, valid = read_padded(scene, Window(2100, -20, 256, 256), [1, 2, 3])
        close_readers()
    assert valid.all() and np.array_equal(got[:, 20:], data[:, :236, 2100:2356])
    # the header, and the last tile (read to find a truncated file): 1.6 % of the file
    assert opened < 0.03 * size, f"opening fetched {opened} of {size} bytes"
    # and the one tile under the window: 3.2 % of the file in all
    assert server.bytes_served < 0.06 * size, f"fetched {server.bytes_served} of {size} bytes"
