"""Model bundles: ``model.json`` (a validated :class:`ModelSpec`) plus ``weights.safetensors``.

A bundle is never a pickle. Loading checks the JSON against the schema, the weights file
against the recorded SHA-256, and the tensors against the architecture the spec describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ModelError, OutputError, describe_validation_error, first_line
from geoseg.models._smp import import_smp
from geoseg.models.input_filter import filtered_spec, low_pass_sigma_px

if TYPE_CHECKING:
    import torch

__all__ = [
    "Bundle",
    "ModelSpec",
    "Normalization",
    "VectorizeDefaults",
    "SCHEMA_VERSION",
    "build_module",
    "load_bundle",
    "load_module",
    "save_bundle",
    "with_input_filter",
    "write_spec",
]

SCHEMA_VERSION = 1
SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


class Normalization(BaseModel):
    """Per-model input scaling, ``(x / scale - mean) / std`` per band; never computed per tile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(1.0, gt=0, description="Divide raw values by this first (e.g. 255).")
    mean: list[float] = Field(default_factory=list, description="Per-band mean after scaling.")
    std: list[float] = Field(default_factory=list, description="Per-band std after scaling.")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std values must be > 0, got {v}")
        return v

    def arrays(self, bands: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32 arrays of shape (bands, 1, 1)."""
        mean = np.asarray(self.mean or [0.0] * bands, dtype=np.float32)
        std = np.asarray(self.std or [1.0] * bands, dtype=np.float32)
        if mean.shape != (bands,) or std.shape != (bands,):
            raise ModelError(
                f"normalization has {len(self.mean)} means and {len(self.std)} stds "
                f"for {bands} bands"
            )
        return mean[:, None, None], std[:, None, None]

    def apply(self, data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Normalize raw (bands, h, w) pixels to float32; invalid pixels become 0 (the mean)."""
        mean, std = self.arrays(data.shape[0])
        out = data.astype(np.float32)
        out /= np.float32(self.scale)
        out -= mean
        out /= std
        if valid is not None and not valid.all():
            out[:, ~valid] = 0.0
        return out


class VectorizeDefaults(BaseModel):
    """Vectorizer settings chosen for one model, on its training data: they replace the
    vectorizer's defaults for its predictions, and a setting that a user gives wins over them
    (see :meth:`geoseg.vectorize.VectorizeOptions.under`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_area_m2: float | None = Field(
        None, ge=0, description="Drop polygons smaller than this (square metres)."
    )
    building_threshold: float | None = Field(
        None, gt=0, le=1, description="The probability threshold of building polygons."
    )
    contact_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cut pixels whose building_contact probability reaches this out of buildings.",
    )
    bridge_m: float | None = Field(
        None, ge=0, description="Join dangling road ends to a road ahead within this (m)."
    )
    valley_m: float | None = Field(
        None,
        ge=0,
        description="Cut building pixels that lie valley_depth below their closing over a "
        "square this wide (m); 0: off.",
    )
    valley_depth: float | None = Field(
        None, gt=0, le=1, description="The probability depth of a valley that valley_m cuts."
    )
    chosen_on: str = Field(
        "", description="Where and how the building values were chosen, for the record."
    )
    roads_chosen_on: str = Field(
        "", description="Where and how bridge_m was chosen, for the record."
    )

    def settings(self) -> dict[str, float]:
        """The values set, by vectorizer option name (the records left out)."""
        return self.model_dump(exclude_none=True, exclude={"chosen_on", "roads_chosen_on"})


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model and feed it correctly; stored as ``model.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(1, description="model.json schema version")
    name: str = Field("geoseg-model", min_length=1, description="Human-readable model name.")
    arch: str = Field("Unet", description="segmentation-models-pytorch architecture class name.")
    encoder: str = Field("resnet18", description="smp encoder name.")
    encoder_depth: int = Field(5, ge=3, le=5, description="Number of encoder stages.")
    decoder_channels: list[int] = Field(
        default_factory=lambda: [256, 128, 64, 32, 16],
        description="Decoder channels per stage (architectures that take them).",
    )
    bands: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    dtype: str = Field("uint8", description="Expected pixel data type of the input bands.")
    normalization: Normalization = Field(default_factory=lambda: Normalization(scale=255.0))
    classes: list[str] = Field(
        default_factory=lambda: ["background", "building", "road"], min_length=2
    )
    activation: Literal["softmax"] = "softmax"
    chunk: int = Field(512, ge=32, description="Recommended chunk core size, pixels.")
    halo: int = Field(64, ge=0, description="Recommended halo on each side, pixels.")
    gsd_m: float | None = Field(None, gt=0, description="Ground sample distance trained at, m.")
    input_low_pass_m: float | None = Field(
        None,
        gt=0,
        description="Effective ground resolution (m) every input is blurred to before the "
        "network, in training and prediction (a Gaussian; see geoseg.models.lowpass); "
        "None: inputs as they are.",
    )
    weights_sha256: str | None = Field(None, description="SHA-256 of weights.safetensors.")
    encoder_weights: str | None = Field(
        None,
        description="Where the encoder's starting weights came from before training "
        "(e.g. 'lite0-imagenet (file, sha256 …)', 'imagenet'); None: random.",
    )
    description: str = ""
    vectorize: VectorizeDefaults | None = Field(
        None,
        description="Vectorizer settings chosen for this model; a user's own settings win.",
    )

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"bands are 1-based and must be >= 1, got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {v!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        n = len(self.bands)
        for label, values in (("mean", self.normalization.mean), ("std", self.normalization.std)):
            if values and len(values) != n:
                raise ValueError(f"normalization.{label} has {len(values)} values for {n} bands")
        if (
            self.input_low_pass_m is not None
            and self.gsd_m is not None
            and self.input_low_pass_m <= self.gsd_m
        ):
            raise ValueError(
                f"input_low_pass_m ({self.input_low_pass_m} m) must be coarser than gsd_m "
                f"({self.gsd_m} m)"
            )
        return self

    @property
    def stride(self) -> int:
        """Output stride of the encoder: chunk and halo sizes must be multiples of it (px)."""
        return int(2**self.encoder_depth)

    def _takes_decoder_channels(self) -> bool:
        known = DECODER_CHANNELS_ARCHS.get(self.arch)
        if known is not None:  # without importing torch and smp (see the table)
            return known
        smp = import_smp()
        return "decoder_channels" in inspect.signature(getattr(smp, self.arch)).parameters


#: Whether each common smp architecture takes ``decoder_channels`` (its constructor's
#: signature; a test checks the table against the installed smp). Other architectures are
#: looked up in smp itself, which imports torch.
DECODER_CHANNELS_ARCHS = {
    "Unet": True,
    "UnetPlusPlus": True,
    "MAnet": True,
    "Linknet": False,
    "FPN": False,
    "PSPNet": False,
}


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its directory, its spec, and the hash that identifies the weights."""

    path: Path
    spec: ModelSpec
    sha256: str

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def spec_sha256(self) -> str:
        """SHA-256 of ``model.json`` as this spec writes it: with the weights' hash, what
        names the network a predictor runs (its input filter, normalization, classes)."""
        return hashlib.sha256(spec_json(self.spec).encode()).hexdigest()

    def with_input_filter(self, choice: str) -> Bundle:
        """This bundle as a run with input filter ``choice`` sees it
        (:func:`filtered_spec`); the weights and their hash stay the same."""
        spec = filtered_spec(self.spec, choice, source=str(self.path))
        return self if spec is self.spec else replace(self, spec=spec)

    @property
    def ident(self) -> str:
        """``name@hash12``: names a model in outputs, ledgers and attributes."""
        return f"{self.spec.name}@{self.sha256[:12]}"


def check_architecture(spec: ModelSpec, source: str = "model spec") -> None:
    """Raise :class:`ModelError` unless smp has ``spec.arch`` and the decoder fits the encoder.

    Kept out of the spec's own validation: it imports torch and smp (2-3 s), which reading a
    spec to plan a run, list runs or skip done scenes never needs. Everything that builds or
    checks a network calls it first.
    """
    smp = import_smp()
    if not isinstance(getattr(smp, spec.arch, None), type):
        raise ModelError(
            f"{source}: unknown segmentation-models-pytorch architecture {spec.arch!r}"
        )
    if spec._takes_decoder_channels() and len(spec.decoder_channels) != spec.encoder_depth:
        raise ModelError(
            f"{source}: decoder_channels has {len(spec.decoder_channels)} entries; "
            f"encoder_depth {spec.encoder_depth} needs {spec.encoder_depth}"
        )


def build_module(spec: ModelSpec) -> torch.nn.Module:
    """The smp module described by ``spec``, randomly initialised (never downloads weights)."""
    check_architecture(spec)
    smp = import_smp()

    cls = getattr(smp, spec.arch)
    kwargs: dict[str, Any] = {
        "encoder_name": spec.encoder,
        "encoder_weights": None,
        "encoder_depth": spec.encoder_depth,
        "in_channels": len(spec.bands),
        "classes": len(spec.classes),
    }
    if spec._takes_decoder_channels():
        kwargs["decoder_channels"] = tuple(spec.decoder_channels)
    try:
        return cls(**kwargs)
    except Exception as exc:  # smp raises KeyError/ValueError/TypeError for bad combinations
        raise ModelError(
            f"cannot build {spec.arch} with encoder {spec.encoder!r} "
            f"(depth {spec.encoder_depth}): {exc}"
        ) from exc


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def save_bundle(
    spec: ModelSpec,
    state_dict: dict[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
) -> Bundle:
    """Write ``state_dict`` and ``spec`` as a bundle directory, atomically (temp dir + rename).

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type; they are
    cast back to the module's own types when loaded.
    """
    from safetensors.torch import save_file

    out = Path(out)
    _check_state_dict(spec, state_dict, source=str(out))
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        follow_umask(tmp / WEIGHTS_FILE)
        digest = file_sha256(tmp / WEIGHTS_FILE)
        spec = spec.model_copy(update={"weights_sha256": digest})
        (tmp / SPEC_FILE).write_text(spec_json(spec))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, spec, digest)


def follow_umask(path: Path) -> None:
    """Give a file the permissions a newly created file gets under this process's umask
    (safetensors writes ``-rw-------``: a bundle that Dask workers running as another user, or
    a shared model directory, could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_spec(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Replace the ``model.json`` of bundle directory ``path`` atomically."""
    target = Path(path) / SPEC_FILE
    tmp = target.with_name(f".{SPEC_FILE}.partial")
    try:
        tmp.write_text(spec_json(spec))
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


#: Optional fields written to ``model.json`` only when set, so that bundles without them stay
#: byte for byte as they were written before the fields existed.
OPTIONAL_FIELDS = ("input_low_pass_m", "vectorize")


def spec_json(spec: ModelSpec) -> str:
    """``model.json``'s text; the :data:`OPTIONAL_FIELDS` only when set."""
    unset = {name for name in OPTIONAL_FIELDS if getattr(spec, name) is None}
    return spec.model_dump_json(indent=2, exclude=unset or None) + "\n"


def read_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Parse and validate ``model.json`` in bundle directory ``path``."""
    p = Path(path)
    spec_file = p / SPEC_FILE if p.is_dir() else p
    if not spec_file.exists():
        raise ModelError(f"{p}: not a model bundle (no {SPEC_FILE})")
    try:
        raw = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{spec_file}: invalid JSON ({exc})") from exc
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise ModelError(f"{spec_file}: invalid model spec: {problems}") from exc


def load_bundle(path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Read a bundle's spec and check its weights file (presence, and SHA-256 if recorded)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: model bundle not found")
    if not p.is_dir():
        raise ModelError(f"{p}: a model bundle is a directory with {SPEC_FILE} and {WEIGHTS_FILE}")
    spec = read_spec(p)
    weights = p / WEIGHTS_FILE
    if not weights.exists():
        raise ModelError(f"{p}: missing {WEIGHTS_FILE}")
    digest = file_sha256(weights) if verify or spec.weights_sha256 is None else spec.weights_sha256
    if spec.weights_sha256 and digest != spec.weights_sha256:
        raise ModelError(
            f"{weights}: SHA-256 {digest[:12]}… does not match model.json "
            f"({spec.weights_sha256[:12]}…); the file is corrupt or was replaced"
        )
    return Bundle(p, spec, digest)


def check_weights(bundle: Bundle, *, architecture_known: bool = False) -> None:
    """Check the weights file's tensor names and shapes against the spec's architecture, before
    prediction starts a cluster.

    ``architecture_known``: these very weights are known to load into the spec's architecture
    (a converted network of them is cached, see :func:`geoseg.models.backends.cached_network`): only
    the file's header and size are checked, and neither torch nor smp is imported.

    Raises :class:`ModelError` for a file that is not safetensors (a pickle, say), an encoder or
    architecture that cannot be built, a decoder far larger than the file's weights (refused
    before the network is built, so a huge ``decoder_channels`` allocates nothing), and any
    missing, unexpected or misshapen tensor. Only the file's header is read.
    """
    from safetensors import SafetensorError, safe_open

    if not architecture_known:
        check_architecture(bundle.spec, str(bundle.path / SPEC_FILE))
    try:
        with safe_open(str(bundle.weights_path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{bundle.weights_path}: not a valid safetensors file ({first_line(exc)})"
        ) from exc
    held = sum(int(np.prod(v)) for v in shapes.values())
    need = decoder_params_lower_bound(bundle.spec)
    if need > 4 * held + 1_000_000:
        raise ModelError(
            f"{bundle.weights_path}: weights do not match {bundle.spec.arch}/{bundle.spec.encoder}:"
            f" decoder_channels {bundle.spec.decoder_channels} need at least {need:,} "
            f"parameters ({4 * need / 2**30:.1f} GiB), the file holds {held:,} in all "
            "(wrong shape)"
        )
    if not architecture_known:
        want = expected_shapes(bundle.spec)
        _check_shapes(bundle.spec, shapes, str(bundle.weights_path), want)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of ``spec``'s network, from a build on torch's ``meta``
    device: no memory, no random initialisation (0.05 s for a resnet18 U-Net against 0.2 s).
    A module whose construction needs real tensors is built normally instead."""
    import torch

    try:
        with torch.device("meta"):
            module = build_module(spec)
    except ModelError:
        raise
    except Exception:  # e.g. a constructor calling .item() on a tensor
        module = build_module(spec)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def decoder_params_lower_bound(spec: ModelSpec) -> int:
    """At least this many decoder parameters: a 3x3 convolution from each decoder stage's
    channels to themselves (every smp decoder that takes ``decoder_channels`` has one)."""
    if not spec._takes_decoder_channels():
        return 0
    return sum(9 * c * c for c in spec.decoder_channels)


