"""Torch datasets over a cache: map-style ``CacheDataset`` and the sharded, shuffled
``CacheIterableDataset`` for multi-rank training.

Epoch plan of ``CacheIterableDataset`` (a pure function of the cache, ``seed``, ``epoch``,
``shuffle``, ``world_size`` and the batching options, so every rank computes the same plan):

1. Order: shard order shuffled, then the samples inside each shard shuffled, both with a
   generator seeded from ``(seed, epoch)`` (mosaicml-streaming style: consecutive reads stay in
   one shard file). ``shuffle=False`` keeps the global order.
2. Units: consecutive samples grouped into batches: ``batch_size`` samples (the last one may be
   shorter), or as many as fit in ``batch_tokens`` (next-fit; packed into one row with
   ``pack_samples``), or single samples when neither is given.
3. Ranks: rank r takes the contiguous block of units ``[floor(r*U/W), floor((r+1)*U/W))``;
   blocks are disjoint and cover every unit. Ranks whose block is one unit short of
   ``ceil(U/W)`` repeat unit ``r % U``, so every rank yields exactly ``ceil(U/W)`` units and
   collective ops stay in step (at most W-1 units per epoch are seen twice).
4. DataLoader workers split their rank's block the same way (contiguous, disjoint, covering);
   each opens its own reader on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from draftcache.cache_format.batching import collate_padded, pack_samples, plan_packed_rows
from draftcache.cache_format.reader import CacheReader

__all__ = ["CacheDataset", "CacheIterableDataset", "epoch_order", "split_range"]


class CacheDataset(Dataset):
    """Map-style dataset: ``dataset[i] == reader[i]`` (one shifted, unpadded sample)."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.reader[index]


def epoch_order(shard_ranges: Sequence[tuple[int, int]], *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """``[num_samples]`` int64 sample order of one epoch: shuffled shards, then shuffled samples
    inside each shard (see the module docstring)."""
    if not shuffle:
        return torch.arange(shard_ranges[-1][1] if shard_ranges else 0, dtype=torch.int64)
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (1 << 63))
    parts = []
    for k in torch.randperm(len(shard_ranges), generator=generator).tolist():
        begin, end = shard_ranges[k]
        parts.append(begin + torch.randperm(end - begin, generator=generator))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def split_range(count: int, part: int, parts: int) -> range:
    """The ``part``-th of ``parts`` balanced contiguous blocks of ``range(count)``."""
    return range(count * part // parts, count * (part + 1) // parts)


class CacheIterableDataset(IterableDataset):
    """Iterate a cache for one rank of a data-parallel job (plan in the module docstring).

    Yields sample dicts, or ``collate_padded`` batches of ``batch_size`` samples, or
    ``pack_samples`` rows of at most ``batch_tokens`` tokens. Call ``set_epoch`` before each
    epoch (with ``persistent_workers=True`` the workers keep the epoch they were started with).
    """

    def __init__(self, path: str | os.PathLike, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, batch_tokens: int | None = None,
                 batch_size: int | None = None, draft_vocab: int | Sequence[int] | None = None,
                 pad_to_multiple_of: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if batch_tokens is not None and batch_size is not None:
            raise ValueError("pass batch_tokens (packed rows) or batch_size (padded batches), not both")
        for name, value in (("batch_tokens", batch_tokens), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        self.path = Path(path)
        self.seed, self.shuffle, self.rank, self.world_size, self.epoch = seed, shuffle, rank, world_size, epoch
        self.batch_tokens, self.batch_size, self.draft_vocab = batch_tokens, batch_size, draft_vocab
        self.pad_to_multiple_of = pad_to_multiple_of
        with CacheReader(self.path, draft_vocab=draft_vocab) as reader:  # checks draft_vocab early
            self._shard_ranges = reader.shard_ranges()
            self._lengths = reader.sample_lengths().tolist() if batch_tokens is not None else None
        if batch_tokens is not None and self._lengths and max(self._lengths) > batch_tokens:
            raise ValueError(f"batch_tokens {batch_tokens} is smaller than the longest sample ({max(self._lengths)} "
                             "tokens); use at least the cache's seq_length")
        self._reader: CacheReader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_units(self) -> list[list[int]]:
        """The units (lists of sample indices) this rank yields in the current epoch."""
        order = epoch_order(self._shard_ranges, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle).tolist()
        if self.batch_tokens is not None:
            groups = plan_packed_rows([self._lengths[i] for i in order], self.batch_tokens)
            units = [[order[j] for j in g] for g in groups]
        else:
            size = self.batch_size or 1
            units = [order[i:i + size] for i in range(0, len(order), size)]
        if not units:
            return []
        mine = [units[u] for u in split_range(len(units), self.rank, self.world_size)]
        if len(mine) < -(-len(units) // self.world_size):
            mine.append(units[self.rank % len(units)])
        return mine

    def __len__(self) -> int:
        """Units (samples or batches) this rank yields per epoch, the same on every rank."""
        return len(self.rank_units())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        units = self.rank_units()
        info = get_worker_info()
        if info is not None:
            units = [units[u] for u in split_range(len(units), info.id, info.num_workers)]
        if self._reader is None:
            self._reader = CacheReader(self.path, draft_vocab=self.draft_vocab)
        reader = self._reader
        for unit in units:
            samples = [reader[i] for i in unit]
            if self.batch_tokens is not None:
                yield pack_samples(samples, self.batch_tokens, pad_to_multiple_of=self.pad_to_multiple_of)
            elif self.batch_size is not None:
                yield collate_padded(samples, pad_to_multiple_of=self.pad_to_multiple_of)
            else:
                yield samples[0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # each worker opens its own reader
        return state
