"""Model bundles: safe round trips, and clear errors for every way a bundle can be wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.errors import ModelError
from geoseg.models.bundle import (
    ModelSpec,
    build_module,
    check_architecture,
    load_bundle,
    load_module,
    load_torch_state_dict,
    save_bundle,
)

TINY = ["--encoder-depth", "3", "--decoder-channels", "32,16,8", "--chunk", "64", "--halo", "16"]


def test_round_trip_is_exact(make_bundle: Any) -> None:
    bundle = make_bundle(seed=7)
    loaded = load_module(load_bundle(bundle.path)).state_dict()
    torch.manual_seed(7)
    original = build_module(bundle.spec).state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], v) for k, v in original.items())
    assert json.loads((bundle.path / "model.json").read_text())["weights_sha256"] == bundle.sha256
    assert sorted(p.name for p in bundle.path.iterdir()) == ["model.json", "weights.safetensors"]


def test_missing_and_corrupt_bundles(tmp_path: Path, make_bundle: Any) -> None:
    with pytest.raises(ModelError, match="model bundle not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model bundle"):
        load_bundle(tmp_path / "empty")
    src = make_bundle().path
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"model.json: invalid JSON"):
        load_bundle(bad)
    (bad / "model.json").write_text(json.dumps({"arch": "Unet", "encodr": "resnet18"}))
    with pytest.raises(ModelError, match=r"encodr: Extra inputs are not permitted"):
        load_bundle(bad)
    (bad / "model.json").write_text((src / "model.json").read_text())
    with pytest.raises(ModelError, match="missing weights.safetensors"):
        load_bundle(bad)
    data = bytearray((src / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match model.json"):
        load_bundle(bad)


def test_weights_must_match_spec(tmp_path: Path, make_bundle: Any) -> None:
    bundle = make_bundle()
    other = bundle.spec.model_copy(update={"classes": ["background", "building"]})
    with pytest.raises(ModelError, match=r"weights do not match .* 2 classes: .*wrong shape"):
        save_bundle(other, build_module(bundle.spec).state_dict(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _swap_spec(path: Path, **update: Any) -> None:
    """Rewrite a bundle's model.json with ``update`` (the weights and their hash stay)."""
    spec = json.loads((path / "model.json").read_text())
    spec.update(update)
    (path / "model.json").write_text(json.dumps(spec))


def test_bad_weights_are_refused_before_prediction_starts(tmp_path: Path, make_bundle: Any) -> None:
    """Wrong shapes, a pickle as weights, an unknown encoder and a huge architecture are one
    line on stderr and exit 2, before any cluster starts and without allocating the network."""
    import shutil

    import numpy as np

    from geoseg.models.bundle import check_weights
    from tests.conftest import write_tif

    scene = write_tif(tmp_path / "s.tif", np.zeros((3, 64, 64), np.uint8))
    src = make_bundle().path
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "classes": ({"classes": ["background", "building"]}, "wrong shape"),
        "encoder": ({"encoder": "resnet-nonexistent"}, "resnet-nonexistent"),
        "huge": ({"decoder_channels": [4096, 4096, 4096]}, "wrong shape"),
    }
    for name, (update, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(src, bad)
        _swap_spec(bad, **update)
        with pytest.raises(ModelError, match=message):
            check_weights(load_bundle(bad))
        res = CliRunner().invoke(
            cli,
            ["predict", str(scene), "-m", str(bad), "-o", str(tmp_path / "o"), "--device", "cpu"],
        )
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "distributed" not in res.output
        res = CliRunner().invoke(cli, ["model", "info", str(bad)])
        assert res.exit_code == 2 and message.split()[0] in res.output, res.output
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "weights.safetensors").write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    _swap_spec(pickled, weights_sha256=None)
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        check_weights(load_bundle(pickled))


def test_spec_validation() -> None:
    with pytest.raises(ModelError, match="unknown segmentation-models-pytorch architecture"):
        build_module(ModelSpec(arch="NoSuchNet"))
    with pytest.raises(ModelError, match="decoder_channels has 2 entries; encoder_depth 3"):
        check_architecture(ModelSpec(encoder_depth=3, decoder_channels=[8, 8]))
    with pytest.raises(ValueError, match="normalization.mean has 2 values for 3 bands"):
        ModelSpec(normalization={"scale": 1, "mean": [0, 0]})
    with pytest.raises(ValueError, match="class names must be unique"):
        ModelSpec(classes=["a", "a"])
    with pytest.raises(ValueError, match="bands are 1-based"):
        ModelSpec(bands=[0, 1, 2])


