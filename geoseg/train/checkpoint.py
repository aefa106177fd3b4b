"""Resumable training state: the full checkpoint directory and the compact snapshot file.

The checkpoint directory holds ``state/`` (weights, optimizer and ``state.json``, replaced as
a whole) and ``cache/`` (see :mod:`geoseg.train.cache`). The snapshot is one safetensors
file small enough to commit: float16 weights, AdamW's moments in bfloat16 (float16 would
underflow ``exp_avg_sq``), its step counts, and the JSON state in the file's metadata. A run
resumed from a snapshot continues where it stopped, but not bit for bit.

JSON has no NaN: NaN values (an IoU no validation chip could measure) are written as null and
read back as NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.errors import ConfigError, ModelError
from geoseg.io.tempfiles import sweep, temporary_path
from geoseg.models.bundle import follow_umask

if TYPE_CHECKING:
    import torch

__all__ = [
    "Checkpoint",
    "Snapshot",
    "dumps_state",
    "loads_state",
    "position",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_DIR = "state"

#: Float fields of the state that may be NaN (stored as null).
_FLOAT_KEYS = frozenset(
    {"best_score", "train_loss", "val_loss", "score", "lr", "chips_per_s", "seconds", "losses"}
)


def _nan_to_null(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_null(v) for v in obj]
    return obj


def _null_to_nan(obj: Any, key: str = "") -> Any:
    if obj is None and key in _FLOAT_KEYS:
        return math.nan
    if isinstance(obj, dict):
        floats = key == "val_iou"  # every value is a float
        if key == "val_iou_by_scene":  # scene name → {class: float}
            return {k: _null_to_nan(v, "val_iou") for k, v in obj.items()}
        return {k: math.nan if floats and v is None else _null_to_nan(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_null_to_nan(v, key) for v in obj]
    return obj


def dumps_state(state: dict[str, Any]) -> str:
    """Strict JSON of a training state: NaN becomes null (infinities are refused)."""
    return json.dumps(_nan_to_null(state), indent=1, allow_nan=False)


def loads_state(text: str) -> dict[str, Any]:
    """A training state written by :func:`dumps_state`; null float fields become NaN."""
    state = json.loads(text)
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    return dict(_null_to_nan(state))


def position(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch in progress, batches of it done) that a saved state resumes at."""
    partial = state.get("partial")
    if partial:
        return int(partial["epoch"]), int(partial["batch"])
    return int(state.get("epoch", -1)) + 1, 0


def _check_fingerprint(found: Any, expected: str, where: Path) -> None:
    if found != expected:
        raise ConfigError(
            f"{where}: checkpoint was made with a different training config; "
            "restart training (--restart) or point checkpoint elsewhere"
        )


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    import torch

    for s in optimizer.state.values():
        for key, value in s.items():
            if isinstance(value, torch.Tensor) and key != "step":
                s[key] = value.to(device)


