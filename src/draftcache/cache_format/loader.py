"""``CacheBatchLoader``: raw batches of a training plan, read ahead in windows into reused buffers.

The trainer's fast path from cache to device::

    loader = CacheBatchLoader(cache_dir, plan, max_tokens=None)   # plan: [[sample ids], ...]
    for raw in loader:                                             # stored rows, host memory
        batch = reader.expand_batch(raw, device)                   # == collate_padded([reader[i]...])

Why threads and reused buffers rather than DataLoader worker processes: reading a raw batch is
``os.preadv`` calls (they release the GIL) plus a few small tensor ops, so a thread reads
while the consumer trains, without pickling or a shared-memory copy; and a batch buffer that is filled again and
again is already paged in, where a fresh multi-MB allocation per batch pays one page fault per
4 KiB (on some VMs several times slower than the copy itself).

Windows: consecutive batches of the plan, together at most ``window_bytes`` of stored rows, are
read in ONE pass (``CacheReader.get_raw_batches``): their ranges sorted by file offset, near ones
merged, each shard read front to back straight into the batches' buffers. A training plan
shuffles samples, so one batch's rows lie scattered over the shards; a window's rows cover a
shard densely, and a cold disk reads a file in order about twice as fast as the same ranges in
random order (measured on this project's virtual disk: 0.7-0.9 GB/s against 0.3-0.46 GB/s in
4 MiB requests). When the plan's samples are spread over more shard bytes than a window holds,
the pass skips what other windows read, and reads in ascending offsets with gaps: a globally
shuffled plan does on a cache several windows large. The trainers therefore shuffle by default
in blocks of consecutive samples of about a window's stored bytes (``window_tokens``,
``plan_epoch(shuffle_block_tokens=)``; ``draftcache train --shuffle window``): a window then draws
from at most about two blocks, i.e. two contiguous stretches of the shards. One window is
read at a time, the next while the consumer takes the previous one's batches: host memory is
at most ``(prefetch + 1)`` windows, i.e. ``(prefetch + 1) * 1.25 * window_bytes`` plus one batch
(a batch larger than ``window_bytes`` is a window by itself).

The price is a lifetime rule: **a raw batch is valid until the next one is requested** (its
buffer may then be refilled: a window's buffers are, once the consumer asks for the first batch
of the next window). ``expand_batch`` always returns new tensors, so the usual loop is safe;
keep ``raw`` itself across iterations only after ``clone``-ing what you need. With
``pin_memory`` the buffers are page-locked and a CUDA event recorded on the current stream when
the consumer leaves a window guards the asynchronous host-to-device copies made from its
batches: their buffers are refilled only after that event completes.
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

__all__ = ["IO_DEPTH", "WINDOW_BYTES", "CacheBatchLoader", "window_tokens"]

_GROWTH = 1.25  # a buffer that is too small is replaced by one this much larger than needed
WINDOW_BYTES = 256 << 20  # default stored bytes read in one sorted pass
IO_DEPTH = 8  # default merged ranges read in flight


def window_tokens(reader: CacheReader, window_bytes: int = WINDOW_BYTES) -> int:
    """Tokens of samples whose stored rows fill about ``window_bytes`` (at least 1): the cache's
    stored bytes per token, averaged over its committed shards. A training plan that shuffles
    blocks of this many tokens (``plan_epoch(shuffle_block_tokens=)``) reads nearly in order."""
    per_token = reader.stored_bytes / max(1, reader.num_tokens)
    return max(1, int(window_bytes // max(per_token, 1e-9)))


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
        path: the cache directory (``CacheReader``s are opened once and kept; ``close()`` closes them).
        plan: the sample indices of each batch.
        max_tokens: ``None``: padded batches (``collate_padded``); else packed rows of at most
            ``max_tokens`` tokens (``pack_samples``).
        pad_to_multiple_of: round the batch width up to a multiple of this.
        num_threads: reader threads (more than one only overlaps reads when ``prefetch > 1``).
        io_depth: merged ranges a window pass keeps in flight (threads, each reading one contiguous
            range front to back in 8 MiB ``preadv``s; 1: one range at a time). Disks answer ranges
            that are not contiguous several times faster at a queue depth of 8 than one by one, and
            a window of a cache larger than the window is several such ranges.
        prefetch: windows read ahead of the one the consumer takes batches from.
        window_bytes: stored bytes of the consecutive batches read in one sorted pass.
        pin_memory: page-locked buffers for asynchronous copies to CUDA (default: when CUDA is
            available).
    """

    def __init__(self, path: str | os.PathLike, plan: Sequence[Sequence[int]], *, max_tokens: int | None = None,
                 pad_to_multiple_of: int | None = None, num_threads: int = 2, prefetch: int = 1,
                 window_bytes: int = WINDOW_BYTES, io_depth: int = IO_DEPTH, pin_memory: bool | None = None):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}")
        if io_depth < 1:
            raise ValueError(f"io_depth must be >= 1 (read requests in flight); got {io_depth}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (windows read ahead); got {prefetch}")
        if window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1; got {window_bytes}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (page-locked memory is for copies to a GPU); pass "
                             "pin_memory=False on a CPU-only machine")
        self.path = Path(path)
        reader = CacheReader(self.path)  # fail here, not in a thread, on a missing cache
        self._size = len(reader)
        # idle readers, kept between iterations: opening one parses the manifest (0.1-0.4 s with a
        # 128k-token vocabulary's counts), more than reading a window of a small cache takes
        self._readers, self._readers_lock = [reader], threading.Lock()
        self.plan = self._checked_plan(plan)
        self.max_tokens, self.pad_to_multiple_of = max_tokens, pad_to_multiple_of
        self.num_threads, self.prefetch, self.pin_memory = num_threads, prefetch, pin_memory
        self.window_bytes, self.io_depth = window_bytes, io_depth
        self._ring: list[list[_Buffer]] | None = None  # kept between iterations: warm buffers for the next epoch

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

    def _take_reader(self) -> CacheReader:
        with self._readers_lock:
            if self._readers:
                return self._readers.pop()
        return CacheReader(self.path)

    def _return_reader(self, reader: CacheReader) -> None:
        with self._readers_lock:
            self._readers.append(reader)

    def close(self) -> None:
        """Close the idle readers' files (a later iteration opens new ones)."""
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()

    def windows(self, plan: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
        """The batch indices of ``plan`` (default: the one iterated next) that each window pass reads:
        consecutive batches of at most ``window_bytes`` stored bytes together, or one batch."""
        plan = self.plan if plan is None else self._checked_plan(plan)
        sizer = self._take_reader()
        try:
            return list(self._windows(plan, sizer))
        finally:
            self._return_reader(sizer)

    def _windows(self, plan: list[list[int]], sizer: CacheReader) -> Iterator[list[int]]:
        """Consecutive batch indices of ``plan``, at most ``window_bytes`` stored bytes each (or one batch)."""
        window: list[int] = []
        used = 0
        for b, batch in enumerate(plan):
            nbytes = sizer.raw_batch_nbytes(batch)
            if window and used + nbytes > self.window_bytes:
                yield window
                window, used = [], 0
            window.append(b)
            used += nbytes
        if window:
            yield window

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ring, self._ring = self._ring, None  # a second, concurrent iteration gets its own buffers
        if ring is None:
            ring = [[] for _ in range(self.prefetch + 1)]  # per slot: one buffer per batch of its window
        plan = self.plan  # set_plan during an iteration applies to the next one
        sizer = self._take_reader()
        windows = self._windows(plan, sizer)

        def read(window: list[int], slot: list[_Buffer], event: torch.cuda.Event | None
                 ) -> list[dict[str, torch.Tensor]]:
            if event is not None:
                event.synchronize()  # the copies out of this slot's previous batches have finished
            while len(slot) < len(window):
                slot.append(_Buffer(self.pin_memory))
            reader = self._take_reader()
            try:
                return reader.get_raw_batches([plan[b] for b in window], max_tokens=self.max_tokens,
                                              pad_to_multiple_of=self.pad_to_multiple_of,
                                              allocate=lambda i, nbytes: slot[i].take(nbytes), executor=io_pool)
            finally:
                self._return_reader(reader)

        pending: deque[Future] = deque()
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="draftcache-read")
        io_pool = (ThreadPoolExecutor(self.io_depth, thread_name_prefix="draftcache-io") if self.io_depth > 1
                   else None)  # shared by the reader threads: at most io_depth requests in flight
        try:
            for w in range(len(ring) - 1):  # the consumer's window and `prefetch` more; the last slot
                window = next(windows, None)  # is filled once the consumer leaves window 0
                if window is not None:
                    pending.append(pool.submit(read, window, ring[w], None))
            w = 0
            while pending:
                raws = pending.popleft().result()
                for i, raw in enumerate(raws):
                    if i == 0:
                        # the consumer left window w-1 (or starts): the slot before this one is free
                        window = next(windows, None)
                        if window is not None:
                            event = None
                            if self.pin_memory:
                                event = torch.cuda.Event()
                                event.record()
                            pending.append(pool.submit(read, window, ring[(w + len(ring) - 1) % len(ring)], event))
                    yield raw
                    del raw
                del raws
                w += 1
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            if io_pool is not None:
                io_pool.shutdown(wait=True)
            self._return_reader(sizer)
            self._ring = ring
