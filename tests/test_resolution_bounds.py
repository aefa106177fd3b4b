"""Resolution-aware prediction and training have bounds: scenes far off the model's GSD are
refused in one line before any work starts, and the work and memory a resampled scene implies
are computed up front."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from affine import Affine
from click.testing import CliRunner
from rasterio.windows import Window

from geoseg.cli import cli
from geoseg.engine import options as engine_options
from geoseg.engine import plan as engine_plan
from geoseg.engine import scene as engine_scene
from geoseg.engine.resample import ResampledGrid, ResamplePlan, taps
from geoseg.errors import ConfigError, InputError
from geoseg.io.raster import open_scene
from geoseg.pipeline.config import PipelineConfig
from geoseg.pipeline.runner import predict_options
from geoseg.train.config import parse_config
from geoseg.train.dataset import prepare
from tests.conftest import write_tif
from tests.test_predict import IdentityFactory, run
from tests.test_train import ORIGIN, _config

UTM = "EPSG:32645"
X0, Y0 = 3e5, 3e6

#: name: (width, height, pixel size x, pixel size y, CRS, x0, y0) of each awkward scene
SCENES = {
    "s10m": (256, 256, 10.0, 10.0, UTM, X0, Y0),
    "s30m": (64, 64, 30.0, 30.0, UTM, X0, Y0),
    "s1cm": (512, 512, 0.01, 0.01, UTM, X0, Y0),
    "tiny": (64, 64, 1e-9, 1e-9, UTM, X0, Y0),
    "globe": (64, 64, 5.625, 2.8125, "EPSG:4326", -180.0, 90.0),
}


def mk(tmp: Path, name: str) -> Path:
    """A 3-band uint8 GeoTIFF of random pixels with the size, pixel size, CRS and corner of
    ``SCENES[name]``."""
    w, h, rx, ry, crs, x0, y0 = SCENES[name]
    data = np.random.default_rng(0).integers(0, 256, (3, h, w), dtype=np.uint8)
    return write_tif(tmp / f"{name}.tif", data, crs=crs, transform=Affine(rx, 0, x0, 0, -ry, y0))


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test as soon as the model loads or a scene's prediction starts."""

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started")

    monkeypatch.setattr(engine_scene, "warm_up", started)
    monkeypatch.setattr(engine_scene, "predict_scene", started)


@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.usefixtures("no_work")
def test_cli_refuses_scenes_far_off_the_models_gsd(
    tmp_path: Path, make_bundle: Any, name: str
) -> None:
    scene = mk(tmp_path, name)
    out = tmp_path / "o"
    model = str(make_bundle(gsd_m=0.3).path)
    args = ["predict", str(scene), "-m", model, "-o", str(out), "--device", "cpu"]
    res = CliRunner().invoke(cli, [*args, "--chunk", "100000"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    line = lines[0]
    assert line.startswith(f"geoseg: error: {scene}: ground resolution ")
    assert "the model's 0.3 m" in line
    for way in ("gdalwarp", "--no-resample", "--max-resample-ratio"):
        assert way in line
    if name != "tiny":
        assert "resampling limit" in line and "8x" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "name, res, way",
    [
        ("s10m", "10 x 10 m", "33.3x coarser"),
        ("s30m", "30 x 30 m", "100x coarser"),
        ("s1cm", "0.01 x 0.01 m", "30x finer"),
        ("tiny", "1e-09 x 1e-09 m", "3e+08x finer"),
    ],
)
def test_engine_refuses_before_planning_chunks(
    tmp_path: Path, make_bundle: Any, name: str, res: str, way: str
) -> None:
    scene = open_scene(mk(tmp_path, name))
    spec = make_bundle(gsd_m=0.3).spec
    expected = re.escape(f"ground resolution {res} per pixel is {way}")
    with pytest.raises(InputError, match=expected) as exc:
        engine_plan.scene_grid(
            scene, spec, engine_options.PredictOptions(device="cpu", chunk=100000)
        )
    assert "\n" not in str(exc.value)
    # as they are, these scenes are not resampled, so not refused either
    grid = engine_plan.scene_grid(
        scene, spec, engine_options.PredictOptions(device="cpu", resample=False)
    )
    assert not isinstance(grid, ResampledGrid)


def test_whole_globe_is_refused(tmp_path: Path, make_bundle: Any) -> None:
    scene = open_scene(mk(tmp_path, "globe"))
    with pytest.raises(InputError, match=r"coarser than the model's 0.3 m, beyond the 8x"):
        engine_plan.check_resolution(
            scene, make_bundle(gsd_m=0.3).spec, engine_options.PredictOptions()
        )


def test_ratio_limit_is_configurable(tmp_path: Path, make_bundle: Any) -> None:
    scene = open_scene(mk(tmp_path, "s10m"))  # 33x the model's 0.3 m
    spec = make_bundle(gsd_m=0.3).spec
    with pytest.raises(InputError, match="beyond the 32x resampling limit"):
        engine_plan.check_resolution(
            scene, spec, engine_options.PredictOptions(max_resample_ratio=32)
        )
    engine_plan.check_resolution(scene, spec, engine_options.PredictOptions(max_resample_ratio=34))
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="max resample ratio"):
            engine_options.PredictOptions(max_resample_ratio=bad)


