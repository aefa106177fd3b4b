"""The input low-pass filter (``model.json``'s ``input_low_pass_m``): the spec, the filter
itself against scipy's Gaussian, prediction through torch and OpenVINO with seamless tiles,
and training that runs the filter it records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from pydantic import ValidationError

from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import predict_scene
from geoseg.errors import ModelError
from geoseg.io.raster import open_scene
from geoseg.models.bundle import (
    ModelSpec,
    load_bundle,
    load_module,
    read_spec,
    spec_json,
)
from geoseg.models.input_filter import low_pass_sigma_px
from geoseg.models.lowpass import LowPassed
from tests.conftest import FULL, write_tif


@pytest.fixture(autouse=True)
def _cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted networks go to a fresh cache: none converted by another test is reused."""
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "geoseg-cache"))


#: the test scenes' 1 m grid, blurred to 3 m: σ = √8 / 2.3548 = 1.20 px
LOW_PASS = {"gsd_m": 1.0, "input_low_pass_m": 3.0}


def test_sigma_follows_the_resolutions() -> None:
    spec = ModelSpec(gsd_m=0.3, input_low_pass_m=0.6)
    assert low_pass_sigma_px(spec) == pytest.approx(math.sqrt(0.36 - 0.09) / 2.35482 / 0.3)
    assert low_pass_sigma_px(ModelSpec(gsd_m=0.3)) == 0.0
    with pytest.raises(ModelError, match=r"input_low_pass_m \(0.6 m\) needs the model's gsd_m"):
        low_pass_sigma_px(ModelSpec(input_low_pass_m=0.6))


def test_spec_refuses_a_filter_finer_than_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"input_low_pass_m \(0.3 m\) must be coarser"):
        ModelSpec(gsd_m=0.3, input_low_pass_m=0.3)
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"gsd_m": 0.5, "input_low_pass_m": 0.4}))
    with pytest.raises(ModelError, match=rf"{path}: invalid model spec: .*must be coarser"):
        read_spec(path)
    path.write_text(json.dumps({"gsd_m": 0.5, "input_low_pass_m": -1}))
    with pytest.raises(ModelError, match="input_low_pass_m"):
        read_spec(path)


def test_model_json_names_the_filter_only_when_set(tmp_path: Path) -> None:
    assert "input_low_pass_m" not in spec_json(ModelSpec(gsd_m=0.3))  # bundles as before
    text = spec_json(ModelSpec(gsd_m=0.3, input_low_pass_m=0.6))
    assert json.loads(text)["input_low_pass_m"] == 0.6
    (tmp_path / "model.json").write_text(text)
    assert read_spec(tmp_path).input_low_pass_m == 0.6