def with_input_filter(module: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """``module`` as training and prediction run it: behind ``spec``'s input filter
    (``input_low_pass_m``, :mod:`geoseg.models.lowpass`) when it has one; a module already
    behind its filter as it is."""
    from geoseg.models.lowpass import LowPassed, with_low_pass

    if isinstance(module, LowPassed):
        return module
    return with_low_pass(module, low_pass_sigma_px(spec))


def load_module(bundle: Bundle) -> torch.nn.Module:
    """Build the bundle's module and load its weights (strictly), in eval mode; behind the
    spec's input filter (``input_low_pass_m``) when it has one."""
    state = read_safetensors(bundle.weights_path)
    module = build_module(bundle.spec)
    _check_state_dict(bundle.spec, state, source=str(bundle.weights_path), module=module)
    module.load_state_dict(state, strict=True)
    return with_input_filter(module, bundle.spec).eval()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; :class:`ModelError` naming it when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a valid safetensors file ({first_line(exc)})") from exc


def shape_problems(
    state: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    *,
    unexpected: bool = True,
) -> list[str]:
    """How tensor shapes ``state`` differ from ``expected`` (name → shape), one phrase per kind
    of difference (missing, unexpected unless told not to, wrong shape); empty when they fit."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected)) if unexpected else []
    shapes = [
        f"{k}: {state[k]} != {v}" for k, v in expected.items() if k in state and state[k] != v
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} with wrong shape (e.g. {'; '.join(shapes[:3])})")
    return parts


def _check_state_dict(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    module: torch.nn.Module | None = None,
) -> None:
    """Raise :class:`ModelError` listing how ``state`` differs from the spec's architecture."""
    expected = {k: tuple(v.shape) for k, v in (module or build_module(spec)).state_dict().items()}
    _check_shapes(spec, {k: tuple(v.shape) for k, v in state.items()}, source, expected)


def _check_shapes(
    spec: ModelSpec,
    state: dict[str, tuple[int, ...]],
    source: str,
    expected: dict[str, tuple[int, ...]],
) -> None:
    parts = shape_problems(state, expected)
    if parts:
        raise ModelError(
            f"{source}: weights do not match {spec.arch}/{spec.encoder} with "
            f"{len(spec.bands)} bands and {len(spec.classes)} classes: " + ", ".join(parts)
        )


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain PyTorch state_dict safely (``weights_only=True``); unwraps common nesting."""
    import torch

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        raise ModelError(
            f"{p}: cannot load as a weights-only state_dict ({first_line(exc)})"
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{p}: does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
