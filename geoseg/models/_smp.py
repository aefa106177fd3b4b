"""Import segmentation-models-pytorch without importing ``torch._dynamo``.

smp imports timm, timm imports ``torchvision.ops``, and ``torchvision.ops.roi_align`` imports
``torch._dynamo`` (for ``is_compile_supported``), as does timm's use of
``torch.compiler.disable`` as a decorator. Inference never compiles anything, yet that import
costs 2.5–3 s of every start and about 150 MiB of peak RSS on a 2-core CPU (torch 2.14).

:func:`import_smp` imports smp with stand-ins for ``torch._dynamo`` and
``torch._dynamo.utils`` in ``sys.modules``, then removes them. The stand-ins defer, they never
replace: ``disable`` and ``is_compile_supported`` call the real functions when first used, and
any other name, or any other ``torch._dynamo`` submodule imported meanwhile, loads the real
package on the spot. Afterwards ``torch._dynamo`` is torch's own lazy attribute again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["import_smp"]

_PKG = "torch._dynamo"
_UTILS = "torch._dynamo.utils"
_LOCK = threading.Lock()


def _real(name: str) -> types.ModuleType:
    """The real module ``name``, the stand-ins removed first."""
    _remove_standins()
    return importlib.import_module(name)


def _remove_standins() -> None:
    for name in (_UTILS, _PKG):
        if isinstance(sys.modules.get(name), _StandIn):
            del sys.modules[name]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(torch.__dict__.get("_dynamo"), _StandIn):
        del torch._dynamo  # torch's module __getattr__ imports the real one on use


class _StandIn(types.ModuleType):
    """Any name not set on the stand-in comes from the real module, loaded on first use."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(_real(self.__name__), attr)


def _disable(
    fn: Callable[..., Any] | None = None, recursive: bool = True, *, reason: str | None = None
) -> Any:
    """``torch._dynamo.disable``, applied when ``fn`` is first called."""
    if fn is None:
        return functools.partial(_disable, recursive=recursive, reason=reason)
    if isinstance(fn, type) or not callable(fn):  # not a plain function: nothing to defer
        return _real(_PKG).disable(fn, recursive, reason=reason)
    applied: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def deferred(*args: Any, **kwargs: Any) -> Any:
        if not applied:
            applied.append(_real(_PKG).disable(fn, recursive, reason=reason))
        return applied[0](*args, **kwargs)

    return deferred


def _is_compile_supported(device_type: str) -> bool:
    return bool(_real(_UTILS).is_compile_supported(device_type))


class _Loaded(importlib.abc.Loader):
    """Hands the import system a module that is already in ``sys.modules``."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set ours


class _OtherSubmodules(importlib.abc.MetaPathFinder):
    """Another ``torch._dynamo`` submodule imported under the stand-ins: load the real package
    (which imports the submodule as it should) and hand that over."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PKG + ".") or not isinstance(sys.modules.get(_PKG), _StandIn):
            return None
        module = _real(fullname)
        return importlib.machinery.ModuleSpec(fullname, _Loaded(module))


@contextlib.contextmanager
def _dynamo_deferred() -> Iterator[None]:
    import torch  # noqa: F401  (first: the stand-ins must not meet torch's own import)

    if _PKG in sys.modules or "torchvision" in sys.modules:  # nothing left to save
        yield
        return
    pkg = _StandIn(_PKG)
    pkg.__path__ = []
    pkg.disable = _disable  # type: ignore[attr-defined]
    utils = _StandIn(_UTILS)
    utils.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    finder = _OtherSubmodules()
    sys.modules[_PKG] = pkg
    sys.modules[_UTILS] = utils
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        _remove_standins()


def import_smp() -> types.ModuleType:
    """``segmentation_models_pytorch``, imported without ``torch._dynamo`` when possible."""
    smp = sys.modules.get("segmentation_models_pytorch")
    if smp is not None:
        return smp
    with _LOCK, _dynamo_deferred():
        return importlib.import_module("segmentation_models_pytorch")