def test_the_network_sees_the_input_blurred(make_bundle: Any) -> None:
    """The loaded module is the network behind a Gaussian equal to scipy's (edges replicated,
    3 σ reach), with the network's own weights and state dict."""
    import torch
    from scipy.ndimage import gaussian_filter

    plain = load_module(make_bundle(seed=2, gsd_m=1.0))
    filtered = load_module(make_bundle(seed=2, **LOW_PASS))
    assert isinstance(filtered, LowPassed) and not isinstance(plain, LowPassed)
    assert filtered.sigma == pytest.approx(math.sqrt(8) / 2.35482, rel=1e-4)
    assert list(filtered.state_dict()) == list(plain.state_dict())

    x = np.random.default_rng(0).normal(size=(2, 3, 40, 56)).astype(np.float32)
    blurred = np.stack(
        [
            [gaussian_filter(b, filtered.sigma, mode="nearest", truncate=3.0) for b in img]
            for img in x
        ]
    )
    with torch.no_grad():
        np.testing.assert_allclose(filtered.blur(torch.from_numpy(x)).numpy(), blurred, atol=1e-5)
        got = filtered(torch.from_numpy(x)).numpy()
        want = plain(torch.from_numpy(blurred.astype(np.float32))).numpy()
        unfiltered = plain(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - unfiltered).max() > 1e-2  # the filter changes what the network says


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_prediction_runs_the_filter_and_stays_seamless(
    tmp_path: Path, make_bundle: Any, backend: str
) -> None:
    """96 px chunks vs one window for the whole scene, through each backend; and the output is
    not the unfiltered network's (a random network says nearly the same everywhere, so the
    check is on how many probabilities change, not by how much)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    rng = np.random.default_rng(4)
    scene = write_tif(tmp_path / "s.tif", rng.integers(1, 256, (3, 197, 300), dtype=np.uint8))
    filtered = make_bundle(seed=1, encoder="mobilenet_v2", **FULL, **LOW_PASS)
    plain = make_bundle(seed=1, encoder="mobilenet_v2", **FULL, gsd_m=1.0)

    def run(bundle: Any, out: str, chunk: int) -> np.ndarray:
        options = PredictOptions(
            device="cpu", precision="fp32", chunk=chunk, halo=64, backend=backend
        )
        with open_client(options) as client:
            res = predict_scene(open_scene(scene), bundle, tmp_path / out, options, client)
        with rasterio.open(res.probs) as src:
            return src.read().astype(int)

    small, whole = run(filtered, "small", 96), run(filtered, "whole", 1024)
    assert np.abs(small - whole).max() <= 1
    # the same weights on the same scene: without the filter the output would be identical
    assert (whole != run(plain, "plain", 1024)).mean() > 0.25


def test_openvino_converts_the_filter_with_the_network(make_bundle: Any) -> None:
    pytest.importorskip("openvino")
    from geoseg.models import backends
    from geoseg.models.predictor import BundleFactory, TorchPredictor

    filtered = make_bundle(seed=6, **LOW_PASS)
    plain = make_bundle(seed=6, gsd_m=1.0)
    assert filtered.sha256 == plain.sha256  # the same weights file
    assert backends.conversion_key(filtered) != backends.conversion_key(plain)
    x = np.random.default_rng(1).normal(size=(1, 3, 64, 96)).astype(np.float32)
    factory = BundleFactory(str(filtered.path), filtered.sha256, "cpu", "fp32", backend="openvino")
    got = factory.build()(x)
    want = TorchPredictor(load_module(filtered), "cpu", "fp32")(x)
    assert np.abs(got - want).max() <= 2 / 255


def test_training_runs_the_filter_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geoseg.train.config import parse_config
    from geoseg.train.loop import train
    from tests.test_train import _config

    calls: list[tuple[int, ...]] = []
    blur = LowPassed.blur

    def counted(self: LowPassed, x: Any) -> Any:
        calls.append(tuple(x.shape))
        return blur(self, x)

    monkeypatch.setattr(LowPassed, "blur", counted)
    raw = _config(tmp_path, epochs=1)
    raw["model"]["input_low_pass_m"] = 2.5  # the scene's 1 m grid, blurred to 2.5 m
    train(parse_config(raw, "test"))
    bundle = load_bundle(raw["out"])
    assert bundle.spec.input_low_pass_m == 2.5
    chips = [s for s in calls if s[-2:] == (32, 32)]
    assert chips, "no training or validation chip went through the filter"
    raw["model"]["input_low_pass_m"] = 0.5  # finer than the 1 m the scene is trained at
    raw["out"] = str(tmp_path / "finer")
    with pytest.raises(Exception, match="must be coarser than gsd_m"):
        train(parse_config(raw, "test"))


def test_model_init_records_the_filter_and_info_shows_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from geoseg.cli import cli

    base = ["model", "init", "--encoder", "resnet18", "--encoder-depth", "3"]
    base += ["--decoder-channels", "16,8,8", "--halo", "auto", "--gsd", "1"]
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "m"), "--input-low-pass", "3"])
    assert res.exit_code == 0, res.output
    assert read_spec(tmp_path / "m").input_low_pass_m == 3.0
    res = CliRunner().invoke(cli, ["model", "info", str(tmp_path / "m")])
    assert "input filter: blurred to 3 m (Gaussian, sigma 1.20 px)" in res.output
    res = CliRunner().invoke(cli, [*base, str(tmp_path / "n"), "--input-low-pass", "0.5"])
    assert res.exit_code != 0 and "must be coarser than gsd_m" in res.output
    assert not (tmp_path / "n").exists()


def test_a_pipeline_runs_its_scenes_again_when_the_filter_changes() -> None:
    """The ledger knows the model by its weights' hash, which the filter leaves alone: the
    filter counts in the pipeline's settings hash instead (only when set)."""
    from geoseg.pipeline.config import parse_pipeline
    from tests.test_model_vectorize import PIPELINE

    c = parse_pipeline(PIPELINE, "p.yml")
    plain = ModelSpec(gsd_m=0.3)
    assert c.config_hash(plain) == c.config_hash()  # pipelines hashed before keep their hash
    hashes = {c.config_hash(plain.model_copy(update={"input_low_pass_m": v})) for v in (0.5, 0.6)}
    assert len(hashes | {c.config_hash(plain)}) == 3


