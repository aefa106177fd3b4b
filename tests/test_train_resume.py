"""Stopping and resuming training: mid-epoch checkpoints, signals, the compact snapshot."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geoseg.train.checkpoint import dumps_state, loads_state
from geoseg.train.config import parse_config
from geoseg.train.control import autocast_dtype
from geoseg.train.loop import EpochReport, TrainingStopped, train

from .test_train import _config


def _weights(d: Path) -> dict[str, Any]:
    return load_file(str(d / "model.checkpoint" / "state" / "weights.safetensors"))


def _state(d: Path) -> dict[str, Any]:
    return json.loads((d / "model.checkpoint" / "state" / "state.json").read_text())


def _stop_at(epoch: int, batch: int) -> Any:
    return lambda e, b: (e, b) == (epoch, batch)


def test_stopped_mid_epoch_twice_and_resumed_gives_identical_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    train(parse_config(_config(a, epochs=2), "a"))

    raw = _config(b, epochs=2)
    with pytest.raises(TrainingStopped, match="epoch 1, batch 3"):
        train(parse_config(raw, "b"), stop=_stop_at(0, 3))
    state = _state(b)
    assert state["epoch"] == -1 and state["partial"]["batch"] == 3
    with pytest.raises(TrainingStopped):
        train(parse_config(raw, "b"), stop=_stop_at(1, 2))
    assert _state(b)["partial"] == {**_state(b)["partial"], "epoch": 1, "batch": 2}
    resumed = train(parse_config(raw, "b"))
    assert resumed.resumed_from == 1
    assert [h.epoch for h in resumed.history] == [0, 1]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_is_saved_every_checkpoint_minutes(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    def crash(epoch: int, done: int, total: int) -> None:
        if done == 3:
            raise Crash  # killed during batch 3: batches 1 and 2 were saved

    for minutes, saved in [(1e-9, 2), (0, None)]:
        d = tmp_path / str(minutes)
        d.mkdir()
        raw = {**_config(d, epochs=1), "checkpoint_minutes": minutes}
        with pytest.raises(Crash):
            train(parse_config(raw, "x"), progress=crash)
        if saved is None:
            assert not (d / "model.checkpoint" / "state").exists()
        else:
            assert _state(d)["partial"]["batch"] == saved


def test_sigterm_finishes_the_batch_saves_and_stops(tmp_path: Path) -> None:
    def term(epoch: int, done: int, total: int) -> None:
        if done == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="SIGTERM") as info:
        train(parse_config(_config(tmp_path, epochs=1), "x"), progress=term)
    assert info.value.exit_code == 130  # as any command that SIGTERM stops
    assert _state(tmp_path)["partial"]["batch"] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_training_resumes_from_the_snapshot_alone(tmp_path: Path) -> None:
    import shutil

    raw = {**_config(tmp_path, epochs=2), "snapshot": "snap/model-state.safetensors"}
    cfg = parse_config(raw, "x", tmp_path)
    snap = tmp_path / "snap" / "model-state.safetensors"

    class Stop(Exception):
        pass

    def stop(report: EpochReport) -> None:
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch=stop)
    assert snap.is_file()
    with safe_open(str(snap), framework="pt") as f:
        meta = f.metadata()
        dtypes = {k.split(".")[0] + "." + k.split(".")[1]: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.encoder"] == torch.float16
    assert dtypes["adam.exp_avg"] == torch.bfloat16 and dtypes["adam.exp_avg_sq"] == torch.bfloat16
    assert json.loads(meta["state"])["epoch"] == 0
    assert meta["fingerprint"] == cfg.fingerprint()
    full = _weights(tmp_path)

    shutil.rmtree(tmp_path / "model.checkpoint")  # another machine: only committed files
    # and no best bundle: the next epoch must write one, however well the lost one scored
    shutil.rmtree(tmp_path / "model")
    tensors = load_file(str(snap))
    state = json.loads(meta["state"])
    state["best_score"] = 2.0  # above any IoU: only a reset lets an epoch be the best
    save_file(tensors, str(snap), metadata={**meta, "state": json.dumps(state)})
    resumed = train(cfg)
    assert (tmp_path / "model" / "model.json").is_file()
    assert resumed.best_epoch == 1
    assert resumed.resumed_from == 1
    assert [h.epoch for h in resumed.history] == [0, 1]
    assert resumed.best_epoch in (0, 1)
    # the second epoch started from the float16 weights: close to, not equal to, the full run's
    assert full.keys() == _weights(tmp_path).keys()


def test_a_snapshot_of_another_config_is_refused(tmp_path: Path) -> None:
    import shutil

    from geoseg.errors import ConfigError

    raw = {**_config(tmp_path, epochs=1), "snapshot": str(tmp_path / "s.safetensors")}
    train(parse_config(raw, "x"))
    shutil.rmtree(tmp_path / "model.checkpoint")
    raw["optim"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="different training config"):
        train(parse_config(raw, "x"))


def test_nan_is_written_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    state = {
        "epoch": 0,
        "best_score": math.nan,
        "history": [{"train_loss": 0.5, "val_iou": {"building": math.nan, "road": 0.25}}],
        "partial": None,
    }
    text = dumps_state(state)

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    strict = json.loads(text, parse_constant=refuse)
    assert strict["history"][0]["val_iou"]["building"] is None and strict["partial"] is None
    back = loads_state(text)
    assert math.isnan(back["best_score"]) and math.isnan(back["history"][0]["val_iou"]["building"])
    assert back["history"][0]["val_iou"]["road"] == 0.25 and back["partial"] is None


def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.models.predictor

    cpu = torch.device("cpu")
    monkeypatch.setattr(geoseg.models.predictor, "cpu_supports_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None
    monkeypatch.setattr(geoseg.models.predictor, "cpu_supports_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16


def test_fingerprint_ignores_how_often_and_where_state_is_saved(tmp_path: Path) -> None:
    raw = _config(tmp_path)
    base = parse_config(raw, "x").fingerprint()
    other = {**raw, "checkpoint_minutes": 1, "snapshot": str(tmp_path / "s.safetensors")}
    other["optim"] = {**raw["optim"], "precision": "fp32"}
    assert parse_config(other, "x").fingerprint() == base
    assert np.isfinite(parse_config(raw, "x").checkpoint_minutes)