class Checkpoint:
    """The full resumable state under one directory (see module); bit-identical resumes."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    def _found(self) -> Path | None:
        """The directory holding the latest complete state, if any (older layouts included)."""
        for d in (self.state_dir, self.path / f".{STATE_DIR}.old", self.path):
            if (d / STATE_FILE).is_file():
                return d
        return None

    def exists(self) -> bool:
        return self._found() is not None

    def peek(self) -> dict[str, Any] | None:
        """The saved state (with its fingerprint) without loading tensors; None if none."""
        where = self._found()
        if where is None:
            return None
        try:
            return loads_state((where / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{where / STATE_FILE}: unreadable checkpoint state ({exc})") from exc

    def clear(self) -> None:
        """Forget the saved state; the chip cache stays (it depends on the inputs only)."""
        for name in (STATE_DIR, f".{STATE_DIR}.old", f".{STATE_DIR}.partial"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE):
            (self.path / name).unlink(missing_ok=True)

    def load(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> dict[str, Any]:
        """Restore ``module`` and ``optimizer`` in place; return the saved state ({} if none)."""
        import torch
        from safetensors.torch import load_file

        where = self._found()
        if where is None:
            return {}
        state_file = where / STATE_FILE
        try:
            state = loads_state(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{state_file}: unreadable checkpoint state ({exc})") from exc
        _check_fingerprint(state.get("fingerprint"), self.fingerprint, self.path)
        try:
            module.load_state_dict(load_file(str(where / WEIGHTS_FILE)), strict=True)
            opt_state = torch.load(where / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt_state)
        except Exception as exc:  # safetensors/torch raise many types for damaged files
            raise ModelError(f"{where}: damaged checkpoint ({exc})") from exc
        module.to(device)
        _optimizer_to(optimizer, device)
        return state

    def save(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Write all three files to a temporary directory, then swap it into place."""
        import torch
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{STATE_DIR}.partial"
        old = self.path / f".{STATE_DIR}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(tmp / WEIGHTS_FILE))
            follow_umask(tmp / WEIGHTS_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            body = {"fingerprint": self.fingerprint, **state}
            (tmp / STATE_FILE).write_text(dumps_state(body) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if self.state_dir.exists():
                os.replace(self.state_dir, old)
            os.replace(tmp, self.state_dir)
            shutil.rmtree(old, ignore_errors=True)
            for name in (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE):  # the older flat layout
                (self.path / name).unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class Snapshot:
    """The compact, committable state in one safetensors file (see module)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return self.path.is_file()

    def peek(self) -> dict[str, Any] | None:
        """The saved state (with its fingerprint) without loading tensors; None if none."""
        from safetensors import safe_open

        if not self.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
            state = loads_state(meta["state"])
        except Exception as exc:  # safetensors raises many types for damaged files
            raise ModelError(f"{self.path}: unreadable training snapshot ({exc})") from exc
        return {**state, "fingerprint": meta.get("fingerprint")}

    def save(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Write the snapshot under a temporary name, then rename it onto :attr:`path`."""
        import torch
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, value in module.state_dict().items():
            v = value.detach().cpu()
            tensors[f"model.{name}"] = (v.half() if v.is_floating_point() else v).contiguous()
        for name, param in module.named_parameters():
            s = optimizer.state.get(param)
            if not s:
                continue
            tensors[f"adam.exp_avg.{name}"] = s["exp_avg"].detach().cpu().bfloat16().contiguous()
            tensors[f"adam.exp_avg_sq.{name}"] = (
                s["exp_avg_sq"].detach().cpu().bfloat16().contiguous()
            )
            tensors[f"adam.step.{name}"] = torch.as_tensor(s["step"]).detach().cpu().reshape(1)
        meta = {"fingerprint": self.fingerprint, "state": dumps_state(state)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sweep(self.path.parent)
        tmp = temporary_path(self.path)
        try:
            save_file(tensors, str(tmp), metadata=meta)
            follow_umask(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> dict[str, Any]:
        """Restore ``module`` (float32 from float16) and AdamW's moments in place; return the
        saved state ({} when there is no snapshot)."""
        from safetensors import safe_open

        if not self.exists():
            return {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            state = loads_state(meta["state"])
        except Exception as exc:  # safetensors raises many types for damaged files
            raise ModelError(f"{self.path}: unreadable training snapshot ({exc})") from exc
        _check_fingerprint(meta.get("fingerprint"), self.fingerprint, self.path)
        try:
            self._restore(module, optimizer, tensors)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{self.path}: snapshot does not fit the model ({exc})") from exc
        module.to(device)
        _optimizer_to(optimizer, device)
        return state

    @staticmethod
    def _restore(
        module: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Any]
    ) -> None:
        own = module.state_dict()
        weights = {name: tensors[f"model.{name}"].to(value.dtype) for name, value in own.items()}
        module.load_state_dict(weights, strict=True)
        saved = optimizer.state_dict()
        order = [p for group in optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(order)}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, param in module.named_parameters():
            if f"adam.step.{name}" not in tensors:
                continue
            opt_state[index[id(param)]] = {
                "step": tensors[f"adam.step.{name}"].reshape(()).float(),
                "exp_avg": tensors[f"adam.exp_avg.{name}"].to(param.dtype),
                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].to(param.dtype),
            }
        optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
