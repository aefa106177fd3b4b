"""Predictors: the device and precision a model runs at, the torch predictor (test-time
augmentation, on-device quantization), and the per-process cache of predictors that chunk tasks
share (``BundleFactory`` builds torch or OpenVINO ones from a bundle)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from geoseg.errors import ConfigError, ModelError
from geoseg.models.backends import tta_transforms
from geoseg.models.bundle import Normalization, load_module

if TYPE_CHECKING:
    import torch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


DEVICES = ("auto", "cpu", "cuda")


class Predictor(Protocol):
    """Maps a normalized float32 batch (N, bands, H, W) to class probabilities (N, K, H, W)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class PredictorFactory(Protocol):
    """A small, picklable, hashable recipe that builds a :class:`Predictor` on a worker."""

    def build(self) -> Predictor: ...

    def __hash__(self) -> int: ...


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 instructions (AVX512-BF16 or AMX), where autocast pays."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: Device nodes of a GPU driver torch can use (NVIDIA's, AMD's ROCm, WSL's): without any of
#: them no CUDA device can be visible.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """Whether this machine has a GPU driver's device node (:data:`GPU_DEVICE_NODES`). When it
    has none, 'auto' is the CPU without importing torch (500 MiB of resident memory that the
    OpenVINO backend does not need)."""
    return any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a CUDA device is visible, else 'cpu'."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but no CUDA device is available")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """'auto' → what the device runs fast: bf16 (or fp16) on CUDA, bf16 on CPUs that have it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