def test_workers_that_outlive_a_run_build_the_changed_filter(
    tmp_path: Path, make_bundle: Any
) -> None:
    """One cluster, two runs: model.json's filter set between them (same weights, same path)
    must give the filtered output, not the first run's cached predictor."""
    import shutil

    rng = np.random.default_rng(5)
    scene = write_tif(tmp_path / "s.tif", rng.integers(1, 256, (3, 96, 128), dtype=np.uint8))
    path = tmp_path / "model"
    shutil.copytree(make_bundle(seed=3, gsd_m=1.0).path, path)
    options = PredictOptions(device="cpu", precision="fp32", chunk=64, halo=16)

    def probs(out: Path | None) -> np.ndarray:
        assert out is not None
        with rasterio.open(out) as src:
            return src.read()

    with open_client(options) as client:
        first = predict_scene(open_scene(scene), load_bundle(path), tmp_path / "a", options, client)
        (path / "model.json").write_text(spec_json(read_spec(path).model_copy(update=LOW_PASS)))
        second = predict_scene(
            open_scene(scene), load_bundle(path), tmp_path / "b", options, client
        )
    with open_client(options) as client:  # fresh workers
        fresh = predict_scene(open_scene(scene), load_bundle(path), tmp_path / "c", options, client)
    np.testing.assert_array_equal(probs(second.probs), probs(fresh.probs))
    assert (probs(first.probs) != probs(second.probs)).mean() > 0.25


# --- a run's own input filter (--input-filter, predict.input_filter) -------------------------


def test_input_filter_values_are_checked_and_canonical() -> None:
    from geoseg.errors import ConfigError
    from geoseg.models.input_filter import parse_input_filter

    assert parse_input_filter(" Model") == "model" and parse_input_filter("OFF") == "off"
    assert parse_input_filter(0.80) == "0.8" and parse_input_filter("1") == "1"
    for bad in ("0", "-1", "nan", "inf", "sharp", ""):
        with pytest.raises(ConfigError, match="input filter must be model, off or an effective"):
            parse_input_filter(bad)


def test_a_runs_filter_replaces_the_models_and_a_stronger_one_grows_the_halo() -> None:
    from geoseg.errors import ConfigError
    from geoseg.models.input_filter import filter_reach_px, filtered_spec
    from geoseg.models.lowpass import gaussian_kernel

    for sigma in (0.1, 0.74, 1.0, 1.2, 5.08):  # the halo counts on the kernel's own reach
        assert gaussian_kernel(sigma).numel() == 2 * filter_reach_px(sigma) + 1
    spec = ModelSpec(**LOW_PASS, halo=64)  # σ 1.20 px, reach 4 px; stride 32
    assert filtered_spec(spec, "model") is spec and filtered_spec(spec, "3") is spec
    off = filtered_spec(spec, "off")
    assert off.input_low_pass_m is None and off.halo == 64 and low_pass_sigma_px(off) == 0
    weaker = filtered_spec(spec, "2")  # σ 0.73 px, reach 3 px: the model's halo holds
    assert weaker.input_low_pass_m == 2.0 and weaker.halo == 64
    stronger = filtered_spec(spec, "12")  # σ 5.08 px, reach 16 px: 12 px more, one stride
    assert stronger.input_low_pass_m == 12.0 and stronger.halo == 96
    assert filtered_spec(stronger, "12") == stronger  # applied again: the same
    assert filtered_spec(ModelSpec(gsd_m=1.0, halo=64), "12").halo == 96  # no filter: reach 0
    with pytest.raises(ConfigError, match=r"m/x: the input filter \(0.5 m\) must be coarser"):
        filtered_spec(spec, "0.5", source="m/x")
    with pytest.raises(ConfigError, match="needs the model's gsd_m"):
        filtered_spec(ModelSpec(), "2")
    assert filtered_spec(ModelSpec(), "off").input_low_pass_m is None


