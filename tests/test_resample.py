"""Resolution-aware prediction: weights, the virtual model grid, exact seams, nodata, options."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from rasterio.windows import Window

from geoseg.cli import cli
from geoseg.engine import chunks as engine_chunks
from geoseg.engine import options as engine_options
from geoseg.engine import plan as engine_plan
from geoseg.engine.resample import (
    RESAMPLE_TOLERANCE,
    ResampledGrid,
    ResamplePlan,
    apply_taps,
    resample_plan,
    taps,
    weights,
)
from geoseg.io.raster import open_scene
from geoseg.io.reader import reflect_index
from geoseg.models import predictor as predictors
from tests.conftest import write_tif
from tests.test_predict import IdentityFactory, read, run

RATIOS = [0.3, 0.5, 2 / 3, 1.0, 1.37, 2.0, 3.3]

# --- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("kind", ["area", "bilinear", None])
def test_weight_rows_sum_to_one(ratio: float, kind: Any) -> None:
    for start in (-13, 0, 7, 1001):
        t = taps(start, 40, ratio, kind)
        w = weights(start, 40, t.lo - 3, t.hi - t.lo + 5, ratio, kind)
        assert w.dtype == np.float32 and w.shape == (40, t.hi - t.lo + 5)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
        assert (w >= 0).all()


@pytest.mark.parametrize("kind", ["area", "bilinear"])
def test_identity_ratio_gives_identity(kind: Any) -> None:
    np.testing.assert_array_equal(weights(5, 12, 5, 12, 1.0, kind), np.eye(12, dtype=np.float32))
    t = taps(-4, 9, 1.0, kind)
    assert t.weights.shape == (9, 1) and list(t.first) == list(range(-4, 5))


def test_taps_must_fit_the_source_window() -> None:
    with pytest.raises(ValueError, match="do not cover"):
        weights(0, 4, 0, 2, 2.0)  # bilinear at the edge needs source pixels -1 and 2
    with pytest.raises(ValueError, match="do not cover"):
        apply_taps(np.zeros((3, 5), np.float32), taps(0, 4, 0.5), 0, -1)


def test_area_average_of_a_2x_downsample_is_the_2x2_means() -> None:
    img = np.random.default_rng(0).random((2, 12, 18)).astype(np.float32)
    wy, wx = weights(0, 6, 0, 12, 0.5), weights(0, 9, 0, 18, 0.5)
    got = wy @ img @ wx.T
    means = img.reshape(2, 6, 2, 9, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(got, means, rtol=1e-6)
    sep = apply_taps(apply_taps(img, taps(0, 6, 0.5), 0, -2), taps(0, 9, 0.5), 0, -1)
    np.testing.assert_allclose(sep, means, rtol=1e-6)


def test_bilinear_reproduces_a_ramp() -> None:
    """Upsampling a linear ramp by a non-integer ratio gives the ramp at the new centres."""
    ratio = 2.5
    src = np.arange(-5, 30, dtype=np.float64)  # value = source coordinate of the pixel centre
    w = weights(0, 50, -5, 35, ratio)
    centres = (np.arange(50) + 0.5) / ratio - 0.5
    np.testing.assert_allclose(w @ src, centres, atol=1e-5)


@pytest.mark.parametrize("ratio", RATIOS)
def test_constant_stays_constant(ratio: float) -> None:
    plan = ResamplePlan(ratio, 1 / ratio if ratio != 1 else 2.0, halo=8, stride=8)
    core = Window(20, 10, 30, 25)
    model = plan.model_window(core)
    scene = plan.scene_window(model, core)
    data = np.full((2, int(scene.height), int(scene.width)), 77, np.uint8)
    valid = np.ones(data.shape[1:], bool)
    x, ok = plan.to_model(data, valid, scene, model)
    assert ok.all() and x.shape == (2, int(model.height), int(model.width))
    np.testing.assert_allclose(x, 77.0, rtol=1e-6)
    probs = np.full((3, int(model.height), int(model.width)), 0.25, np.float32)
    np.testing.assert_allclose(plan.to_scene(probs, model, core), 0.25, rtol=1e-6)


def _virtual_scene(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (2, h, w), dtype=np.uint8)
    valid = rng.random((h, w)) > 0.2
    return data, valid


def _read(data: np.ndarray, valid: np.ndarray, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """What read_padded returns for ``win`` of this array: reflected outside it."""
    rows = reflect_index(int(win.row_off), int(win.height), data.shape[1])
    cols = reflect_index(int(win.col_off), int(win.width), data.shape[2])
    return data[:, rows][:, :, cols], valid[rows][:, cols]


@pytest.mark.parametrize("rx, ry", [(0.5, 0.5), (2.0, 2.0), (0.37, 1.0), (1.6, 0.7)])
def test_virtual_model_pixels_do_not_depend_on_the_window(rx: float, ry: float) -> None:
    """Two overlapping model windows, each read from its own scene window, agree bit for bit
    on the model pixels they share; so do two cores' back-resampled probabilities."""
    data, valid = _virtual_scene(1, 37, 45)
    plan = ResamplePlan(rx, ry, halo=8, stride=8)
    a, b = Window(-16, -8, 48, 40), Window(8, 16, 40, 32)  # model windows that overlap
    out = []
    for model in (a, b):
        scene = plan.scene_window(model, Window(0, 0, 1, 1))
        x, ok = plan.to_model(*_read(data, valid, scene), scene, model)
        out.append((x, ok))
    (xa, oka), (xb, okb) = out
    rows, cols = slice(24, 40), slice(24, 48)  # the overlap, in a's coordinates
    np.testing.assert_array_equal(xa[:, rows, cols], xb[:, 0:16, 0:24])
    np.testing.assert_array_equal(oka[rows, cols], okb[0:16, 0:24])
    assert 0 < oka.mean() < 1
    # back onto the scene: two windows of probabilities over the same virtual model grid
    model_probs = np.random.default_rng(2).random((3, 200, 200)).astype(np.float32)
    core = Window(5, 7, 9, 11)
    got = []
    for extra in (0, 8):
        m = plan.model_window(core)
        m = Window(m.col_off - extra, m.row_off - extra, m.width + 2 * extra, m.height + extra)
        sl = model_probs[
            :, 50 + int(m.row_off) : 50 + int(m.row_off + m.height), 50 + int(m.col_off) :
        ][:, :, : int(m.width)]
        got.append(plan.to_scene(sl, m, core))
    np.testing.assert_array_equal(got[0], got[1])


