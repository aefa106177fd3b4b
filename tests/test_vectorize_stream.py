"""Vectors made while a scene is predicted: read back from the writer's scratch tiles, the
same as vectors made from the finished rasters, and nothing left behind when it fails."""

from __future__ import annotations

import json
import logging
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
from geoseg.io.tiles import BLOCK
from geoseg.io.writer import RasterWriter
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from geoseg.vectorize import run as vrun
from geoseg.vectorize.run import StreamingVectorizer, local_client
from tests.conftest import write_tif
from tests.test_predict import IdentityFactory


def probability_scene(path: Path, width: int, height: int, seed: int = 0, **kw: Any) -> Path:
    """A 3-band scene that the identity model turns into probabilities of background,
    building and road with real shapes: rectangles of buildings, two crossing roads."""
    rng = np.random.default_rng(seed)
    cls = np.zeros((height, width), np.uint8)
    for _ in range(width * height // 2500):
        r, c = rng.integers(0, height - 5), rng.integers(0, width - 5)
        h, w = rng.integers(4, 40, 2)
        cls[r : r + h, c : c + w] = 1
    yy, xx = np.mgrid[0:height, 0:width]
    cls[(np.abs(yy - height // 3) < 5) | (np.abs(xx - yy - 40) < 4)] = 2
    noise = rng.integers(0, 40, (3, height, width))
    probs = np.where(np.arange(3)[:, None, None] == cls, 215, 0) + noise
    return write_tif(path, probs.astype(np.uint8), **kw)


def features(path: Path) -> list[str]:
    """A GeoJSON layer's features, each as canonical JSON, sorted."""
    layer = json.loads(Path(path).read_text())
    assert layer["type"] == "FeatureCollection"
    return sorted(json.dumps(f, sort_keys=True) for f in layer["features"])


def _predict(scene: Path, bundle: Any, out: Path, vector_client: Any = None, **opts: Any) -> Any:
    options = PredictOptions(device="cpu", precision="fp32", chunk=128, halo=16, **opts)
    vectorize = VectorizeOptions(chunk=256, halo=32, workers=1)
    with open_client(options) as client:
        return predict_scene(
            open_scene(scene),
            bundle,
            out,
            options,
            client,
            factory=IdentityFactory("stream"),
            vectorize=vectorize,
            vector_client=vector_client,
        )


@pytest.mark.parametrize("compress", ["deflate", "zstd", "lzw"])
def test_stored_tiles_read_back_what_the_cog_holds(tmp_path: Path, compress: str) -> None:
    width, height = 1100, 700
    src = write_tif(tmp_path / "s.tif", np.zeros((1, height, width), np.uint8))
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
    data[:, 300:] //= 7  # smooth parts too, for the predictor
    writer = RasterWriter(open_scene(src), compress=compress)
    writer.add("probs", tmp_path / "p.tif", 3, resampling="average", with_mask=True)
    keys = [(0, 0), (0, 1)]
    with writer:
        assert writer.stored("probs", keys) is None  # nothing written yet
        writer.write("probs", Window(0, 0, 1024, 512), data[:, :512, :1024])  # waits (CPU)
        stored = writer.stored("probs", keys)
        assert stored is not None and writer.stored("probs", [(1, 0)]) is None
        np.testing.assert_array_equal(stored.read(2, 10, 100, 500, 1000), data[1, 10:500, 100:1000])
        writer.write("probs", Window(1024, 0, 76, 512), data[:, :512, 1024:])
        writer.write("probs", Window(0, 512, width, height - 512), data[:, 512:])
        writer.flush()
        every = writer.stored("probs", [(ty, tx) for ty in range(2) for tx in range(3)])
        assert every is not None
        import pickle

        every = pickle.loads(pickle.dumps(every))  # as a task in another process gets it
        for band in (1, 2, 3):
            got = every.read(band, 0, 0, height, width)
            np.testing.assert_array_equal(got, data[band - 1])
        edge = every.read(3, BLOCK - 3, 2 * BLOCK - 5, height, width)
        np.testing.assert_array_equal(edge, data[2, BLOCK - 3 :, 2 * BLOCK - 5 :])
    with rasterio.open(tmp_path / "p.tif") as cog:
        np.testing.assert_array_equal(cog.read(), data)


@pytest.mark.parametrize("rasters", [("probs", "mask"), ("mask",)])
def test_streamed_vectors_equal_those_of_the_finished_raster(
    tmp_path: Path, make_bundle: Any, monkeypatch: pytest.MonkeyPatch, rasters: tuple[str, ...]
) -> None:
    """Made on worker processes while the chunks stream, read from the scratch tiles: the same
    features as vectorizing the committed raster afterwards; and tasks ran before the last
    chunk was written."""
    scene = probability_scene(tmp_path / "scene.tif", 1300, 1100)
    bundle = make_bundle(classes=["background", "building", "road"])
    submitted: list[int] = []  # tasks submitted so far, after each chunk written
    poll = StreamingVectorizer.poll

    def spy(self: StreamingVectorizer, writer: Any) -> None:
        poll(self, writer)
        submitted.append(self.total - len(self.waiting))

    monkeypatch.setattr(StreamingVectorizer, "poll", spy)
    with local_client(2) as processes:
        out = _predict(scene, bundle, tmp_path / "out", processes, rasters=rasters)
    assert out.vectors is not None
    counts = out.vectors.counts
    assert counts["buildings"] > 100 and counts["roads"] >= 2
    total = 2 * 30  # two layers, 5 x 6 chunks of 256 px
    # tasks went out before the last chunk was written; after the first, most had to wait
    assert submitted[-2] > 0 and submitted[0] < total

    source = out.probs if "probs" in rasters else out.mask
    again = vectorize_prediction(
        source, tmp_path / "again", VectorizeOptions(chunk=256, halo=32, workers=1)
    )
    assert again.counts == counts
    for layer, by_format in out.vectors.paths.items():
        for fmt, path in by_format.items():
            # the same features, in the order their pixels were predicted
            assert features(path) == features(again.paths[layer][fmt]), (layer, fmt)
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_failed_vectorize_task_leaves_nothing(
    tmp_path: Path, make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = probability_scene(tmp_path / "scene.tif", 600, 500)
    bundle = make_bundle(classes=["background", "building", "road"])

    def broken(*args: Any) -> Any:
        raise RuntimeError("simulated vectorize failure")

    monkeypatch.setattr(vrun, "skeleton_chunk", broken)  # tasks run in this process here
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated vectorize failure"):
        _predict(scene, bundle, out)
    assert sorted(p.name for p in out.iterdir()) == []


def test_streamed_vectors_are_the_same_bytes_whatever_order_tasks_finish(
    tmp_path: Path,
    make_bundle: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tiled scene is predicted in stripes of chunk columns; its vector files come out the
    same, byte for byte, from worker processes and from threads."""
    from geoseg.engine import plan as engine_plan

    monkeypatch.setattr(engine_plan, "STRIPE_BYTES", 3 * (128 + 32 + 64) * 128 * 3)  # 2 columns
    scene = probability_scene(
        tmp_path / "scene.tif", 900, 800, seed=3, tiled=True, blockxsize=64, blockysize=64
    )
    bundle = make_bundle(classes=["background", "building", "road"])
    with local_client(2) as processes:
        a = _predict(scene, bundle, tmp_path / "a", processes)
    with caplog.at_level(logging.INFO, logger="geoseg.engine.scene"):
        b = _predict(scene, bundle, tmp_path / "b")
    total = 2 * 4 * 4  # two layers, 4 x 4 chunks of 256 px
    assert f"{total}/{total} vectorize chunks" in caplog.text  # the tail reports its progress
    assert a.vectors is not None and b.vectors is not None
    assert a.vectors.counts == b.vectors.counts and a.vectors.counts["buildings"] > 50
    for layer, by_format in a.vectors.paths.items():
        for fmt, path in by_format.items():
            assert Path(path).read_bytes() == Path(b.vectors.paths[layer][fmt]).read_bytes()


def test_vector_workers_beside_a_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the cores unless the user set a number; none of its own on a Dask scheduler."""
    from geoseg.pipeline.config import PipelineConfig

    monkeypatch.setattr(vrun, "cpu_cores", lambda: 6)
    local = PredictOptions(device="cpu")
    with vrun.vector_cluster(local, VectorizeOptions()) as client:
        assert client is not None and len(client.nthreads()) == 3
    with vrun.vector_cluster(local, VectorizeOptions(workers=1)) as client:
        assert client is not None and len(client.nthreads()) == 1
    with vrun.vector_cluster(local, None) as client:
        assert client is None
    remote = PredictOptions(device="cpu", scheduler="tcp://127.0.0.1:1")
    with vrun.vector_cluster(remote, VectorizeOptions()) as client:
        assert client is None
    # a pipeline's options keep "not set" through its layers and formats
    base = {"schema_version": 1, "name": "p", "inputs": {"paths": ["s.tif"]}, "model": "m"}
    outputs = {"dir": "o", "formats": ["gpkg"]}
    unset = PipelineConfig.model_validate({**base, "outputs": outputs})
    assert "workers" not in unset.vectorize_options().model_fields_set
    given = PipelineConfig.model_validate({**base, "outputs": outputs, "vectorize": {"workers": 1}})
    assert given.vectorize_options().workers == 1
    assert "workers" in given.vectorize_options().model_fields_set


def test_a_damaged_scratch_tile_is_an_error_naming_the_file(tmp_path: Path) -> None:
    src = write_tif(tmp_path / "s.tif", np.zeros((1, 600, 600), np.uint8))
    data = np.random.default_rng(2).integers(0, 256, (1, 600, 600), dtype=np.uint8)
    writer = RasterWriter(open_scene(src))
    writer.add("mask", tmp_path / "m.tif", 1)
    with writer:
        writer.write("mask", Window(0, 0, 600, 600), data)
        stored = writer.stored("mask", [(0, 0)])
        assert stored is not None
        offset, size = stored.index[(0, 0)]
        with open(stored.path, "r+b") as f:  # another process wrote over it
            f.seek(offset)
            f.write(b"\xff" * min(size, 64))
        with pytest.raises(OSError, match=r"\.tiles: tile \(0, 0\) is unreadable"):
            stored.read(1, 0, 0, 10, 10)
