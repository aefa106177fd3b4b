"""Inference backends: OpenVINO against torch on the shipped model, its on-disk cache, its
errors, seamless tiles, and --backend on the CLI and in pipelines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.windows import Window

from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import bundle_factory, predict_scene
from geoseg.errors import ConfigError, ModelError
from geoseg.io.raster import open_scene
from geoseg.models import backends
from geoseg.models.predictor import (
    BundleFactory,
    TorchPredictor,
    cpu_supports_bf16,
    gpu_driver_present,
)
from tests.conftest import REPO, write_tif

pytest.importorskip("openvino")

SHIPPED = REPO / "data_samples" / "model"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache for the module's tests (the shipped model converts in 5-10 s)."""
    return tmp_path_factory.mktemp("geoseg-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSEG_CACHE", str(cache))


@pytest.fixture(scope="module")
def shipped() -> Any:
    from geoseg.models.bundle import load_bundle

    return load_bundle(SHIPPED)


@pytest.fixture(scope="module")
def crop(shipped: Any) -> np.ndarray:
    """A normalized 224 x 288 px crop of Banepa (buildings, roads, fields): batch of 2, the
    second one turned upside down. Not a multiple of the 256 px that the network is traced on,
    and not square."""
    with rasterio.open(REPO / "data_samples" / "banepa_rgb.tif") as src:
        raw = src.read((1, 2, 3), window=Window(256, 416, 288, 224))
    x = shipped.spec.normalization.apply(raw, np.ones(raw.shape[1:], bool))
    return np.ascontiguousarray(np.stack([x, x[:, ::-1]]), dtype=np.float32)


def torch_probs(bundle: Any, x: np.ndarray, precision: str, tta: str = "none") -> np.ndarray:
    from geoseg.models.bundle import load_module

    return TorchPredictor(load_module(bundle), "cpu", precision, tta=tta)(x)


