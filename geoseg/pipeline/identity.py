"""Identities of the files a pipeline reads and writes: size plus modification time, or for
a remote object its version, as the ledger records them, to tell whether a scene or an output
is still the file an earlier run saw or wrote.
"""

from __future__ import annotations

from pathlib import Path

from geoseg.errors import GeosegError
from geoseg.io.remote import identity, is_remote

__all__ = ["file_identity", "output_identity"]


def file_identity(path: Path | str) -> tuple[int | None, int | None]:
    """(size in bytes, mtime in ns) of ``path``; for a remote scene (size, a number made from
    its ETag or Last-Modified, see :func:`geoseg.io.remote.identity`); (None, None) when it
    cannot be stat'ed or reached."""
    if isinstance(path, str):
        try:
            return identity(path)
        except GeosegError:
            return None, None
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def output_identity(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns, or for an object its version) of an output file or
    object, or None when it is not there."""
    if is_remote(path):
        try:
            return identity(path)
        except GeosegError:
            return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
