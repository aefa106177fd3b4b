"""Inference backends behind :class:`geoseg.models.predictor.Predictor`: torch, and OpenVINO on
CPUs.

OpenVINO runs the demo U-Nets (EfficientNet-Lite0, Lite2) 2-4x faster than torch on a CPU at
the same precision, and its speed per pixel does not drop as the window grows. A bundle's torch
module is traced once and converted into OpenVINO's format with dynamic batch, height and width;
the converted network is cached on disk (:func:`cache_root`), keyed by the weights' SHA-256, the
architecture and the library versions, so a batch of scenes converts once. Each window shape
is compiled on first use for the asked precision; OpenVINO caches those compiled networks in
the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from geoseg.models.bundle import Bundle

__all__ = [
    "BACKENDS",
    "TTA",
    "OpenVINOPredictor",
    "architecture_proven",
    "backend_installed",
    "cache_root",
    "cached_network",
    "openvino_model",
    "openvino_predictor",
    "resolve_backend",
    "tta_transforms",
]

#: Test-time augmentation modes: which dihedral transforms of each window are averaged (see
#: :func:`tta_transforms`).
TTA = ("none", "flips", "d4")

#: A dihedral transform of a window: a horizontal flip (first, when True), then ``k``
#: counter-clockwise quarter turns.
Transform = tuple[int, bool]


def tta_transforms(tta: str) -> tuple[Transform, ...]:
    """The transforms that mode ``tta`` averages, identity first: none (1), flips (identity,
    horizontal and vertical flips, and both, i.e. the half turn: 4), d4 (the 4 quarter turns,
    each with and without a flip: 8)."""
    if tta == "none":
        return ((0, False),)
    if tta == "flips":
        # the half turn after a horizontal flip is the vertical flip
        return ((0, False), (0, True), (2, False), (2, True))
    if tta == "d4":
        return tuple((k, flip) for flip in (False, True) for k in range(4))
    raise ConfigError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")


#: ``--backend`` values: auto picks the fastest one installed for the device.
BACKENDS = ("auto", "torch", "openvino")

#: What to install for each optional backend.
_INSTALL = {"openvino": "pip install 'geoseg[openvino]' (or: pip install openvino)"}

#: Bumped when the conversion changes: older cached networks are then not reused.
CONVERSION_FORMAT = 1

#: The height and width (px) of the window the module is traced on; the converted network takes
#: any batch, height and width (multiples of the encoder's stride, as every padded window is).
TRACE_SIDE = 256

#: OpenVINO's inference precision hint for each of geoseg's precisions.
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def backend_installed(name: str) -> bool:
    """Whether backend ``name`` can be imported here (torch always can)."""
    if name == "torch":
        return True
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: str) -> str:
    """'auto' → OpenVINO on a CPU when it is installed, else torch (always on CUDA). An
    explicit backend that is not installed, or cannot run on ``device``, is a ConfigError."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cpu = device == "cpu"
    if backend == "auto":
        return "openvino" if on_cpu and backend_installed("openvino") else "torch"
    if backend != "torch":
        if not on_cpu:
            raise ConfigError(
                f"backend {backend} runs on the CPU, not on device {device!r}; use --backend "
                "torch (or auto) there"
            )
        if not backend_installed(backend):
            raise ConfigError(f"backend {backend} is not installed: {_INSTALL[backend]}")
    return backend


