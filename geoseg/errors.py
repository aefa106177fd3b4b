"""Error hierarchy: one root, and subclasses that also inherit the builtin they resemble."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "GeosegError",
    "InputError",
    "ModelError",
    "OutputError",
    "describe_validation_error",
]


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose; the CLI turns it into exit code 2."""


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
