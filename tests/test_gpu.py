"""The CUDA path on a real GPU: same outputs as the CPU, seamless under autocast.

Skipped by default (marker ``gpu``); run with ``pytest -m gpu`` on a machine with CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

from geoseg.engine import chunks as engine_chunks
from geoseg.engine import cluster as engine_cluster
from geoseg.engine import options as engine_options
from geoseg.engine import scene as engine_scene
from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import predict_scene
from geoseg.io.raster import open_scene
from geoseg.models import predictor as predictors
from geoseg.synthetic import write_scene
from tests.conftest import FULL, raw_pixels, write_tif

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(scene: Path, bundle: Any, out: Path, **opts: Any) -> Any:
    options = PredictOptions(**opts)
    with open_client(options) as client:
        return predict_scene(open_scene(scene), bundle, out, options, client)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read().astype(np.int16)


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    data = np.random.default_rng(8).integers(1, 256, size=(3, 300, 260), dtype=np.uint8)
    data[:, 0:64, 0:64] = 0  # an all-nodata chunk
    data[:, 150:170, 40:90] = 0
    return write_tif(tmp_path / "g.tif", data, nodata=0)


def test_cuda_fp32_matches_cpu(tmp_path: Path, scene: Path, make_bundle: Any) -> None:
    bundle = make_bundle(seed=3)
    kw = {"chunk": 64, "halo": 16, "precision": "fp32"}
    cpu = run(scene, bundle, tmp_path / "cpu", device="cpu", **kw)
    gpu = run(scene, bundle, tmp_path / "gpu", device="cuda", **kw)
    assert cpu.skipped == gpu.skipped == 1
    a, b = read(cpu.probs), read(gpu.probs)
    assert (np.abs(a - b) <= 2).all(axis=0).mean() >= 0.999  # TF32 convolutions on the GPU
    ma, mb = read(cpu.mask)[0], read(gpu.mask)[0]
    assert ((ma == engine_options.MASK_NODATA) == (mb == engine_options.MASK_NODATA)).all()
    assert (ma == mb).mean() >= 0.99


def test_warm_up_on_cuda_builds_and_runs_the_model(scene: Path, make_bundle: Any) -> None:
    bundle = make_bundle(seed=4)
    options = PredictOptions(device="cuda", chunk=64, halo=16)
    factory = engine_scene.bundle_factory(bundle, options)
    predictors._PREDICTORS.pop(factory, None)
    thread = engine_scene.warm_up(bundle, options, open_scene(scene))
    assert thread is not None
    thread.join()
    pred = predictors._PREDICTORS[factory]
    assert isinstance(pred, predictors.TorchPredictor) and pred.device.type == "cuda"


def test_cuda_tiling_adds_no_error(tmp_path: Path, make_bundle: Any) -> None:
    """256 px chunks + 64 px halo vs one chunk on a 1000² synthetic scene (the CPU seamless
    test's model): seamless in fp32; under autocast, tiling adds no error beyond the reduced
    precision's own, both measured against the fp32 whole-scene pass."""
    scene = tmp_path / "syn.tif"
    write_scene(scene, 1000, seed=2)
    bundle = make_bundle(seed=1, encoder="mobilenet_v2", **FULL)

    def probs(chunk: int, precision: str) -> np.ndarray:
        out = run(
            scene,
            bundle,
            tmp_path / f"{chunk}{precision}",
            device="cuda",
            chunk=chunk,
            halo=64,
            precision=precision,
        )
        assert out.chunks == (16 if chunk == 256 else 1)
        return read(out.probs)

    ref = probs(1024, "fp32")
    close = (np.abs(probs(256, "fp32") - ref) <= 2).all(axis=0)
    assert close.mean() >= 0.999, close.mean()
    err_whole = np.abs(probs(1024, "auto") - ref).mean()
    err_small = np.abs(probs(256, "auto") - ref).mean()
    assert err_small <= 1.5 * err_whole + 0.5, (err_small, err_whole)


def test_device_quantization_is_exact_on_cuda() -> None:
    class Ties(torch.nn.Module):  # classes 0 and 2 tie everywhere
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :1] * 0, x[:, :1], x[:, :1] * 0], dim=1)

    pred = predictors.TorchPredictor(Ties(), "cuda", "fp32")
    assert pred.quantizes_on_device
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 80)).astype(np.float32)
    windows = [(16, 16, 32, 48), (0, 0, 64, 80)]
    got = pred.quantized(x, windows)
    for item, (r, c, h, w), (q, classes) in zip(pred(x), windows, got, strict=True):
        want_q, want_classes = engine_chunks.quantize(
            item[:, r : r + h, c : c + w], np.ones((h, w), bool)
        )
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(classes[None], want_classes)


@pytest.mark.parametrize("dtype", sorted(predictors.DEVICE_DTYPES))
def test_device_normalization_is_exact_on_cuda(dtype: str) -> None:
    """Raw pixels normalized on the GPU are Normalization.apply's float32 values, bit for bit."""
    from geoseg.models.bundle import Normalization

    data, valid = raw_pixels(dtype, np.random.default_rng(len(dtype)))
    pred = predictors.TorchPredictor(torch.nn.Identity(), "cuda", "fp32")
    for norm in (
        Normalization(scale=255.0),
        Normalization(scale=2047.0, mean=[0.3, 0.4, 0.5], std=[0.2, 0.21, 0.19]),
    ):
        got = pred.normalized(list(data), list(valid), norm).cpu().numpy()
        want = np.stack([norm.apply(d, v) for d, v in zip(data, valid, strict=True)])
        np.testing.assert_array_equal(got, want)


def test_local_cluster_on_cuda_reads_with_several_threads() -> None:
    assert engine_options.local_threads(PredictOptions(device="cuda")) >= 2
    assert engine_cluster.write_in_background(PredictOptions(device="cuda"), "cuda")