def test_predict_takes_the_runs_filter_and_records_it(tmp_path: Path, make_bundle: Any) -> None:
    """``--input-filter off`` on a filtered bundle gives exactly what the same weights give
    without a filter; a stronger filter stays seamless (its halo grown); a filter finer than
    the model is refused before anything is written; the outputs' tag names the choice."""
    from click.testing import CliRunner

    from geoseg.cli import cli

    rng = np.random.default_rng(7)
    scene = write_tif(tmp_path / "s.tif", rng.integers(1, 256, (3, 150, 230), dtype=np.uint8))
    filtered = make_bundle(seed=8, encoder="mobilenet_v2", **FULL, **LOW_PASS, halo=64)
    plain = make_bundle(seed=8, encoder="mobilenet_v2", **FULL, gsd_m=1.0, halo=64)

    def predict(bundle: Any, out: str, *args: str) -> tuple[np.ndarray, dict[str, str]]:
        base = ["predict", str(scene), "--model", str(bundle.path), "--out", str(tmp_path / out)]
        base += ["--device", "cpu", "--precision", "fp32", "--backend", "torch"]
        res = CliRunner().invoke(cli, [*base, *args])
        assert res.exit_code == 0, res.output
        with rasterio.open(tmp_path / out / "s.probs.tif") as src:
            return src.read().astype(int), src.tags()

    default, tags = predict(filtered, "default", "--chunk", "1024")
    off, off_tags = predict(filtered, "off", "--chunk", "1024", "--input-filter", "off")
    want, _ = predict(plain, "plain", "--chunk", "1024")
    np.testing.assert_array_equal(off, want)
    assert (default != off).mean() > 0.25
    assert "GEOSEG_INPUT_FILTER" not in tags and off_tags["GEOSEG_INPUT_FILTER"] == "off"

    strong_whole, strong_tags = predict(filtered, "sw", "--chunk", "1024", "--input-filter", "6")
    strong_tiled, _ = predict(filtered, "st", "--chunk", "64", "--input-filter", "6.0")
    assert np.abs(strong_whole - strong_tiled).max() <= 1
    assert strong_tags["GEOSEG_INPUT_FILTER"] == "6" and (strong_whole != default).mean() > 0.05

    base = ["predict", str(scene), "--model", str(filtered.path), "--out", str(tmp_path / "x")]
    res = CliRunner().invoke(cli, [*base, "--input-filter", "0.5"])
    assert res.exit_code != 0
    assert f"{filtered.path}: the input filter (0.5 m) must be coarser" in res.output
    res = CliRunner().invoke(cli, [*base, "--input-filter", "soft"])
    assert res.exit_code != 0 and "Invalid value for '--input-filter'" in res.output
    assert not (tmp_path / "x").exists()


def test_a_pipeline_takes_its_own_filter(tmp_path: Path) -> None:
    """``predict.input_filter``: validated where the file says it, counted in the settings
    hash only when set (pipelines written before keep theirs), handed to the engine, recorded
    in the outputs, and one the model cannot take fails before any scene runs."""
    from geoseg.errors import ConfigError
    from geoseg.pipeline import load_pipeline, run_pipeline
    from geoseg.pipeline.config import parse_pipeline
    from geoseg.pipeline.planning import dry_run
    from geoseg.pipeline.runner import predict_options
    from tests.pipeline_support import make_model, make_scene, write_pipeline
    from tests.test_model_vectorize import PIPELINE

    base = parse_pipeline(PIPELINE, "p.yml")
    same = parse_pipeline(PIPELINE + "predict: {input_filter: model}\n", "p.yml")
    off = parse_pipeline(PIPELINE + "predict: {input_filter: 'off'}\n", "p.yml")
    bare = parse_pipeline(PIPELINE + "predict:\n  input_filter: off\n", "p.yml")  # YAML: false
    assert bare.predict.input_filter == "off" and bare.config_hash() == off.config_hash()
    with pytest.raises(ConfigError, match="predict.input_filter"):
        parse_pipeline(PIPELINE + "predict: {input_filter: on}\n", "p.yml")  # YAML: true
    metres = parse_pipeline(PIPELINE + "predict: {input_filter: 0.80}\n", "p.yml")
    assert base.config_hash() == same.config_hash()
    assert len({base.config_hash(), off.config_hash(), metres.config_hash()}) == 3
    assert predict_options(off).input_filter == "off"
    assert predict_options(metres).input_filter == "0.8"
    with pytest.raises(ConfigError) as e:
        parse_pipeline(PIPELINE + "predict: {input_filter: soft}\n", "p.yml")
    assert "p.yml" in str(e.value) and "predict.input_filter" in str(e.value)

    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "s0.tif", 0, 0, 96)
    make_model(tmp_path / "model")  # gsd 0.5 m, no filter of its own
    job = tmp_path / "p.yml"
    predict = {"device": "cpu", "precision": "fp32", "chunk": 64}
    fine = load_pipeline(write_pipeline(job, predict={**predict, "input_filter": 0.4}))
    with pytest.raises(ConfigError, match=r"input filter \(0.4 m\) must be coarser"):
        dry_run(fine)
    with pytest.raises(ConfigError, match=r"input filter \(0.4 m\) must be coarser"):
        run_pipeline(fine)
    assert not (tmp_path / "out").exists()
    blurred = load_pipeline(write_pipeline(job, predict={**predict, "input_filter": 1.5}))
    assert [r.status for r in run_pipeline(blurred).results] == ["done"]
    with rasterio.open(tmp_path / "out" / "s0" / "s0.mask.tif") as src:
        assert src.tags()["GEOSEG_INPUT_FILTER"] == "1.5"
    plain = load_pipeline(write_pipeline(job, predict=predict))
    [planned] = dry_run(plain)
    assert planned.action == "run" and planned.reason.startswith("pipeline settings changed")