def openvino(bundle: Any, precision: str, tta: str = "none") -> Any:
    return BundleFactory(
        str(bundle.path), bundle.sha256, "cpu", precision, tta=tta, backend="openvino"
    ).build()


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Probabilities within 2/255 and the same class everywhere (but on near ties)."""
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2 / 255
    top2 = np.sort(want, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < 1e-4
    differ = got.argmax(1) != want.argmax(1)
    assert not (differ & ~tie).any()


def test_shipped_model_matches_torch_in_fp32(shipped: Any, crop: np.ndarray) -> None:
    got = openvino(shipped, "fp32")(crop)
    want = torch_probs(shipped, crop, "fp32")
    assert_same(got, want)
    assert np.abs(got - want).max() < 1e-4  # in fact float rounding only
    classes = np.bincount(want.argmax(1).ravel(), minlength=4)
    assert (classes[:3] > 0).all()  # background, building and road are all in the crop


def test_shipped_model_with_tta_matches_torch(shipped: Any, crop: np.ndarray) -> None:
    """d4 on a non-square window: the turned passes run as W x H (compiled separately)."""
    x = np.ascontiguousarray(crop[:1, :, :96, :160])
    got = openvino(shipped, "fp32", "d4")(x)
    assert_same(got, torch_probs(shipped, x, "fp32", "d4"))
    assert np.abs(got - openvino(shipped, "fp32")(x)).max() > 0.05  # the average changed it


@pytest.mark.skipif(not cpu_supports_bf16(), reason="no native bf16 on this CPU")
def test_shipped_model_in_bf16_is_as_close_to_fp32_as_torch_bf16(
    shipped: Any, crop: np.ndarray
) -> None:
    """bf16 rounds differently in each library: two bf16 implementations are not within 2/255
    of each other (torch's own bf16 is not within 2/255 of its fp32 on about 13 % of the
    pixels); each must be about as close to the fp32 result as the other."""
    ref = torch_probs(shipped, crop, "fp32")
    ov, tb = openvino(shipped, "bf16")(crop), torch_probs(shipped, crop, "bf16")

    def classes_off(p: np.ndarray) -> float:
        return float((p.argmax(1) != ref.argmax(1)).mean())

    def probs_off(p: np.ndarray) -> float:
        return float((np.abs(p - ref) > 2 / 255).mean())

    assert classes_off(ov) <= max(2 * classes_off(tb), 0.005) and classes_off(ov) < 0.02
    assert probs_off(ov) <= max(1.5 * probs_off(tb), 0.02) and probs_off(ov) < 0.25


def test_converted_once_then_read_from_the_cache(make_bundle: Any, tmp_path: Path) -> None:
    bundle = make_bundle(seed=3)
    calls = []

    def load() -> Any:
        from geoseg.models.bundle import load_module

        calls.append(1)
        return load_module(bundle)

    _, folder, converted = backends.openvino_model(bundle, load, tmp_path)
    assert converted and calls == [1]
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left

    def no_load() -> Any:
        raise AssertionError("converted again")

    model, again, converted = backends.openvino_model(bundle, no_load, tmp_path)
    assert not converted and again == folder
    # another bundle (other weights) is another network
    _, other, converted = backends.openvino_model(make_bundle(seed=4), load, tmp_path)
    assert converted and other != folder


def test_not_installed_is_a_clear_error(make_bundle: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ConfigError, match=r"openvino is not installed: pip install 'geoseg\["):
        backends.resolve_backend("openvino", "cpu")
    assert backends.resolve_backend("auto", "cpu") == "torch"
    bundle = make_bundle()
    with pytest.raises(ConfigError, match="openvino is not installed"):
        BundleFactory(str(bundle.path), bundle.sha256, backend="openvino").build()
    from geoseg.cli import cli

    args = ["predict", "x.tif", "-m", str(bundle.path), "-o", "out", "--backend", "openvino"]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert res.exit_code != 0 and "openvino is not installed" in res.output


def test_resolution() -> None:
    assert backends.resolve_backend("auto", "cpu") == "openvino"
    assert backends.resolve_backend("auto", "cuda") == "torch"
    assert backends.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU, not on device 'cuda:0'"):
        backends.resolve_backend("openvino", "cuda:0")
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, openvino"):
        PredictOptions(backend="onnx")


def test_a_network_it_cannot_convert_is_a_clear_error(
    make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Cannot create Foo layer: unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    bundle = make_bundle(seed=5)
    factory = BundleFactory(str(bundle.path), bundle.sha256, backend="openvino")
    with pytest.raises(ModelError) as err:
        factory.build()
    text = str(err.value)
    assert text.startswith(str(bundle.path)) and "cannot convert this network" in text
    assert "unsupported operation" in text and "--backend torch" in text


def test_tiles_equal_the_whole_scene(tmp_path: Path, make_bundle: Any) -> None:
    """A random full-depth U-Net through OpenVINO: 96 px chunks with its 64 px halo vs one
    window for the whole 300 x 197 scene (edge windows differ in shape)."""
    from tests.conftest import FULL

    rng = np.random.default_rng(1)
    scene = write_tif(tmp_path / "s.tif", rng.integers(1, 256, (3, 197, 300), dtype=np.uint8))
    bundle = make_bundle(seed=1, encoder="mobilenet_v2", **FULL)

    def run(out: str, chunk: int) -> Any:
        options = PredictOptions(
            device="cpu", precision="fp32", chunk=chunk, halo=64, backend="openvino"
        )
        with open_client(options) as client:
            return predict_scene(open_scene(scene), bundle, tmp_path / out, options, client)

    small, whole = run("small", 96), run("whole", 1024)
    assert small.chunks > 4 and whole.chunks == 1

    def read(path: Path) -> np.ndarray:
        with rasterio.open(path) as src:
            return src.read().astype(int)

    assert np.abs(read(small.probs) - read(whole.probs)).max() <= 1
    np.testing.assert_array_equal(read(small.mask), read(whole.mask))


def test_bundle_factory_and_cli_option(make_bundle: Any) -> None:
    bundle = make_bundle()
    factory = bundle_factory(bundle, PredictOptions(device="cpu", backend="auto"))
    assert factory.backend == "openvino"
    assert bundle_factory(bundle, PredictOptions(device="cpu")).backend == "torch"
    from geoseg.cli import cli

    res = CliRunner().invoke(cli, ["predict", "--help"])
    assert "--backend [auto|torch|openvino]" in res.output


def test_pipeline_backend_is_hashed_only_when_set() -> None:
    from geoseg.pipeline.config import parse_pipeline
    from geoseg.pipeline.runner import predict_options
    from tests.test_tta import GOOD

    base = parse_pipeline(GOOD, "p.yml")
    assert base.predict.backend == "auto" and predict_options(base).backend == "auto"
    auto = parse_pipeline(GOOD + "predict:\n  backend: auto\n", "p.yml")
    ov = parse_pipeline(GOOD + "predict:\n  backend: openvino\n", "p.yml")
    assert predict_options(ov).backend == "openvino"
    assert auto.config_hash() == base.config_hash() != ov.config_hash()
    with pytest.raises(ConfigError, match="predict.backend"):
        parse_pipeline(GOOD + "predict:\n  backend: onnx\n", "p.yml")


TORCH_FREE = """
import atexit
import sys


def report():
    heavy = sorted(m for m in ("torch", "segmentation_models_pytorch", "timm") if m in sys.modules)
    print("imported:", ",".join(heavy) or "none", flush=True)


# geoseg's entry point ends the process with os._exit once the work is done (after the atexit
# handlers), so the report is an exit handler: it runs whichever way the command ends.
atexit.register(report)
from geoseg.cli import main

