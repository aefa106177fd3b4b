"""Error hierarchy: one root, and subclasses that also inherit the builtin they resemble."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "GeosegError",
    "InputError",
    "ModelError",
    "OutputError",
    "call_portably",
    "describe_validation_error",
    "first_line",
]


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose; the CLI turns it into exit code 2."""

    def portable(self) -> GeosegError:
        """A copy of the same type and message without cause or traceback: what crosses a process
        boundary intact. (Dask pickles an exception with its cause chain, and a cause such as
        rasterio's ``CPLE_AppDefinedError`` cannot be unpickled: the client then got a bare
        ``Exception`` instead of this error.)"""
        return type(self)(*self.args)


def call_portably(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, re-raising a :class:`GeosegError` as its :meth:`~GeosegError.portable`
    copy; for functions that run as tasks in other processes."""
    try:
        return fn(*args)
    except GeosegError as exc:
        portable = exc.portable()
    raise portable  # outside the handler: no __context__ either (Dask pickles that too)


class InputError(GeosegError, ValueError):
    """An input file (scene, label, vector layer) is missing, unreadable or unsupported."""


class ModelError(GeosegError, ValueError):
    """A model bundle is missing, malformed, or does not fit the data."""


class ConfigError(GeosegError, ValueError):
    """A configuration value or file is invalid."""


class OutputError(GeosegError, OSError):
    """An output cannot be written (permissions, full disk, bad path)."""


def describe_validation_error(exc: Any) -> str:
    """One line per problem of a pydantic ``ValidationError``: ``field.path: message; …``."""
    return "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
