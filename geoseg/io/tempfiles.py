"""Temporary names for outputs in progress, and the sweep of those a killed process left.

Every output is written under a hidden temporary name beside its final name and renamed onto
it when complete. The temporary name says who wrote it: ``.<final name>.<pid>-<host>-<random>
.partial[<suffix>]``, where ``host`` is 6 hex digits of a hash of the host name. A process that
dies by ``kill -9`` cannot remove its files; :func:`sweep` removes them at the start of the
next command that writes to the same directory:

- a file written on this host by a process that no longer exists is removed at once;
- a file of another host (a shared file system), or in an older naming without an owner, is
  removed when nothing has modified it for :data:`STALE_AFTER_S`;
- a file of a live process (a concurrent command writing into the same directory) is kept.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import time
import uuid
from pathlib import Path

__all__ = ["STALE_AFTER_S", "host_tag", "owner", "stale", "sweep", "temporary_path"]

#: A temporary file of an unknown or remote owner is stale when unmodified for this long (s).
STALE_AFTER_S = 24 * 3600.0

_OWNED = re.compile(r"\.(\d+)-([0-9a-f]{6})-[0-9a-f]{6}\.partial")


@functools.cache
def host_tag() -> str:
    """6 hex digits naming this host in temporary file names."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temporary_path(final: Path, suffix: str = "") -> Path:
    """A hidden temporary name beside ``final`` that names its writer (pid and host).

    ``suffix`` is appended after ``.partial`` (GDAL and OGR pick drivers by extension)."""
    tag = f"{os.getpid()}-{host_tag()}-{uuid.uuid4().hex[:6]}"
    return final.with_name(f".{final.name}.{tag}.partial{suffix}")


def owner(path: Path) -> tuple[int, str] | None:
    """(pid, host tag) of the process that named ``path``; None for other names."""
    m = _OWNED.search(path.name)
    return (int(m.group(1)), m.group(2)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale(path: Path, now: float | None = None) -> bool:
    """Whether the temporary file ``path`` was left by a process that is gone (see module)."""
    who = owner(path)
    if who is not None and who[1] == host_tag():
        return who[0] != os.getpid() and not _alive(who[0])
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def sweep(directory: Path) -> list[Path]:
    """Remove the stale temporary files (``.*.partial*``) directly in ``directory``; returns
    them. Files that vanish or cannot be removed meanwhile are left alone."""
    removed: list[Path] = []
    try:
        candidates = [p for p in directory.glob(".*.partial*") if p.is_file()]
    except OSError:
        return removed
    for p in candidates:
        if stale(p):
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p)
    return removed