sys.argv = ["geoseg", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(gpu_driver_present(), reason="a GPU driver is here")
def test_a_cached_network_runs_without_importing_torch(
    tmp_path: Path, make_bundle: Any, cache: Path
) -> None:
    """Once converted, predicting with OpenVINO needs neither torch nor smp in the process
    (500-700 MiB of resident memory): the bundle check trusts the cached conversion of these
    very weights, and 'auto' finds no GPU driver without asking torch."""
    import os
    import subprocess

    bundle = make_bundle(seed=11)
    pixels = np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8)
    scene = write_tif(tmp_path / "s.tif", pixels)
    env = {**os.environ, "GEOSEG_CACHE": str(cache)}
    args = ["predict", str(scene), "-m", str(bundle.path), "--backend", "openvino", "--vectorize"]
    runs = []
    for out in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, "-c", TORCH_FREE, *args, "-o", str(tmp_path / out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(proc.stdout.strip().splitlines()[-1])
    assert runs[0] != "imported: none"  # the first run converts the network with torch
    assert runs[1] == "imported: none", runs
    for name in ("s.probs.tif", "s.mask.tif", "s.buildings.geojson"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_one_compiled_network_per_stream_whatever_the_shapes(make_bundle: Any) -> None:
    """A scene's edge chunks have other shapes than its interior ones: each compiled network
    holds its own activation memory (1 GiB for the shipped model's 2624² window), so at most
    one per stream is kept, the least recently used dropped first."""
    bundle = make_bundle(seed=3)
    shapes = [(1, 3, 96, 96), (1, 3, 64, 96), (1, 3, 96, 96), (1, 3, 96, 96)]
    rng = np.random.default_rng(0)
    for streams, compilations in ((1, 3), (2, 2)):
        factory = BundleFactory(
            str(bundle.path), bundle.sha256, "cpu", "fp32", backend="openvino", streams=streams
        )
        pred = factory.build()
        outs = [pred(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        assert pred.compilations == compilations  # type: ignore[attr-defined]
        assert len(pred._compiled) == min(streams, 2)  # type: ignore[attr-defined]
        assert [o.shape[2:] for o in outs] == [s[2:] for s in shapes]


def test_the_cpu_chunk_with_openvino_follows_the_memory_budget(shipped: Any) -> None:
    """With OpenVINO on a CPU the chunk is the largest multiple of 512 px whose estimated peak
    fits 1.5 GiB: for the shipped model's 352 px halo 1536 px in bf16 (the halo's share of the
    compute falls from 2.85x to 2.13x), and the bundle's 1024 px in fp32, whose activations
    take twice the memory; test-time augmentation needs more memory per window, so a smaller
    one; torch keeps the bundle's chunk; --chunk always wins."""
    from geoseg.engine import plan as engine_plan
    from geoseg.engine.plan import chunk_for, redundancy
    from geoseg.models.bundle import ModelSpec

    class Big:
        width = height = 50_000

    spec = shipped.spec
    halo = spec.halo
    assert halo == 352
    ov = PredictOptions(device="cpu", backend="openvino", precision="bf16")
    chunk = chunk_for(spec, spec.halo, ov, Big())  # type: ignore[arg-type]
    assert chunk == 1536 and redundancy(chunk, halo) < redundancy(spec.chunk, halo)
    for precision, expected in (("bf16", 1536), ("fp32", 1024)):
        options = PredictOptions(device="cpu", backend="openvino", precision=precision)
        assert chunk_for(spec, halo, options, Big()) == expected  # type: ignore[arg-type]
        factor = engine_plan.OPENVINO_PEAK_FACTOR[precision]
        for side, fits in ((expected + 2 * halo, True), (expected + 512 + 2 * halo, False)):
            need = engine_plan.CPU_BASE_BYTES + factor * engine_plan.forward_bytes_lower_bound(
                spec, 1, side, side
            )
            assert (need <= engine_plan.CPU_MEMORY_BUDGET) == fits, (precision, side)
    tta = PredictOptions(device="cpu", backend="openvino", precision="bf16", tta="flips")
    assert chunk_for(spec, spec.halo, tta, Big()) == 1024  # type: ignore[arg-type]
    torch = PredictOptions(device="cpu", backend="torch", precision="bf16")
    assert chunk_for(spec, spec.halo, torch, Big()) == spec.chunk  # type: ignore[arg-type]
    explicit = PredictOptions(device="cpu", backend="openvino", chunk=512)
    assert chunk_for(spec, spec.halo, explicit, Big()) == 512  # type: ignore[arg-type]

    class Small:
        width, height = 1000, 900  # one bundle chunk holds it

    assert chunk_for(spec, spec.halo, ov, Small()) == spec.chunk  # type: ignore[arg-type]
    # a small-halo model's chunk already costs little: it stays
    light = ModelSpec(encoder="resnet18", chunk=1024, halo=32)
    assert chunk_for(light, 32, ov, Big()) == 1024  # type: ignore[arg-type]