class TorchPredictor:
    """Runs a torch module on a device with optional autocast, returning softmax probabilities.

    ``tta`` (among :data:`TTA`): average the probabilities of the module's passes on the
    flipped and rotated windows, each brought back onto the window (see :meth:`_forward`).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: str = "cpu",
        precision: str = "fp32",
        activation: str | None = "softmax",
        tta: str = "none",
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.precision = precision
        self.activation = activation
        self.transforms = tta_transforms(tta)
        self.memory_format = torch.channels_last
        self.module = module.eval().to(self.device).to(memory_format=self.memory_format)
        #: quantize on the device (see :meth:`quantized`): a quarter of the bytes come back
        self.quantizes_on_device = self.device.type == "cuda"
        # one pass at a time on a GPU; on a CPU passes may run side by side (each thread's
        # ops use torch's intra-op threads, see :func:`torch_threads`)
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.device.type == "cuda" else contextlib.nullcontext()
        )
        self._norms: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}

    def _forward(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 probabilities (N, K, H, W), left on the device. ``batch``: normalized float32
        pixels, as an array or as a tensor already on the device.

        With test-time augmentation, one pass per transform, one after another (the memory of
        one pass plus a float32 sum), each pass's probabilities transformed back, summed in the
        order of :func:`tta_transforms` and divided by their number. A window's sides are
        multiples of the encoder's stride, so a flipped or turned window keeps the pooling grid
        of the whole scene flipped or turned alike: tiles stay as seamless as without it."""
        import torch

        if isinstance(batch, torch.Tensor):
            x = batch
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
        if len(self.transforms) == 1:
            return self._pass(x)
        with torch.inference_mode():
            (k, flip), *rest = self.transforms
            # a copy: without an activation, a module's output may be its input's memory
            total = _untransform(self._pass(_transform(x, k, flip)), k, flip).clone()
            for k, flip in rest:
                total.add_(_untransform(self._pass(_transform(x, k, flip)), k, flip))
            return total.div_(len(self.transforms))

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the module on float32 pixels ``x`` (N, bands, H, W): float32
        probabilities (N, K, H, W), on the device."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        x = x.contiguous(memory_format=self.memory_format)
        with (
            self._lock,
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ),
        ):
            y = self.module(x)
        with torch.inference_mode():
            y = y.float()
            if self.activation == "softmax":
                y = torch.softmax(y, dim=1)
        return y

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch).cpu().numpy()

    def warm(self, shape: tuple[int, ...]) -> None:
        """One pass on zeros of ``shape`` (N, bands, H, W) on the device: CUDA loads its kernels
        and picks its convolution algorithms for that shape now, not in the first chunk."""
        import torch

        with torch.inference_mode():
            self._forward(torch.zeros(shape, device=self.device)).cpu()

    def quantized(
        self, batch: np.ndarray | torch.Tensor, windows: Sequence[tuple[int, int, int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch item, :func:`quantize` of its window (row, col, height, width), on the device.

        Returns uint8 probabilities (K, h, w) 0–255 and uint8 class ids (h, w), equal to what
        :func:`quantize` makes of the same float probabilities (nodata is not applied here).
        """
        import torch

        y = self._forward(batch)
        out = []
        with torch.inference_mode():
            for item, (r, c, h, w) in zip(y, windows, strict=True):
                p = item[:, r : r + h, c : c + w]
                classes = p.argmax(0).to(torch.uint8)  # the first index wins ties, as argmax0
                q = p.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
                out.append((q.cpu().numpy(), classes.cpu().numpy()))
        return out

    def _constants(
        self, normalization: Normalization, bands: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, mean, std) as float32 tensors on the device, made once per normalization (a
        copy from pageable memory would wait for the device's queue)."""
        import torch

        key = (normalization.scale, tuple(normalization.mean), tuple(normalization.std), bands)
        got = self._norms.get(key)
        if got is None:
            mean, std = normalization.arrays(bands)
            scale = np.array(normalization.scale, np.float32)
            got = tuple(torch.from_numpy(a).to(self.device) for a in (scale, mean, std))
            self._norms[key] = got
        return got  # type: ignore[return-value]

    def normalized(
        self, raw: Sequence[np.ndarray], valid: Sequence[np.ndarray], normalization: Normalization
    ) -> torch.Tensor:
        """:meth:`Normalization.apply` of each raw (bands, H, W) array, stacked, on the device.

        The raw pixels travel instead of float32 ones (a quarter of the bytes for uint8), and
        the same float32 operations run in the same order, so the result is the same.
        """
        import torch

        cuda = self.device.type == "cuda"
        stacked = torch.empty((len(raw), *raw[0].shape), dtype=getattr(torch, raw[0].dtype.name))
        if cuda:
            stacked = stacked.pin_memory()
        np.stack(raw, out=stacked.numpy())
        invalid = None
        if not all(v.all() for v in valid):
            invalid = torch.from_numpy(~np.stack(valid))
            invalid = invalid.pin_memory().to(self.device, non_blocking=True) if cuda else invalid
        scale, mean, std = self._constants(normalization, raw[0].shape[0])
        with torch.inference_mode():
            x = stacked.to(self.device, non_blocking=True).to(torch.float32)
            # tensors, not Python numbers: a scalar divisor becomes a multiplication by its
            # reciprocal on CUDA, which rounds differently from numpy's division
            x.div_(scale).sub_(mean).div_(std)
            if invalid is not None:
                x.masked_fill_(invalid[:, None], 0.0)
        return x


def _transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``x`` (..., H, W) flipped left to right when ``flip``, then turned ``k`` quarter turns
    counter-clockwise: (..., W, H) for odd ``k``."""
    import torch

    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, (-2, -1)) if k else x


def _untransform(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`_transform`: ``y`` back onto the untransformed window."""
    import torch

    if k:
        y = torch.rot90(y, -k, (-2, -1))
    return y.flip(-1) if flip else y


#: Pixel types that :meth:`TorchPredictor.normalized` takes as they are (torch has each).
DEVICE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "int32", "float32", "float64"})


@dataclass(frozen=True)
class BundleFactory:
    """Builds a predictor from a bundle directory: a :class:`TorchPredictor`, or with
    ``backend`` openvino a :class:`geoseg.models.backends.OpenVINOPredictor` (the network converted
    once per machine and cached); cached once per worker process."""

    path: str
    sha256: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    #: test-time augmentation, among :data:`TTA`
    tta: str = "none"
    #: the inference backend, resolved (see :func:`geoseg.models.backends.resolve_backend`)
    backend: str = "torch"
    #: passes that may run side by side in one process (worker threads; OpenVINO's streams)
    streams: int = 1
    #: the hash of the bundle's model.json when this recipe was made (``Bundle.spec_sha256``):
    #: the recipe keys the per-process predictor cache, so on workers that outlive a run a
    #: model.json that changed (its input filter, say) builds a new predictor; changed weights
    #: are refused by their hash
    spec_sha256: str = ""
    #: the run's input filter (:func:`geoseg.models.input_filter.parse_input_filter`)
    input_filter: str = "model"

    def build(self) -> Predictor:
        from geoseg.models.bundle import load_bundle

        bundle = load_bundle(self.path)
        if bundle.sha256 != self.sha256:
            raise ModelError(
                f"{self.path}: weights changed while running (hash {bundle.sha256[:12]})"
            )
        bundle = bundle.with_input_filter(self.input_filter)
        if self.backend == "openvino":
            from geoseg.models.backends import openvino_predictor

            try:
                return openvino_predictor(
                    bundle,
                    partial(load_module, bundle),
                    self.precision,
                    self.tta,
                    self.threads,
                    self.streams,
                )
            except ModelError as exc:
                raise ModelError(f"{self.path}: {exc}") from exc
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return TorchPredictor(
            load_module(bundle), self.device, self.precision, bundle.spec.activation, self.tta
        )


_PREDICTORS: dict[Hashable, Predictor] = {}


_PREDICTORS_LOCK = threading.Lock()


LOAD_COUNT: dict[Hashable, int] = {}


def get_predictor(factory: PredictorFactory) -> Predictor:
    """The predictor for ``factory`` in this process, built on first use only."""
    with _PREDICTORS_LOCK:
        pred = _PREDICTORS.get(factory)
        if pred is None:
            pred = factory.build()
            _PREDICTORS[factory] = pred
            LOAD_COUNT[factory] = LOAD_COUNT.get(factory, 0) + 1
        return pred
