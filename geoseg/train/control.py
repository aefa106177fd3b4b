"""How a training run is steered: its precision, and stopping it cleanly at a batch boundary.

SIGTERM or SIGINT during training asks the loop to finish the batch in progress, save a
checkpoint and raise :class:`TrainingStopped`; a second signal stops at once.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from geoseg.errors import ConfigError, GeosegError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRECISIONS",
    "StopRequest",
    "TrainingStopped",
    "autocast_dtype",
    "decode_generator",
    "encode_generator",
]

log = logging.getLogger(__name__)

#: Training precisions: auto is bf16 autocast where the device has native bf16, else fp32.
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingStopped(GeosegError):
    """Training stopped on request after saving its state; the same command resumes it.

    ``signum`` is the signal that asked for it (None for a ``stop`` callback)."""

    def __init__(self, message: str, epoch: int, batch: int, signum: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """130 after SIGTERM or SIGINT, as every geoseg command stopped by either; else 1."""
        return 130 if self.signum else 1


class StopRequest:
    """A stop asked for by a signal (see :meth:`on_signals`) or by a ``poll`` callback
    (epoch, batches done in it) → True, checked after every batch."""

    def __init__(self, poll: Callable[[int, int], bool] | None = None) -> None:
        self.poll = poll
        self.signum: int | None = None

    def __call__(self, epoch: int, done: int) -> bool:
        if self.signum is not None:
            return True
        return self.poll is not None and bool(self.poll(epoch, done))

    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "request"

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """Catch SIGTERM and SIGINT while inside (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.signum is not None:
                for s, h in previous.items():
                    signal.signal(s, h)
                raise KeyboardInterrupt(f"second {name}: stopping without saving")
            self.signum = signum
            log.warning("%s: finishing this batch, then saving a checkpoint and stopping", name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for num, old in previous.items():
                signal.signal(num, old)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass (None: fp32). auto → bf16 on a CUDA device
    that supports it and on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere."""
    import torch

    from geoseg.models.predictor import cpu_supports_bf16

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def encode_generator(state: torch.Tensor) -> str:
    """A torch generator's state (``Generator.get_state()``) as base64 text (for JSON)."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_generator(text: str) -> torch.Tensor:
    """The state tensor that :func:`encode_generator` wrote."""
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