def test_large_chunk_on_a_coarse_scene_is_refused_up_front(
    tmp_path: Path, make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the ratio limit, the model window of ``--chunk 100000`` on a 10 m scene (the whole
    scene, 8533² model px) is checked against the memory before anything is allocated."""
    scene = mk(tmp_path, "s10m")
    monkeypatch.setattr(engine_plan, "available_bytes", lambda device: 2**30)
    with pytest.raises(ConfigError, match=r"needs at least \d+\.\d GiB, more than the 1.0 GiB"):
        run(
            scene,
            make_bundle(gsd_m=0.3),
            tmp_path / "o",
            IdentityFactory("never built"),
            chunk=100000,
            max_resample_ratio=40,
        )
    assert not (tmp_path / "o").exists()


def test_resampling_memory_of_a_fine_scene_is_in_the_working_set(
    tmp_path: Path, make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 1 cm scene read at 0.3 m, a 96² px model window reads 30 times as many scene
    pixels per axis: the forward pass fits, resampling its scene window does not."""
    scene = mk(tmp_path, "s1cm")
    bundle = make_bundle(gsd_m=0.3)
    options = engine_options.PredictOptions(device="cpu", max_resample_ratio=64)
    grid = engine_plan.scene_grid(open_scene(scene), bundle.spec, options)
    assert isinstance(grid, ResampledGrid)
    first = grid.at(0, 0)
    forward = engine_plan.forward_bytes_lower_bound(
        bundle.spec, 1, int(first.padded.height), int(first.padded.width)
    )
    scene_window = grid.plan.scene_window(first.padded, first.core)
    assert scene_window.width * scene_window.height > 500 * first.padded.width**2
    budget = 4 * forward  # the forward pass alone fits
    monkeypatch.setattr(engine_plan, "available_bytes", lambda device: budget)
    with pytest.raises(ConfigError, match="a forward pass and resampling on 1 window"):
        run(scene, bundle, tmp_path / "o", IdentityFactory("never built"), max_resample_ratio=64)
    assert not (tmp_path / "o").exists()


def test_a_gpu_checks_resampling_against_this_machines_memory(
    make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_bundle(gsd_m=0.3).spec
    monkeypatch.setattr(engine_plan, "resolve_device", lambda device: device)
    monkeypatch.setattr(
        engine_plan, "available_bytes", lambda device: 2**40 if device.startswith("cuda") else 2**20
    )
    window = Window(0, 0, 96, 96)
    engine_plan.check_working_set(spec, window, 1, "cuda:0", host_bytes=2**19)
    with pytest.raises(ConfigError, match="resampling 1 window"):
        engine_plan.check_working_set(spec, window, 1, "cuda:0", host_bytes=2**21)


def test_degenerate_pixel_size_is_a_clear_error() -> None:
    """1e-9 m pixels read at 0.3 m once asked numpy for 286 GiB."""
    with pytest.raises(ValueError, match=r"needs about 1\.92e\+10 source taps"):
        taps(0, 64, 1e-9 / 0.3)


def test_work_is_counted_without_visiting_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 791 x 718 scene at 300 m read at 0.3 m plans 567,938 chunks; its model pixels and
    redundancy are computed from one row and one column of them."""
    plan = ResamplePlan(1000.0, 1000.0, 288, 32)
    grid = ResampledGrid.for_chunk(791, 718, 1024, plan)
    assert len(grid) == 567_938

    def every_chunk(self: Any) -> Any:
        raise AssertionError("visited every chunk")

    small = ResampledGrid.for_chunk(83, 101, 64, ResamplePlan(1.37, 2.0, 8, 8))
    expected = sum(int(c.padded.width) * int(c.padded.height) for c in small)
    monkeypatch.setattr(ResampledGrid, "__iter__", every_chunk)
    assert small.model_pixels == expected
    assert small.redundancy == pytest.approx(expected / (83 * 1.37 * 101 * 2.0))
    assert grid.model_pixels > 567_938 * 576**2 and grid.redundancy > 1


def test_the_log_names_the_work_and_ratio(
    tmp_path: Path, make_bundle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    scene = write_tif(tmp_path / "two.tif", data, crs=UTM, transform=Affine(1, 0, X0, 0, -1, Y0))
    bundle = make_bundle(gsd_m=0.5)
    caplog.set_level(logging.INFO, logger="geoseg")
    out = run(scene, bundle, tmp_path / "o", IdentityFactory("log"), chunk=32, halo=8)
    grid = engine_plan.scene_grid(
        open_scene(scene), bundle.spec, engine_options.PredictOptions(chunk=32, halo=8)
    )
    assert isinstance(grid, ResampledGrid) and out.chunks == len(grid)
    text = caplog.text
    assert "model pixels per scene pixel" in text and f"): {len(grid)} chunks, " in text
    assert f"{float(grid.model_pixels):.3g} model pixels" in text


# --- pipelines ----------------------------------------------------------------------------


def _pipeline(tmp_path: Path, **predict: Any) -> PipelineConfig:
    raw = {
        "schema_version": 1,
        "name": "bounds",
        "inputs": {"paths": [str(tmp_path / "*.tif")]},
        "model": str(tmp_path / "model"),
        "outputs": {"dir": str(tmp_path / "out")},
        "predict": predict,
    }
    return PipelineConfig.model_validate(yaml.safe_load(yaml.safe_dump(raw)))


def test_pipeline_max_resample_ratio(tmp_path: Path) -> None:
    default = _pipeline(tmp_path)
    assert default.predict.max_resample_ratio == 8.0
    assert predict_options(default).max_resample_ratio == 8.0
    # hashed only when set: pipelines written before it keep their hash
    assert _pipeline(tmp_path, max_resample_ratio=8).config_hash() == default.config_hash()
    raised = _pipeline(tmp_path, max_resample_ratio=40)
    assert raised.config_hash() != default.config_hash()
    assert predict_options(raised).max_resample_ratio == 40.0
    with pytest.raises(ValueError, match="max_resample_ratio"):
        _pipeline(tmp_path, max_resample_ratio=0.5)


# --- training -----------------------------------------------------------------------------


def test_training_refuses_a_scene_far_off_the_models_gsd(tmp_path: Path) -> None:
    """A 64² scene at 30 m for a 0.3 m model once gave 1,326 validation chips from 4,096
    pixels."""
    raw = _config(tmp_path)
    data = np.random.default_rng(0).integers(1, 256, (1, 64, 64), dtype=np.uint8)
    image = write_tif(
        tmp_path / "coarse.tif",
        data,
        crs="EPSG:32616",
        transform=Affine(30, 0, ORIGIN[0], 0, -30, ORIGIN[1]),
    )
    raw["scenes"][0]["image"] = str(image)
    raw["model"]["gsd_m"] = 0.3
    with pytest.raises(InputError) as exc:
        prepare(parse_config(raw, "test"))
    msg = str(exc.value)
    assert msg.startswith(f"{image}: ground resolution 30 x 30 m per pixel is 100x coarser")
    assert "beyond the 8x resampling limit" in msg and "resample: false" in msg
    assert "max_resample_ratio" in msg and "\n" not in msg
    raw["max_resample_ratio"] = 101
    assert parse_config(raw, "test").max_resample_ratio == 101
