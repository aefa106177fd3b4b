"""Test-time augmentation: the average over flips and quarter turns, seamless tiles, the CLI,
pipeline files and the ledger."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.engine import chunks as engine_chunks
from geoseg.engine import options as engine_options
from geoseg.engine import plan as engine_plan
from geoseg.engine import scene as engine_scene
from geoseg.engine.cluster import open_client
from geoseg.engine.options import PredictOptions
from geoseg.engine.scene import predict_scene
from geoseg.errors import ConfigError
from geoseg.io.raster import open_scene
from geoseg.models import backends as backends_mod
from geoseg.models.predictor import TorchPredictor
from tests.conftest import write_tif

# --- a model that is not flip- or turn-equivariant -------------------------------------------


def skewed_module(seed: int = 0, bands: int = 3, classes: int = 3) -> Any:
    """Asymmetric convolutions around a 2x2 pooling: no flip or turn maps its output onto the
    output of the flipped or turned input. Receptive field: 5 px on each side."""
    import torch

    torch.manual_seed(seed)
    first = torch.nn.Conv2d(bands, 8, 3, padding=1)
    last = torch.nn.Conv2d(8, classes, 3, padding=1)
    for conv in (first, last):
        torch.nn.init.normal_(conv.weight, std=1.5)
        with torch.no_grad():
            conv.weight[..., 0, :] *= 3.0  # top row heavier than the bottom one
            conv.weight[..., :, 2] *= -2.0  # right column of the opposite sign
    return torch.nn.Sequential(
        first,
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        last,
        torch.nn.Upsample(scale_factor=2, mode="nearest"),
    )


@dataclasses.dataclass(frozen=True)
class SkewedFactory:
    """:func:`skewed_module` on the CPU in fp32 with test-time augmentation ``tta``."""

    tta: str = "none"
    seed: int = 0

    def build(self) -> TorchPredictor:
        return TorchPredictor(skewed_module(self.seed), "cpu", "fp32", tta=self.tta)


#: The dihedral group on (..., H, W) arrays, written out by hand: (transform, inverse).
D4: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda a: a, lambda a: a),
    "flip lr": (lambda a: a[..., :, ::-1], lambda a: a[..., :, ::-1]),
    "flip ud": (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    "half turn": (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1]),
    "transpose": (lambda a: np.swapaxes(a, -1, -2), lambda a: np.swapaxes(a, -1, -2)),
    "anti-transpose": (
        lambda a: np.swapaxes(a, -1, -2)[..., ::-1, ::-1],
        lambda a: np.swapaxes(a[..., ::-1, ::-1], -1, -2),
    ),
    "quarter turn": (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, -1, (-2, -1))),
    "three quarters": (lambda a: np.rot90(a, 3, (-2, -1)), lambda a: np.rot90(a, -3, (-2, -1))),
}
GROUPS = {"flips": ["identity", "flip lr", "flip ud", "half turn"], "d4": list(D4)}


def by_hand(batch: np.ndarray, names: list[str]) -> np.ndarray:
    """The average of softmax(module(g x)) brought back by g's inverse, over ``names``."""
    import torch

    module = skewed_module().eval()
    total = np.zeros((batch.shape[0], 3, *batch.shape[2:]), np.float64)
    for name in names:
        fwd, inv = D4[name]
        with torch.no_grad():
            y = module(torch.from_numpy(np.ascontiguousarray(fwd(batch))))
            total += inv(torch.softmax(y, dim=1).numpy())
    return total / len(names)