def test_model_windows_are_aligned_and_cover_the_halo() -> None:
    plan = ResamplePlan(0.5, 2.0, halo=16, stride=32)
    grid = ResampledGrid.for_chunk(300, 200, 64, plan)
    assert (grid.core_width, grid.core_height) == (128, 32)
    cores = [c.core for c in grid]
    assert sum(int(c.width) * int(c.height) for c in cores) == 300 * 200
    for chunk in grid:
        m, core = chunk.padded, chunk.core
        assert m.col_off % 32 == 0 and m.row_off % 32 == 0
        assert m.width % 32 == 0 and m.height % 32 == 0
        bx = taps(int(core.col_off), int(core.width), 1 / plan.ratio_x)
        by = taps(int(core.row_off), int(core.height), 1 / plan.ratio_y)
        assert m.col_off <= bx.lo - 16 and bx.hi + 16 <= m.col_off + m.width
        assert m.row_off <= by.lo - 16 and by.hi + 16 <= m.row_off + m.height
    assert grid.redundancy > 1
    assert len(list(grid.in_stripes(1))) == len(grid)


def test_plan_only_beyond_the_tolerance() -> None:
    assert resample_plan((1.0, 1.0), None, 16, 8) is None
    assert resample_plan((1.04, 0.97), 1.0, 16, 8) is None
    plan = resample_plan((1.0, 1.04), 0.5, 16, 8)
    assert plan is not None and plan.ratio_x == 2.0 and plan.ratio_y == 2.08
    plan = resample_plan((1.0 + 2 * RESAMPLE_TOLERANCE, 1.0), 1.0, 16, 8)
    assert plan is not None and plan.ratio_y == 1.0  # an axis within the tolerance stays
    assert pickle.loads(pickle.dumps(plan)) == plan


# --- end to end ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvFactory:
    """A random 3x3 convolution and softmax: a model with a one-pixel receptive field."""

    seed: int = 0

    def build(self) -> Any:
        import torch

        torch.manual_seed(self.seed)
        conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.normal_(conv.weight, std=2.0)
        return predictors.TorchPredictor(conv, "cpu", "fp32")


class Grid(TypedDict):
    """A scene's georeferencing, as ``write_tif`` takes it."""

    crs: str
    transform: Affine


UTM_1M: Grid = {"crs": "EPSG:32633", "transform": Affine(1.0, 0, 500_000, 0, -1.0, 5_000_000)}
#: 1e-5 degrees at 60° N: about 0.56 m east-west, 1.11 m north-south
GEO_60N: Grid = {"crs": "EPSG:4326", "transform": Affine(1e-5, 0, 10.0, 0, -1e-5, 60.0)}


