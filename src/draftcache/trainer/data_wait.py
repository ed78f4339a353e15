"""``DataWait``: how much of a training loop's wall time is spent blocked waiting for its next batch.

Wrap the batch iterator with ``wrap``; ``window()`` returns the share of wall time since the last
call spent inside the iterator's ``__next__`` (reading, or waiting for the reader threads), and
``total()`` the share since the start. Time inside ``excluded()`` (validation, checkpoints) counts
in neither. On a GPU the step itself is asynchronous, but the loop synchronises at least once a
step (the loss is read at each log step, the optimizer step), so over a window of steps the wall
time is the real step time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["DataWait"]

T = TypeVar("T")


class DataWait:
    def __init__(self) -> None:
        now = time.perf_counter()
        self._window_start = self._start = now
        self._window_wait = self._wait = 0.0
        self._excluded = self._window_excluded = 0.0

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield ``iterable``'s items, timing each ``next``."""
        iterator = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                waited = time.perf_counter() - t
                self._wait += waited
                self._window_wait += waited
            yield item

    @contextlib.contextmanager
    def excluded(self):
        """Time spent inside (validation, checkpoints) is not step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t
            self._excluded += spent
            self._window_excluded += spent

    def window(self) -> float:
        """Share of the wall time since the previous ``window()`` spent waiting for data; restarts the window."""
        now = time.perf_counter()
        share = self._window_wait / max(now - self._window_start - self._window_excluded, 1e-9)
        self._window_start, self._window_wait, self._window_excluded = now, 0.0, 0.0
        return share

    def total(self) -> float:
        """Share of all the wall time since construction spent waiting for data."""
        return self._wait / max(time.perf_counter() - self._start - self._excluded, 1e-9)
