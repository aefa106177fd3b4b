"""Fine-tuning from a bundle (``init``) and random sharpness (``chips.blur_m``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geoseg.errors import ConfigError, ModelError
from geoseg.models.bundle import load_bundle
from geoseg.train.config import parse_config
from geoseg.train.loop import train
from geoseg.train.step import augment

from .test_train import _config


def _params(bundle_dir: Path) -> dict[str, np.ndarray]:
    """The trained parameters (no batch-norm statistics, which move whatever the rate)."""
    state = load_file(str(bundle_dir / "weights.safetensors"))
    return {
        k: v.float().numpy()
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _start(tmp_path: Path) -> Path:
    """A trained bundle to start from, with a normalization no scene would give."""
    (tmp_path / "a").mkdir()
    raw = _config(tmp_path / "a", epochs=1)
    train(parse_config(raw, "a"))
    out = Path(raw["out"])
    spec = json.loads((out / "model.json").read_text())
    spec["normalization"].update(mean=[0.123], std=[0.456])
    (out / "model.json").write_text(json.dumps(spec))
    return out


def _fine_tune(tmp_path: Path, init: Path | None, **optim: Any) -> dict[str, Any]:
    (tmp_path / "b").mkdir(exist_ok=True)
    raw = _config(tmp_path / "b", epochs=1, seed=5, **optim)
    if init is not None:
        raw["init"] = str(init)
    return raw


def test_fine_tuning_starts_from_the_bundles_weights_and_normalization(tmp_path: Path) -> None:
    start = _start(tmp_path)
    before = _params(start)
    # a rate so small that one epoch leaves the weights where they started
    raw = _fine_tune(tmp_path, start, lr=1e-9, weight_decay=0.0)
    result = train(parse_config(raw, "b"))
    after = _params(result.bundle.path)
    assert after.keys() == before.keys()
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) < 1e-5
    spec = result.bundle.spec
    assert spec.normalization.mean == [0.123] and spec.normalization.std == [0.456]
    assert (
        spec.encoder_weights is not None
        and "fine-tuned from the bundle 'tiny'" in spec.encoder_weights
    )
    # the same run without the bundle starts elsewhere
    shutil.rmtree(tmp_path / "b")
    fresh = train(parse_config(_fine_tune(tmp_path, None, lr=1e-9, weight_decay=0.0), "b"))
    far = _params(fresh.bundle.path)
    assert max(float(np.abs(far[k] - before[k]).max()) for k in before) > 0.01
    assert fresh.bundle.spec.normalization.mean != [0.123]


def test_a_bundle_that_does_not_fit_is_refused_before_training(tmp_path: Path) -> None:
    start = _start(tmp_path)
    raw = _fine_tune(tmp_path, start)
    raw["model"]["classes"] = ["background", "building", "road", "water"]
    with pytest.raises(ConfigError, match=rf"{start}: cannot start training.*classes"):
        train(parse_config(raw, "b"))
    raw = _fine_tune(tmp_path, start)
    raw["model"]["normalization"] = {"scale": 255, "mean": [0.5], "std": [0.2]}
    with pytest.raises(ConfigError, match=rf"{start}: its weights were trained on inputs"):
        train(parse_config(raw, "b"))
    raw = _fine_tune(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ModelError, match="nowhere"):
        train(parse_config(raw, "b"))
    assert not (tmp_path / "b" / "model").exists()


def test_the_fingerprint_follows_the_starting_weights_not_their_path(tmp_path: Path) -> None:
    start = _start(tmp_path)
    moved = shutil.copytree(start, tmp_path / "elsewhere")
    a = parse_config(_fine_tune(tmp_path, start), "b").fingerprint()
    assert parse_config(_fine_tune(tmp_path, moved), "b").fingerprint() == a
    assert parse_config(_fine_tune(tmp_path, None), "b").fingerprint() != a
    weights = moved / "weights.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first] + 1
    from safetensors.torch import save_file

    save_file(state, str(weights))
    assert parse_config(_fine_tune(tmp_path, moved), "b").fingerprint() != a


def test_random_sharpness_blurs_each_chip_by_its_own_draw() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((64, 3, 48, 48), generator=gen)
    y = torch.zeros((64, 48, 48), dtype=torch.long)
    sharp, _ = augment(x, y, torch.Generator().manual_seed(1))
    blurred, labels = augment(x, y, torch.Generator().manual_seed(1), blur=(0.3, 1.0))
    assert torch.equal(labels, y)
    sd_sharp = sharp.std(dim=(1, 2, 3))
    sd = blurred.std(dim=(1, 2, 3))
    assert torch.allclose(sd_sharp, x.std(dim=(1, 2, 3)))  # flips and turns keep the noise
    # σ up to 1.35 px (1.0 m from 0.3 m): white noise keeps down to about a quarter of its std
    assert bool((sd <= sd_sharp + 1e-6).all())
    assert float(sd.min()) < 0.35 and float(sd.max()) > 0.85
    assert len({round(float(v), 3) for v in sd}) > 32  # each chip its own strength
    # each band alike: the bands' stds stay together
    per_band = blurred.std(dim=(2, 3))
    assert float((per_band.max(1).values / per_band.min(1).values).max()) < 1.3


def test_blur_m_needs_a_model_gsd_finer_than_it(tmp_path: Path) -> None:
    raw = _config(tmp_path)
    raw["chips"]["blur_m"] = 2.0
    with pytest.raises(ConfigError, match="blur_m"):
        parse_config(raw, "x")
    raw["model"]["gsd_m"] = 2.0
    with pytest.raises(ConfigError, match="blur_m"):
        parse_config(raw, "x")
    raw["model"]["gsd_m"] = 1.0
    assert (
        parse_config(raw, "x").fingerprint() != parse_config(_config(tmp_path), "x").fingerprint()
    )


def test_training_with_random_sharpness_runs_and_resumes_the_same(tmp_path: Path) -> None:
    def raw(where: Path) -> dict[str, Any]:
        where.mkdir()
        r = _config(where, epochs=2)
        r["model"]["gsd_m"] = 1.0
        r["chips"]["blur_m"] = 3.0
        return r

    a = raw(tmp_path / "a")
    train(parse_config(a, "a"))
    b = raw(tmp_path / "b")
    with pytest.raises(RuntimeError):
        train(parse_config(b, "b"), on_epoch=lambda report: (_ for _ in ()).throw(RuntimeError()))
    resumed = train(parse_config(b, "b"))
    assert resumed.resumed_from == 1
    wa, wb = _params(Path(a["out"])), _params(Path(b["out"]))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    # and the blur changed what was learnt
    (tmp_path / "c").mkdir()
    c = _config(tmp_path / "c", epochs=2)
    c["model"]["gsd_m"] = 1.0
    train(parse_config(c, "c"))
    wc = _params(Path(c["out"]))
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)
    assert load_bundle(a["out"]).spec.gsd_m == 1.0