def _scene(tmp: Path, name: str, h: int, w: int, nodata: bool = True, **geo: Any) -> Path:
    rng = np.random.default_rng(len(name))
    data = rng.integers(1, 256, (3, h, w), dtype=np.uint8)
    if nodata:
        data[:, 10:30, 40:75] = 0  # a hole across chunk seams
        data[:, h - 1, 3] = 0  # a single pixel at the edge
    return write_tif(tmp / f"{name}.tif", data, nodata=0 if nodata else None, **geo)


@pytest.mark.parametrize(
    "gsd, geo, chunk, expect",
    [
        (0.5, UTM_1M, 32, (2.0, 2.0)),  # model grid finer: bilinear in, area average back
        (2.0, UTM_1M, 16, (0.5, 0.5)),  # coarser: area average in, bilinear back
        (0.56, GEO_60N, 32, (1.0, 1.994)),  # per axis: x within the tolerance, y resampled
    ],
)
@pytest.mark.parametrize("factory", [IdentityFactory("resample"), ConvFactory(3)])
def test_tiled_equals_whole_scene(
    tmp_path: Path,
    make_bundle: Any,
    gsd: float,
    geo: dict[str, Any],
    chunk: int,
    expect: tuple[float, float],
    factory: Any,
) -> None:
    scene = _scene(tmp_path, "s", 83, 101, **geo)
    bundle = make_bundle(gsd_m=gsd)  # stride 8
    small = run(scene, bundle, tmp_path / "small", factory, chunk=chunk, halo=8)
    whole = run(scene, bundle, tmp_path / "whole", factory, chunk=1024, halo=8)
    assert small.chunks > 4 and whole.chunks == 1
    assert small.resampled == pytest.approx(expect, rel=0.01)
    a, b = read(small.probs).astype(int), read(whole.probs).astype(int)
    assert np.abs(a - b).max() <= 2
    np.testing.assert_array_equal(read(small.mask), read(whole.mask))


@pytest.mark.parametrize("gsd", [0.5, 2.0])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_nodata_exactly_where_the_scene_has_none(
    tmp_path: Path, make_bundle: Any, gsd: float, dtype: str
) -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(1, 256, (3, 70, 90)).astype(dtype)
    invalid = rng.random((70, 90)) < 0.05
    invalid[20:41, 30:52] = True
    fill = np.nan if dtype == "float32" else 0
    data[:, invalid] = fill
    nodata = None if dtype == "float32" else 0
    scene = write_tif(tmp_path / "nd.tif", data, nodata=nodata, **UTM_1M)
    bundle = make_bundle(gsd_m=gsd, dtype=dtype)
    out = run(scene, bundle, tmp_path / "o", ConvFactory(1), chunk=32, halo=8)
    assert out.resampled is not None
    mask = read(out.mask)[0]
    np.testing.assert_array_equal(mask == engine_options.MASK_NODATA, invalid)
    with rasterio.open(out.probs) as src:
        np.testing.assert_array_equal(src.dataset_mask() == 0, invalid)
        assert (src.read()[:, invalid] == 0).all()


def test_all_nodata_cores_are_skipped(tmp_path: Path, make_bundle: Any) -> None:
    data = np.random.default_rng(2).integers(1, 256, (3, 64, 96), dtype=np.uint8)
    data[:, :, :40] = 0
    scene = write_tif(tmp_path / "sk.tif", data, nodata=0, **UTM_1M)
    bundle = make_bundle(gsd_m=0.5)
    out = run(scene, bundle, tmp_path / "o", IdentityFactory("sk"), chunk=64)
    grid = engine_plan.scene_grid(
        open_scene(scene), bundle.spec, engine_options.PredictOptions(chunk=64)
    )
    empty = sum(1 for c in grid if c.core.col_off + c.core.width <= 40)
    assert out.resampled is not None and out.chunks == len(grid) and empty > 0
    assert out.skipped == empty
    assert (read(out.mask)[0, :, :40] == engine_options.MASK_NODATA).all()


def test_no_resample_is_todays_behaviour(tmp_path: Path, make_bundle: Any) -> None:
    """--no-resample gives what a model without a GSD gives (today's path), and warns."""
    scene = _scene(tmp_path, "nr", 70, 90, **UTM_1M)
    plain = run(scene, make_bundle(), tmp_path / "plain", ConvFactory(2), chunk=32, halo=8)
    with pytest.warns(UserWarning, match=r"ground sample distance 1 m is 3.3x the model's 0.3 m"):
        off = run(
            scene,
            make_bundle(gsd_m=0.3),
            tmp_path / "off",
            ConvFactory(2),
            chunk=32,
            halo=8,
            resample=False,
        )
    assert off.resampled is None and off.chunks == plain.chunks
    for name in ("probs", "mask"):
        np.testing.assert_array_equal(read(getattr(off, name)), read(getattr(plain, name)))


