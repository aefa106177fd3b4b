"""Weight averaging over a run's last epochs, and the Lovász-softmax loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from geoseg.cli import cli
from geoseg.errors import ConfigError
from geoseg.train.average import averaged_out, epoch_weights_file
from geoseg.train.config import load_config, parse_config
from geoseg.train.loop import TrainingStopped, train
from geoseg.train.step import PartialLoss, lovasz_softmax

from .test_train import _config

DATA = Path(__file__).resolve().parents[1] / "data_samples"


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float((pred & truth).sum()) / float((pred | truth).sum())


def test_lovasz_is_one_minus_iou_on_hard_predictions_over_the_chips_that_label_a_class() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (2, 12, 12), generator=gen)
    guess = torch.randint(0, 3, (2, 12, 12), generator=gen)
    probs = torch.nn.functional.one_hot(guess, 3).permute(0, 3, 1, 2).float()
    keep = torch.ones_like(truth, dtype=torch.bool)
    keep[1, :3] = False  # ignored pixels
    unknown = torch.tensor([[False, False, False], [False, False, True]])  # chip 1: no roads
    # background is known on chip 0 only, class 1 on both, class 2 on chip 0 only
    expected = [
        1 - _iou(guess[0] == 0, truth[0] == 0),
        1 - _iou(guess[keep] == 1, truth[keep] == 1),
        1 - _iou(guess[0] == 2, truth[0] == 2),
    ]
    got = float(lovasz_softmax(probs, truth, keep, unknown))
    assert got == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert (
        float(
            lovasz_softmax(
                torch.nn.functional.one_hot(truth, 3).permute(0, 3, 1, 2).float(),
                truth,
                keep,
                unknown,
            )
        )
        == 0.0
    )

    # a soft prediction is pulled towards the truth, and the loss adds it with its weight
    logits = torch.zeros((2, 3, 12, 12), requires_grad=True)
    loss = lovasz_softmax(logits.softmax(1), truth, keep, unknown)
    loss.backward()
    assert logits.grad is not None
    step = (logits - 10 * logits.grad).detach()
    assert float(lovasz_softmax(step.softmax(1), truth, keep, unknown)) < float(loss.detach())
    with torch.no_grad():
        plain = PartialLoss(0.0)(logits, truth, unknown)
        both = PartialLoss(0.0, 0.5)(logits, truth, unknown)
        assert float(both) == pytest.approx(float(plain) + 0.5 * float(loss), rel=1e-5)


def _floats(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in d.items() if v.is_floating_point()}


def test_the_averaged_bundle_is_the_mean_of_the_kept_epochs_with_batchnorm_measured_again(
    tmp_path: Path,
) -> None:
    raw = _config(tmp_path, epochs=3, average_from_epoch=2)
    result = train(parse_config(raw, "x"))
    avg = result.averaged
    assert avg is not None and (avg.first, avg.last, avg.missing) == (2, 3, [])
    assert avg.bundle.path == averaged_out(tmp_path / "model") == tmp_path / "model-averaged"
    ckpt = tmp_path / "model.checkpoint"
    assert not epoch_weights_file(ckpt, 0).exists()
    kept = [_floats(load_file(str(epoch_weights_file(ckpt, e)))) for e in (1, 2)]
    mean = {k: (kept[0][k] + kept[1][k]) / 2 for k in kept[0]}
    got = _floats(load_file(str(avg.bundle.weights_path)))
    stats = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k, v in got.items():
        if k not in stats:
            torch.testing.assert_close(v, mean[k], rtol=1e-5, atol=1e-6)
    # the mean of the epochs' statistics is replaced by those of the averaged network
    assert any(not torch.allclose(got[k], mean[k], rtol=1e-3, atol=1e-4) for k in stats)
    assert 0 <= avg.score <= 1 and set(avg.val_iou) == {"background", "building", "road"}
    # the best epoch's bundle is still the run's bundle; the averaged one says what it is
    assert result.bundle.path == tmp_path / "model"
    assert "mean of those after epochs 2-3" in avg.bundle.spec.description
    assert "mean of" not in result.bundle.spec.description


def test_an_averaging_run_stopped_and_resumed_averages_the_same_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    whole = train(parse_config(_config(a, epochs=3, average_from_epoch=2), "a")).averaged
    raw = _config(b, epochs=3, average_from_epoch=2)
    with pytest.raises(TrainingStopped):  # after epoch 2's weights were kept
        train(parse_config(raw, "b"), stop=lambda e, n: (e, n) == (2, 1))
    resumed = train(parse_config(raw, "b")).averaged
    assert whole is not None and resumed is not None
    wa, wb = load_file(str(whole.bundle.weights_path)), load_file(str(resumed.bundle.weights_path))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.score == whole.score

    # restarting forgets the kept epochs of the run before
    with pytest.raises(TrainingStopped):
        train(parse_config(raw, "b"), restart=True, stop=lambda e, n: (e, n) == (0, 1))
    assert not list((b / "model.checkpoint" / "epochs").glob("*.safetensors"))


def test_average_from_epoch_is_checked_and_does_not_change_the_fingerprint(tmp_path: Path) -> None:
    raw = _config(tmp_path, epochs=3)
    base = parse_config(raw, "x").fingerprint()
    with_avg = {**raw, "optim": {**raw["optim"], "average_from_epoch": 2}}
    assert parse_config(with_avg, "x").fingerprint() == base
    lovasz = {**raw, "optim": {**raw["optim"], "lovasz_weight": 1.0}}
    assert parse_config(lovasz, "x").fingerprint() != base
    late = {**raw, "optim": {**raw["optim"], "average_from_epoch": 4}}
    with pytest.raises(ConfigError, match=r"train\.yml.*average_from_epoch 4 is after the last"):
        parse_config(late, "train.yml")


def test_cli_reports_the_averaged_bundle(tmp_path: Path) -> None:
    raw = _config(tmp_path, epochs=2, average_from_epoch=1)
    raw["out"] = "model-out"
    cfg = tmp_path / "train.yml"
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "mean of epochs 1-2" in res.output and "model-out-averaged" in res.output
    # --epochs before the averaging starts is a config error naming the file
    res = CliRunner().invoke(cli, ["train", str(cfg), "--epochs", "1", "--restart"])
    assert res.exit_code == 0, res.output
    raw["optim"]["average_from_epoch"] = 2
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["train", str(cfg), "--epochs", "1"])
    assert res.exit_code != 0 and "train.yml" in res.output and "average_from_epoch" in res.output


@pytest.mark.parametrize("name", ["train_cities_swa.yml", "train_cities_lovasz.yml"])
def test_the_averaging_configs_are_valid(name: str) -> None:
    cfg = load_config(DATA / name)
    assert cfg.optim.average_from_epoch == 5 and cfg.optim.epochs == 16
    assert cfg.init == (DATA.parent / "out" / "model-cities-finetune").resolve()  # Lite0's weights
    assert (cfg.optim.lovasz_weight, cfg.optim.dice_weight) == (
        (1.0, 0.0) if "lovasz" in name else (0.0, 1.0)
    )
    assert "austin" not in yaml.safe_dump(cfg.model_dump(mode="json")).lower()