def batch(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_average_of_the_transformed_passes(tta: str) -> None:
    """Non-square windows (turned ones are W x H), a model that no transform maps onto
    itself: the output is the hand-made average, and differs from a plain pass."""
    x = batch()
    got = SkewedFactory(tta).build()(x)
    plain = SkewedFactory().build()(x)
    want = by_hand(x, GROUPS[tta])
    assert got.shape == plain.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(plain, by_hand(x, ["identity"]), atol=2e-6)
    assert np.abs(got - plain).max() > 0.05
    # the transforms are the group itself, each once: no other set gives this average
    others = [n for n in D4 if n not in GROUPS[tta]]
    if others:
        assert np.abs(got - by_hand(x, [*GROUPS[tta][:-1], others[0]])).max() > 0.01


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_predictor_is_equivariant(tta: str) -> None:
    """Averaged over a group, the predictor commutes with that group's transforms, although
    the model does not: P(g x) = g P(x) for each g (square windows for the quarter turns)."""
    x = batch(32, 32, seed=3)
    pred, plain = SkewedFactory(tta).build(), SkewedFactory().build()
    p = pred(x)
    for name in GROUPS[tta][1:]:
        fwd, _ = D4[name]
        gx = np.ascontiguousarray(fwd(x))
        np.testing.assert_allclose(pred(gx), fwd(p), atol=2e-6, err_msg=name)
        assert np.abs(plain(gx) - fwd(plain(x))).max() > 0.05, name


def test_d4_of_a_symmetric_image_is_symmetric_probabilities() -> None:
    """An image that every flip and turn leaves as it is: the d4 output is the same under
    every transform too, and still probabilities; the plain pass is not symmetric."""
    x = batch(32, 32, seed=5)
    # symmetrize: the mean of the image's 8 transforms
    sym = sum(np.ascontiguousarray(fwd(x)) for fwd, _ in D4.values()) / 8
    sym = np.ascontiguousarray(sym, dtype=np.float32)
    for fwd, _ in D4.values():
        np.testing.assert_allclose(fwd(sym), sym, atol=1e-6)
    p = SkewedFactory("d4").build()(sym)
    plain = SkewedFactory().build()(sym)
    for name, (fwd, _) in D4.items():
        np.testing.assert_allclose(fwd(p), p, atol=2e-6, err_msg=name)
    assert np.abs(D4["flip lr"][0](plain) - plain).max() > 0.05
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p.min() >= 0.0 and p.max() <= 1.0


def test_identity_module_round_trips_and_leaves_its_input_alone() -> None:
    """Without an activation a module may return its input's memory: the sum must not be
    accumulated into the caller's array (one band: its channels-last copy is itself)."""
    import torch

    x = np.ascontiguousarray(batch(16, 40)[:, :1])
    keep = x.copy()
    out = TorchPredictor(torch.nn.Identity(), activation=None, tta="d4")(x)
    np.testing.assert_array_equal(x, keep)
    np.testing.assert_allclose(out, keep, atol=1e-6)


def test_quantized_on_device_path_averages_too() -> None:
    """:meth:`TorchPredictor.quantized` (the GPU path, here in torch on the CPU) quantizes the
    average, as the host path does."""
    x = batch(24, 40, seed=7)
    pred = SkewedFactory("d4").build()
    (q, classes), _ = pred.quantized(x, [(0, 0, 24, 40)] * 2)
    want_q, want_classes = engine_chunks._quantize(pred(x)[0])
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(classes, want_classes)


# --- seams ------------------------------------------------------------------------------------


def run(scene: Path, bundle: Any, out: Path, factory: Any, **opts: Any) -> Any:
    options = PredictOptions(device="cpu", precision="fp32", **opts)
    with open_client(options) as client:
        return predict_scene(open_scene(scene), bundle, out, options, client, factory=factory)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def assert_tiles_equal_whole(scene: Path, bundle: Any, tmp: Path, factory: Any, chunk: int) -> Any:
    """Tiled outputs equal one whole-scene window's; returns the tiled result."""
    small = run(scene, bundle, tmp / "small", factory, chunk=chunk, halo=16)
    whole = run(scene, bundle, tmp / "whole", factory, chunk=1024, halo=16)
    assert small.chunks > 4 and whole.chunks == 1
    a, b = read(small.probs).astype(int), read(whole.probs).astype(int)
    assert np.abs(a - b).max() <= 1
    np.testing.assert_array_equal(read(small.mask), read(whole.mask))
    return small


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tiles_equal_the_whole_scene(tmp_path: Path, make_bundle: Any, tta: str) -> None:
    """Chunks of 32 px with a 16 px halo, on a 150 x 97 scene: edge chunks give non-square
    windows (turned ones run as W x H); still the same as one window for the whole scene."""
    rng = np.random.default_rng(1)
    scene = write_tif(tmp_path / "s.tif", rng.integers(1, 256, (3, 97, 150), dtype=np.uint8))
    bundle = make_bundle()  # stride 8, no GSD: read as it is
    grid = engine_plan.scene_grid(open_scene(scene), bundle.spec, PredictOptions(chunk=32, halo=16))
    sides = {(int(c.padded.height), int(c.padded.width)) for c in grid}
    assert any(h != w for h, w in sides) and all(h % 8 == 0 and w % 8 == 0 for h, w in sides)
    small = assert_tiles_equal_whole(scene, bundle, tmp_path, SkewedFactory(tta), 32)
    plain = run(scene, bundle, tmp_path / "plain", SkewedFactory(), chunk=32, halo=16)
    assert (read(small.mask) != read(plain.mask)).mean() > 0.01  # tta changed the result


@pytest.mark.parametrize("gsd, chunk", [(0.5, 32), (2.0, 16)])
def test_tiles_equal_the_whole_scene_when_resampled(
    tmp_path: Path, make_bundle: Any, gsd: float, chunk: int
) -> None:
    """The same at the model's GSD: windows on the virtual model grid, probabilities brought
    back onto the scene's pixels after the average."""
    rng = np.random.default_rng(2)
    data = rng.integers(1, 256, (3, 83, 101), dtype=np.uint8)
    data[:, 10:30, 40:75] = 0  # nodata across chunk seams
    scene = write_tif(tmp_path / "r.tif", data, nodata=0)
    bundle = make_bundle(gsd_m=gsd)
    small = assert_tiles_equal_whole(scene, bundle, tmp_path, SkewedFactory("d4"), chunk)
    assert small.resampled is not None
    assert (read(small.mask)[0, 10:30, 40:75] == engine_options.MASK_NODATA).all()


# --- options, CLI, pipelines, ledger ----------------------------------------------------------


def test_modes_and_bad_values() -> None:
    assert [len(backends_mod.tta_transforms(m)) for m in backends_mod.TTA] == [1, 4, 8]
    assert backends_mod.TTA == ("none", "flips", "d4")
    with pytest.raises(ConfigError, match=r"tta must be one of none, flips, d4, got 'd8'"):
        PredictOptions(tta="d8")
    with pytest.raises(ConfigError, match="tta must be one of"):
        TorchPredictor(skewed_module(), tta="rot")


def test_bundle_factory_carries_the_mode(make_bundle: Any) -> None:
    bundle = make_bundle()
    factory = engine_scene.bundle_factory(bundle, PredictOptions(device="cpu", tta="flips"))
    assert factory.tta == "flips"
    assert factory != engine_scene.bundle_factory(bundle, PredictOptions(device="cpu"))
    pred = factory.build()
    assert isinstance(pred, TorchPredictor) and len(pred.transforms) == 4


def test_working_set_counts_the_copies(make_bundle: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rasterio.windows import Window

    spec = make_bundle().spec
    window = Window(0, 0, 640, 480)
    plain = engine_plan.forward_bytes_lower_bound(spec, 1, 480, 640)
    augmented = engine_plan.forward_bytes_lower_bound(spec, 1, 480, 640, augmented=True)
    assert augmented > plain
    monkeypatch.setattr(engine_plan, "available_bytes", lambda device: (plain + augmented) // 2)
    engine_plan.check_working_set(spec, window, 1, "cpu")
    with pytest.raises(ConfigError, match="needs at least"):
        engine_plan.check_working_set(spec, window, 1, "cpu", "d4")


def test_cli_takes_tta_and_tags_the_outputs(tmp_path: Path, make_bundle: Any) -> None:
    rng = np.random.default_rng(0)
    scene = write_tif(tmp_path / "c.tif", rng.integers(0, 255, (3, 60, 70), dtype=np.uint8))
    args = [str(scene), "-m", str(make_bundle().path), "--device", "cpu", "--precision", "fp32"]
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", *args, "-o", str(tmp_path / "flips"), "--tta", "flips"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["predict", *args, "-o", str(tmp_path / "none")])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "flips" / "c.probs.tif") as src:
        assert src.tags()["GEOSEG_TTA"] == "flips"
        flipped = src.read()
    with rasterio.open(tmp_path / "none" / "c.probs.tif") as src:
        assert "GEOSEG_TTA" not in src.tags()
        assert (src.read() != flipped).any()
    res = runner.invoke(cli, ["predict", *args, "-o", str(tmp_path / "bad"), "--tta", "d8"])
    assert res.exit_code == 2
    assert "Invalid value for '--tta'" in res.output and "'none', 'flips', 'd4'" in res.output


GOOD = """\
schema_version: 1
name: t
inputs:
  paths: ["scenes/*.tif"]
model: model
outputs:
  dir: out
"""


def test_pipeline_file_takes_tta() -> None:
    from geoseg.pipeline.config import parse_pipeline
    from geoseg.pipeline.runner import predict_options

    base = parse_pipeline(GOOD, "p.yml")
    assert base.predict.tta == "none" and predict_options(base).tta == "none"
    d4 = parse_pipeline(GOOD + "predict:\n  tta: d4\n", "p.yml")
    assert predict_options(d4).tta == "d4"
    with pytest.raises(ConfigError) as e:
        parse_pipeline(GOOD + "predict:\n  tta: rotate\n", "p.yml")
    assert "p.yml" in str(e.value) and "predict.tta" in str(e.value) and "line 9" in str(e.value)
    # an explicit default keeps the hash of pipelines written before the field existed
    none = parse_pipeline(GOOD + "predict:\n  tta: none\n", "p.yml")
    assert none.config_hash() == base.config_hash() != d4.config_hash()
    flips = parse_pipeline(GOOD + "predict:\n  tta: flips\n", "p.yml")
    assert len({base.config_hash(), flips.config_hash(), d4.config_hash()}) == 3


def test_ledger_reruns_a_scene_when_tta_changes(tmp_path: Path) -> None:
    from geoseg.pipeline import load_pipeline, run_pipeline
    from geoseg.pipeline.planning import dry_run
    from tests.pipeline_support import make_model, make_scene, write_pipeline

    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "s0.tif", 0, 0, 96)
    make_model(tmp_path / "model")
    job = tmp_path / "p.yml"
    first = run_pipeline(load_pipeline(write_pipeline(job)))
    assert [r.status for r in first.results] == ["done"]
    same = load_pipeline(
        write_pipeline(job, predict={"device": "cpu", "precision": "fp32", "chunk": 64})
    )
    assert [p.action for p in dry_run(same)] == ["skip"]
    flips = {"device": "cpu", "precision": "fp32", "chunk": 64, "tta": "flips"}
    changed = load_pipeline(write_pipeline(job, predict=flips))
    [planned] = dry_run(changed)
    assert planned.action == "run" and planned.reason.startswith("pipeline settings changed")
    second = run_pipeline(changed)
    assert [r.status for r in second.results] == ["done"]
    with rasterio.open(tmp_path / "out" / "s0" / "s0.mask.tif") as src:
        assert src.tags()["GEOSEG_TTA"] == "flips"
    assert [p.action for p in dry_run(changed)] == ["skip"]