def test_resampling_does_not_warn_about_the_gsd(tmp_path: Path, make_bundle: Any) -> None:
    import warnings

    scene = _scene(tmp_path, "w", 40, 40, **UTM_1M)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(scene, make_bundle(gsd_m=0.3), tmp_path / "o", IdentityFactory("w"), chunk=64)
    assert out.resampled is not None and out.warnings == []
    assert not [w for w in caught if "ground sample distance" in str(w.message)]


def test_scene_within_the_tolerance_is_not_resampled(tmp_path: Path, make_bundle: Any) -> None:
    scene = _scene(tmp_path, "tol", 70, 90, **UTM_1M)  # 1.0004 m on the ground
    plain = run(scene, make_bundle(), tmp_path / "plain", ConvFactory(4), chunk=32, halo=8)
    near = run(scene, make_bundle(gsd_m=1.04), tmp_path / "near", ConvFactory(4), chunk=32, halo=8)
    assert near.resampled is None
    for name in ("probs", "mask"):
        np.testing.assert_array_equal(read(getattr(near, name)), read(getattr(plain, name)))
    far = run(scene, make_bundle(gsd_m=0.9), tmp_path / "far", ConvFactory(4), chunk=32, halo=8)
    assert far.resampled == pytest.approx((1.1116, 1.1116), rel=1e-3)


def test_distributed_plan_pickles(tmp_path: Path, make_bundle: Any) -> None:
    scene = open_scene(_scene(tmp_path, "pk", 40, 50, **UTM_1M))
    options = engine_options.PredictOptions(device="cpu", chunk=32, halo=8)
    grid = engine_plan.scene_grid(scene, make_bundle(gsd_m=0.5).spec, options)
    assert isinstance(grid, ResampledGrid)
    spec = make_bundle(gsd_m=0.5).spec
    plan = engine_chunks.ChunkPlan(scene, (1, 2, 3), spec.normalization, 3, grid.plan)
    again = pickle.loads(pickle.dumps(plan))
    assert again.resample == plan.resample and again.scene.path == plan.scene.path
    chunks = list(grid)[:2]
    direct = engine_chunks.predict_chunks(plan, chunks, IdentityFactory("pk"))
    via_pickle = engine_chunks.predict_chunks(again, chunks, IdentityFactory("pk"))
    for x, y in zip(direct, via_pickle, strict=True):
        np.testing.assert_array_equal(x.probs, y.probs)


def test_cli_no_resample(tmp_path: Path, make_bundle: Any) -> None:
    scene = _scene(tmp_path, "cli", 40, 50, **UTM_1M)
    model = str(make_bundle(gsd_m=0.5).path)
    outs = {}
    for flag in ("--resample", "--no-resample"):
        out = tmp_path / flag.strip("-")
        res = CliRunner().invoke(
            cli, ["predict", str(scene), "-m", model, "-o", str(out), "--device", "cpu"] + [flag]
        )
        assert res.exit_code == 0, res.output
        outs[flag] = (res.output, read(out / "cli.probs.tif"))
    assert "read at the model's 0.5 m" in outs["--resample"][0]
    assert "read at" not in outs["--no-resample"][0]
    assert not np.array_equal(outs["--resample"][1], outs["--no-resample"][1])
    res = CliRunner().invoke(cli, ["predict", "--help"])
    assert "--resample / --no-resample" in res.output


def test_pipeline_resample_field() -> None:
    from geoseg.errors import ConfigError
    from geoseg.pipeline.config import parse_pipeline
    from geoseg.pipeline.runner import predict_options

    good = "schema_version: 1\nname: r\ninputs:\n  paths: [a.tif]\nmodel: m\noutputs:\n  dir: o\n"
    default = parse_pipeline(good, "p.yml")
    assert default.predict.resample is True and predict_options(default).resample is True
    off = parse_pipeline(good + "predict:\n  resample: false\n", "p.yml")
    assert predict_options(off).resample is False
    assert off.config_hash() != default.config_hash()
    with pytest.raises(ConfigError, match="predict.resampel: unknown field"):
        parse_pipeline(good + "predict:\n  resampel: false\n", "p.yml")