def test_import_plain_state_dict(tmp_path: Path) -> None:
    spec = ModelSpec(encoder_depth=3, decoder_channels=[32, 16, 8], classes=["bg", "building"])
    torch.manual_seed(3)
    state = build_module(spec).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    res = CliRunner().invoke(
        cli,
        [
            "model",
            "import",
            str(tmp_path / "w.pth"),
            str(tmp_path / "b"),
            "--classes",
            "bg,building",
            *TINY,
        ],
    )
    assert res.exit_code == 0, res.output
    loaded = load_module(load_bundle(tmp_path / "b")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


class Evil:
    """A pickle payload that leaves a trace: unpickling it creates the file ``trace``."""

    def __init__(self, trace: Path) -> None:
        self.trace = trace

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.trace), "w"))


def evil_pickle(path: Path, trace: Path) -> Path:
    """A ``.pth`` whose unpickling runs code: it creates ``trace``."""
    with open(path, "wb") as f:
        pickle.dump({"w": Evil(trace)}, f)
    return path


def test_the_evil_pickle_runs_its_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """The payload of the tests below really runs when a loader lets it (so their check that
    its trace is absent means something)."""
    trace = tmp_path / "ran"
    path = evil_pickle(tmp_path / "evil.pth", trace)
    with pytest.raises(Exception):  # noqa: B017 - any failure after the payload ran
        torch.load(path, map_location="cpu", weights_only=False)
    assert trace.exists()


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    trace = tmp_path / "ran"
    path = evil_pickle(tmp_path / "evil.pth", trace)
    with pytest.raises(ModelError, match="cannot load as a weights-only state_dict"):
        load_torch_state_dict(path)
    assert not trace.exists(), "loading the .pth ran the pickle's code"
    res = CliRunner().invoke(cli, ["model", "import", str(path), str(tmp_path / "m")])
    assert res.exit_code == 2, res.output
    assert not trace.exists(), "geoseg model import ran the pickle's code"


def test_encoder_weights_never_run_pickled_code(tmp_path: Path) -> None:
    """``--encoder-weights FILE.pth`` (the encoder's starting weights) runs no pickled code."""
    from geoseg.models.encoders import init_encoder

    trace = tmp_path / "ran"
    path = evil_pickle(tmp_path / "evil.pth", trace)
    spec = ModelSpec(encoder="resnet18", encoder_depth=3, decoder_channels=[16, 16, 16])
    with pytest.raises(ModelError, match="weights-only"):
        init_encoder(build_module(spec), spec.encoder, 3, path)
    assert not trace.exists(), "loading encoder weights ran the pickle's code"


def test_cli_init_info_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "model",
            "init",
            str(tmp_path / "m"),
            "--bands",
            "1",
            "--dtype",
            "uint16",
            "--scale",
            "2047",
            "--gsd",
            "0.5",
            "--encoder-depth",
            "3",
            "--decoder-channels",
            "32,16,8",
        ],
    )
    assert res.exit_code == 0, res.output
    spec = load_bundle(tmp_path / "m").spec
    assert spec.halo > 0 and spec.halo % spec.stride == 0  # measured, not guessed
    res = runner.invoke(cli, ["model", "info", str(tmp_path / "m")])
    assert res.exit_code == 0 and "bands [1], uint16" in res.output and "0.5 m" in res.output
    res = runner.invoke(cli, ["model", "info", str(tmp_path / "none")])
    assert res.exit_code == 2 and "model bundle not found" in res.output
    res = runner.invoke(cli, ["model", "init", str(tmp_path / "x"), "--dtype", "int8", *TINY])
    assert res.exit_code == 2 and "dtype must be one of" in res.output


def test_bundle_files_follow_the_umask(tmp_path: Path, make_bundle: Any) -> None:
    """safetensors writes -rw-------; a bundle must be readable by workers running as another
    user, like every other output."""
    import os
    import stat

    from geoseg.cli.options import plural

    old = os.umask(0o022)
    try:
        bundle = save_bundle(
            make_bundle().spec, build_module(make_bundle().spec).state_dict(), tmp_path / "b"
        )
    finally:
        os.umask(old)
    for name in ("weights.safetensors", "model.json"):
        assert stat.S_IMODE((bundle.path / name).stat().st_mode) == 0o644, name
    assert [plural(u) for u in ("chunk", "batch", "scene")] == ["chunks", "batches", "scenes"]


def test_the_decoder_channels_table_matches_smp() -> None:
    """Which architectures take ``decoder_channels`` is known without importing smp (a run
    with a converted network never imports it); the table must say what smp's constructors
    say."""
    import inspect

    from geoseg.models._smp import import_smp
    from geoseg.models.bundle import DECODER_CHANNELS_ARCHS

    smp = import_smp()
    for arch, takes in DECODER_CHANNELS_ARCHS.items():
        assert ("decoder_channels" in inspect.signature(getattr(smp, arch)).parameters) == takes
