"""Batches prepared ahead of the model: a background thread runs an iterator a few items ahead.

The iterator runs in one thread, in order, so whatever randomness it draws is drawn in the
same order as without the thread: results do not depend on timing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["Prefetch"]

T = TypeVar("T")

_DONE = object()


class Prefetch(Generic[T]):
    """Iterate ``items`` with up to ``depth`` items made ahead by a background thread (0: no
    thread). An exception of the iterator is raised where its item would have come; leaving
    the ``with`` block early stops the thread."""

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self.items = items
        self.depth = depth
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetch[T]:
        if self.depth > 0:
            self._thread = threading.Thread(target=self._run, name="geoseg-batches", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it may finish the item it is making)."""
        self._stop.set()
        if self._thread is None:
            return
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)  # unblock a put
        self._thread = None

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        if self._thread is None and self.depth > 0:
            raise RuntimeError("use Prefetch in a with block")
        if self.depth <= 0:
            yield from self.items
            return
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
