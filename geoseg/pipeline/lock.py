"""A per-pipeline lock, so that two runs of the same pipeline never overlap.

It is an ``flock`` on a small file holding the owner's host, pid and start time. The kernel
drops the lock when its process dies, even by SIGKILL, so a crash never leaves it stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from geoseg.errors import GeosegError, OutputError

__all__ = ["PipelineLock", "PipelineLocked"]


class PipelineLocked(GeosegError, RuntimeError):
    """Another process is running this pipeline."""


class PipelineLock:
    """Exclusive, non-blocking lock on ``path``, held from ``__enter__`` to ``__exit__``."""

    def __init__(self, path: str | os.PathLike[str], name: str) -> None:
        self.path = Path(path)
        self.name = name
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the pipeline lock ({exc})") from exc
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = _describe(f.read())
            f.close()
            raise PipelineLocked(
                f"pipeline {self.name!r} is already running{owner}; wait for it to finish "
                f"(lock file {self.path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        )
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> PipelineLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f" (pid {info['pid']} on {info['host']}, since {started})"
    except (ValueError, KeyError, TypeError):
        return ""