def cache_root() -> Path:
    """Where converted networks are kept: ``$GEOSEG_CACHE``, else ``$XDG_CACHE_HOME/geoseg``,
    else ``~/.cache/geoseg``."""
    env = os.environ.get("GEOSEG_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "geoseg"


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError(
            f"backend openvino is not installed ({exc}): {_INSTALL['openvino']}"
        ) from exc
    return openvino


def _with_activation(module: torch.nn.Module, activation: str | None) -> torch.nn.Module:
    """The bundle's module followed by its activation, as one network to convert."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.module(x)
            return torch.softmax(y, dim=1) if activation == "softmax" else y

    return Probabilities().eval()


def conversion_key(bundle: Bundle) -> str:
    """32 hex digits naming a bundle's converted network: the weights' SHA-256, the fields that
    build the module, the conversion format, and the torch and OpenVINO versions."""
    from importlib.metadata import version

    ov = _import_openvino()
    spec = bundle.spec
    fields = {
        "sha256": bundle.sha256,
        "arch": spec.arch,
        "encoder": spec.encoder,
        "encoder_depth": spec.encoder_depth,
        "decoder_channels": spec.decoder_channels,
        "bands": len(spec.bands),
        "classes": len(spec.classes),
        "activation": spec.activation,
        "format": CONVERSION_FORMAT,
        "torch": version("torch"),  # not imported: a cached network needs no torch
        "openvino": ov.__version__,
    }
    if spec.input_low_pass_m is not None:  # keys of bundles without it stay as they were
        fields["input_low_pass"] = [spec.input_low_pass_m, spec.gsd_m]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def convert_module(module: torch.nn.Module, bands: int, activation: str | None, out: Path) -> None:
    """Trace ``module`` (with its activation) on a :data:`TRACE_SIDE` px window and save it as
    OpenVINO's ``model.xml`` and ``model.bin`` in folder ``out`` (which must not exist yet):
    written into a temporary folder beside it, then renamed. Raises :class:`ModelError` when
    the network cannot be traced or converted."""
    import torch

    ov = _import_openvino()
    example = torch.zeros(1, bands, TRACE_SIDE, TRACE_SIDE)
    wrapped = _with_activation(module, activation)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings_quiet():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
            model = ov.convert_model(
                traced, example_input=example, input=[ov.PartialShape([-1, bands, -1, -1])]
            )
    except Exception as exc:
        raise ModelError(
            f"OpenVINO {ov.__version__} cannot convert this network "
            f"({type(exc).__name__}: {exc}); use --backend torch"
        ) from exc
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial")
    tmp.mkdir(parents=True)
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "model.xml").exists():  # not another process converting meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def warnings_quiet() -> Any:
    """Tracing warns about Python values it freezes (timm's padding arithmetic): the network is
    converted with dynamic shapes and checked against torch at other sizes by the tests."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def network_folder(bundle: Bundle, cache: Path | None = None) -> Path:
    """The cache folder of ``bundle``'s converted network (which may not exist yet)."""
    return (cache or cache_root()) / "openvino" / conversion_key(bundle)


def cached_network(bundle: Bundle, cache: Path | None = None) -> Path | None:
    """The folder of ``bundle``'s converted network when it is in the cache, else None. Its
    presence proves that these very weights (their SHA-256 is in the key) loaded into the
    spec's architecture when they were converted."""
    folder = network_folder(bundle, cache)
    return folder if (folder / "model.xml").is_file() else None


def architecture_proven(bundle: Bundle, backend: str) -> bool:
    """Whether ``backend`` (resolved) runs ``bundle`` from a cached conversion
    (:func:`cached_network`), which proves that its weights fit its architecture."""
    return backend == "openvino" and cached_network(bundle) is not None


def openvino_model(
    bundle: Bundle, load: Callable[[], torch.nn.Module], cache: Path | None = None
) -> tuple[Any, Path, bool]:
    """The bundle's converted network (an ``openvino.Model``), its cache folder, and whether it
    was converted now (False: read from the cache). ``load`` builds the torch module, called
    only when the network must be converted."""
    ov = _import_openvino()
    folder = network_folder(bundle, cache)
    xml = folder / "model.xml"
    converted = False
    if not xml.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_module(load(), len(bundle.spec.bands), bundle.spec.activation, folder)
        converted = True
    try:
        model = ov.Core().read_model(str(xml))
    except Exception as exc:
        raise ModelError(
            f"{xml}: cannot read the cached OpenVINO network ({exc}); remove the folder "
            f"{folder} to convert it again"
        ) from exc
    return model, folder, converted


@dataclass
class _Compiled:
    """A compiled network and its infer requests, one per thread that used it."""

    network: Any
    requests: dict[int, Any] = field(default_factory=dict)


class OpenVINOPredictor:
    """Runs a converted network on the CPU with OpenVINO: normalized float32 batches (N, bands,
    H, W) to class probabilities (N, K, H, W), float32.

    Each input shape is compiled when first met (a few hundred ms; OpenVINO caches compiled
    networks in ``compiled_cache``); at most ``streams`` compiled networks are kept, the
    least recently used dropped first, so a scene's edge chunks (other shapes) cost a
    compilation each time the shape changes, not a second network's memory.

    ``precision`` among fp32, bf16, fp16 (OpenVINO's inference precision hint). ``tta`` (among
    :data:`TTA`): the average over the window's flips and quarter turns, as
    :class:`geoseg.models.predictor.TorchPredictor` makes it. ``threads``: CPU threads per pass
    (default: every core); ``streams``: passes that may run side by side (one per worker
    thread)."""

    quantizes_on_device = False

    def __init__(
        self,
        model: Any,
        precision: str = "fp32",
        tta: str = "none",
        threads: int | None = None,
        streams: int = 1,
        compiled_cache: Path | None = None,
    ) -> None:
        if precision not in _OV_PRECISION:
            raise ConfigError(
                f"precision must be one of {', '.join(_OV_PRECISION)} with OpenVINO, "
                f"got {precision!r}"
            )
        self.ov = _import_openvino()
        self.model = model
        self.precision = precision
        self.transforms = tta_transforms(tta)
        self.config: dict[str, str] = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": str(streams),
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        if compiled_cache is not None:
            self.config["CACHE_DIR"] = str(compiled_cache)
        self._core = self.ov.Core()
        #: compiled networks by input shape, least recently used first, at most ``streams``:
        #: each holds its own activation memory (1 GiB for a 2624² window), so the edge
        #: chunks' shapes of a scene must not add theirs to the interior one's
        self._compiled: OrderedDict[tuple[int, ...], _Compiled] = OrderedDict()
        self._keep = max(1, streams)
        self._lock = threading.Lock()
        #: how many times a network was compiled (or read from the compiled cache)
        self.compilations = 0

    def _request(self, shape: tuple[int, ...]) -> Any:
        """This thread's infer request for inputs of ``shape``, compiling it when no network
        of that shape is kept (:attr:`_compiled`)."""
        with self._lock:
            entry = self._compiled.get(shape)
            if entry is None:
                while len(self._compiled) >= self._keep:  # freed before the new one exists
                    self._compiled.popitem(last=False)  # its requests go with it
                model = self.model.clone()
                model.reshape(list(shape))
                entry = _Compiled(self._core.compile_model(model, "CPU", self.config))
                self.compilations += 1
                self._compiled[shape] = entry
            self._compiled.move_to_end(shape)
            ident = threading.get_ident()
            req = entry.requests.get(ident)
            if req is None:
                req = entry.requests[ident] = entry.network.create_infer_request()
        return req

    def _pass(self, x: np.ndarray) -> np.ndarray:
        """One pass on a C-contiguous float32 batch: float32 probabilities (a new array)."""
        req = self._request(x.shape)
        req.infer({0: x}, share_inputs=True)
        return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(self.transforms) == 1:
            return self._pass(x)
        total: np.ndarray | None = None
        for k, flip in self.transforms:
            t = x[..., ::-1] if flip else x
            y = self._pass(np.ascontiguousarray(np.rot90(t, k, (-2, -1)) if k else t))
            y = np.rot90(y, -k, (-2, -1)) if k else y
            y = y[..., ::-1] if flip else y
            if total is None:
                total = np.ascontiguousarray(y)
            else:
                total += y
        assert total is not None
        total /= np.float32(len(self.transforms))
        return total


def openvino_predictor(
    bundle: Bundle,
    load: Callable[[], torch.nn.Module],
    precision: str,
    tta: str = "none",
    threads: int | None = None,
    streams: int = 1,
    cache: Path | None = None,
) -> OpenVINOPredictor:
    """An :class:`OpenVINOPredictor` for ``bundle``, converted once per machine (see
    :func:`openvino_model`; ``load`` builds the torch module when it must be converted)."""
    model, folder, _ = openvino_model(bundle, load, cache)
    return OpenVINOPredictor(model, precision, tta, threads, streams, folder / "compiled")
