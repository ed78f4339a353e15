"""``CacheBatchLoader``: raw batches of a training plan, read ahead by threads into reused buffers.

The trainer's fast path from cache to device::

    loader = CacheBatchLoader(cache_dir, plan, max_tokens=None)   # plan: [[sample ids], ...]
    for raw in loader:                                             # stored rows, host memory
        batch = reader.expand_batch(raw, device)                   # == collate_padded([reader[i]...])

Why threads and reused buffers rather than DataLoader worker processes: reading a raw batch is
``os.preadv`` calls (they release the GIL) plus a few small tensor ops, so threads read in
parallel without pickling or a shared-memory copy; and a batch buffer that is filled again and
again is already paged in, where a fresh multi-MB allocation per batch pays one page fault per
4 KiB (on some VMs several times slower than the copy itself).

The price is a lifetime rule: **a raw batch is valid until the next one is requested** (its
buffer is then refilled). ``expand_batch`` always returns new tensors, so the usual loop is safe;
keep ``raw`` itself across iterations only after ``clone``-ing what you need. With
``pin_memory`` the buffers are page-locked and a CUDA event recorded on the current stream when
the next batch is requested guards the asynchronous host-to-device copies made from the previous
one: its buffer is refilled only after that event completes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from draftcache.cache_format.reader import CacheReader

__all__ = ["CacheBatchLoader"]

_GROWTH = 1.25  # a buffer that is too small is replaced by one this much larger than needed


class _Buffer:
    """One reusable byte buffer; grows (never shrinks) to the largest batch it has held."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.tensor: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self.tensor is None or self.tensor.numel() < nbytes:
            size = int(nbytes * _GROWTH) + 64
            if self.pin_memory:
                self.tensor = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:
                # numpy asks the kernel for transparent huge pages on large arrays (madvise), so the
                # first touch of a new buffer faults 2 MiB at a time instead of 4 KiB
                self.tensor = torch.from_numpy(np.empty(size, dtype=np.uint8))
        return self.tensor


class CacheBatchLoader:
    """Iterate the raw batches ``reader.get_raw_batch(plan[b], ...)`` of ``plan``, in order.

    Args:
        path: the cache directory (each thread opens its own ``CacheReader``).
        plan: the sample indices of each batch.
        max_tokens: ``None``: padded batches (``collate_padded``); else packed rows of at most
            ``max_tokens`` tokens (``pack_samples``).
        pad_to_multiple_of: round the batch width up to a multiple of this.
        num_threads: reader threads.
        prefetch: batches read ahead of the one the consumer holds; ``prefetch + 1`` buffers.
        pin_memory: page-locked buffers for asynchronous copies to CUDA (default: when CUDA is
            available).
    """

    def __init__(self, path: str | os.PathLike, plan: Sequence[Sequence[int]], *, max_tokens: int | None = None,
                 pad_to_multiple_of: int | None = None, num_threads: int = 2, prefetch: int = 4,
                 pin_memory: bool | None = None):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (batches read ahead); got {prefetch}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (page-locked memory is for copies to a GPU); pass "
                             "pin_memory=False on a CPU-only machine")
        self.path = Path(path)
        with CacheReader(self.path) as reader:  # fail here, not in a thread, on a missing cache
            self._size = len(reader)
        self.plan = self._checked_plan(plan)
        self.max_tokens, self.pad_to_multiple_of = max_tokens, pad_to_multiple_of
        self.num_threads, self.prefetch, self.pin_memory = num_threads, prefetch, pin_memory
        self._ring: list[_Buffer] | None = None  # kept between iterations: warm buffers for the next epoch

    def _checked_plan(self, plan: Sequence[Sequence[int]]) -> list[list[int]]:
        checked = [[int(i) for i in batch] for batch in plan]
        empty = [b for b, batch in enumerate(checked) if not batch]
        if empty:
            raise ValueError(f"plan batch {empty[0]} is empty; every batch needs at least one sample index")
        bad = [i for batch in checked for i in batch if not -self._size <= i < self._size]
        if bad:
            raise IndexError(f"plan refers to sample {bad[0]}, but the cache has {self._size} committed samples")
        return checked

    def __len__(self) -> int:
        return len(self.plan)

    def set_plan(self, plan: Sequence[Sequence[int]]) -> None:
        """Iterate ``plan`` next (e.g. the next epoch's order), keeping the warm buffers."""
        self.plan = self._checked_plan(plan)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ring, self._ring = self._ring, None  # a second, concurrent iteration gets its own buffers
        if ring is None:
            ring = [_Buffer(self.pin_memory) for _ in range(self.prefetch + 1)]
        plan = self.plan  # set_plan during an iteration applies to the next one
        local = threading.local()
        readers: list[CacheReader] = []

        def read(b: int, event: torch.cuda.Event | None) -> dict[str, torch.Tensor]:
            if event is not None:
                event.synchronize()  # the copies out of this buffer's previous batch have finished
            reader = getattr(local, "reader", None)
            if reader is None:
                reader = local.reader = CacheReader(self.path)
                readers.append(reader)
            return reader.get_raw_batch(plan[b], max_tokens=self.max_tokens,
                                        pad_to_multiple_of=self.pad_to_multiple_of,
                                        allocate=ring[b % len(ring)].take)

        pending: deque[Future] = deque()
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="draftcache-read")
        try:
            for b in range(min(len(ring), len(plan))):
                pending.append(pool.submit(read, b, None))
            for b in range(len(plan)):
                raw = pending.popleft().result()
                yield raw
                del raw
                # the consumer asked for batch b+1: batch b's buffer can be refilled
                follow = b + len(ring)
                if follow < len(plan):
                    event = None
                    if self.pin_memory:
                        event = torch.cuda.Event()
                        event.record()
                    pending.append(pool.submit(read, follow, event))
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            for reader in readers:
                reader.close()
            self._ring = ring
