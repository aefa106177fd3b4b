"""Weight averaging over a run's last epochs (``optim.average_from_epoch``).

The weights at the end of every epoch from ``average_from_epoch`` on are kept in the
checkpoint directory (``epochs/``, float32, one file each, written before the epoch's
checkpoint so a resumed run has them all). When the last epoch is done their mean is taken,
the BatchNorm statistics of the mean are measured again on training chips (the mean of each
epoch's statistics does not describe the averaged network), and the result is validated like
an epoch and written as a bundle of its own beside the best epoch's (``<out>-averaged``).
Averaging the weights along the end of a run finds a flatter point of the loss than any one
epoch, which tends to generalize better to data unlike the training set (stochastic weight
averaging; Izmailov et al. 2018).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from geoseg.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EPOCHS_DIR",
    "averaged_out",
    "clear_epoch_weights",
    "epoch_weights_file",
    "mean_weights",
    "measure_batchnorm",
    "save_epoch_weights",
]

EPOCHS_DIR = "epochs"


def averaged_out(out: Path) -> Path:
    """Where the averaged bundle of a run writing ``out`` goes: ``<out>-averaged`` beside it."""
    return out.with_name(f"{out.name}-averaged")


def epoch_weights_file(checkpoint_dir: Path, epoch: int) -> Path:
    """The weights kept at the end of 0-based ``epoch``."""
    return checkpoint_dir / EPOCHS_DIR / f"epoch-{epoch + 1:04d}.safetensors"


def clear_epoch_weights(checkpoint_dir: Path) -> None:
    """Forget the kept epochs (a restarted run)."""
    d = checkpoint_dir / EPOCHS_DIR
    if d.is_dir():
        for f in d.glob("*.safetensors"):
            f.unlink(missing_ok=True)


def save_epoch_weights(module: torch.nn.Module, path: Path) -> None:
    """``module``'s weights as float32 safetensors, written to a temporary file then renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    weights = {
        k: v.detach().float().cpu().contiguous()
        if v.is_floating_point()
        else v.detach().cpu().contiguous()
        for k, v in module.state_dict().items()
    }
    try:
        save_file(weights, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mean_weights(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating-point tensors of ``files`` (integer tensors, such
    as BatchNorm's batch counters, from the last file); :class:`ModelError` naming a file that
    cannot be read or does not hold the same tensors as the first."""
    from safetensors.torch import load_file

    if not files:
        raise ModelError("no epoch weights to average")
    total: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files):
        try:
            w = load_file(str(f))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ModelError(f"{f}: unreadable epoch weights ({exc})") from exc
        if i and set(w) != set(total):
            raise ModelError(f"{f}: holds other tensors than {files[0]}")
        for k, v in w.items():
            if not v.is_floating_point():
                total[k] = v
            elif i == 0:
                total[k] = v.double()
            else:
                total[k] += v.double()
    n = len(files)
    return {k: (v / n).float() if v.is_floating_point() else v for k, v in total.items()}


def measure_batchnorm(
    net: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    autocast: torch.dtype | None,
) -> None:
    """Replace the running statistics of every BatchNorm layer of ``net`` by their mean over
    ``batches`` (images only, forward passes without gradients); every other layer stays in
    eval mode (no dropout or stochastic depth). ``net`` is left in eval mode."""
    import torch

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    net.eval()
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches
        m.train()
    dtype = autocast or torch.float32
    try:
        with torch.no_grad():
            for x in batches:
                with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
                    net(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.eval()
