"""Which samples make each micro-batch: a held-out split, then a seeded per-epoch plan per rank.

The plan is a pure function of (seed, epoch, rank, world size), so a resumed run skips exactly the
micro-batches it had consumed, and every rank gets the same number of micro-batches (DDP needs it):
the global list of micro-batches is dealt round-robin and, when it does not divide evenly, the
first few micro-batches are dealt again rather than dropping data.

Block shuffle (``shuffle_block_tokens``): a cache's sample index order is its storage order
(consecutive indices are consecutive rows of a shard file, shards in order), and the cached reader
(``CacheBatchLoader``) reads the consecutive micro-batches of a plan in windows of stored bytes,
one sorted pass per shard. A global shuffle scatters each window's samples over the whole cache, so
a cold read of a cache several windows large skips and seeks. With blocks, the sorted training
indices are cut into runs of consecutive indices of at most ``shuffle_block_tokens`` tokens, the
blocks are permuted and the samples inside each block shuffled (one generator, seeded by seed and
epoch): a run of consecutive micro-batches of about a block's tokens draws from two blocks (three
when a short block lies between them), i.e. from two or three contiguous stretches of the shards.
When every training sample fits one block the plan is exactly the global shuffle. The trainers
size the blocks from the cache (``cache_block_tokens``), so the plan is then also a function of
the cache's stored bytes per token and ``WINDOW_BYTES``.
"""

from __future__ import annotations

import torch

from draftcache.cache_format import CacheReader, window_tokens

__all__ = ["SHUFFLE_MODES", "split_train_val", "plan_epoch", "shuffle_blocks", "cache_block_tokens"]

SHUFFLE_MODES = ("window", "global")  # draftcache train --shuffle


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random held-out split; at least one training sample is always kept."""
    if num_samples < 1:
        raise ValueError("the dataset is empty: nothing to train on")
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(num_samples, generator=g).tolist()
    n_val = min(int(round(num_samples * val_fraction)), num_samples - 1)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _group(indices: list[int], lengths, batch_tokens: int | None, batch_size: int) -> list[list[int]]:
    if batch_tokens is None:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    batches, current, used = [], [], 0
    for i in indices:
        n = int(lengths[i])
        if current and used + n > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def shuffle_blocks(indices: list[int], lengths, block_tokens: int) -> list[list[int]]:
    """``sorted(indices)`` cut into runs of consecutive entries of at most ``block_tokens`` tokens
    each (``lengths[i]``: tokens of sample i); a sample longer than that is a block by itself."""
    if block_tokens < 1:
        raise ValueError(f"shuffle_block_tokens must be >= 1; got {block_tokens}")
    return _group(sorted(indices), lengths, block_tokens, batch_size=0)  # greedy, as packed micro-batches are


def cache_block_tokens(reader: CacheReader, shuffle: str, world_size: int = 1) -> int | None:
    """``plan_epoch``'s ``shuffle_block_tokens`` for training from ``reader``'s cache: ``None`` for
    ``shuffle="global"``; for ``"window"``, the tokens of one ``CacheBatchLoader`` window
    (``window_tokens``) times ``world_size``: micro-batches are dealt round-robin, so a rank's window
    of consecutive micro-batches spans ``world_size`` windows of the global plan."""
    if shuffle not in SHUFFLE_MODES:
        raise ValueError(f"shuffle must be one of {', '.join(SHUFFLE_MODES)}; got {shuffle!r}")
    return window_tokens(reader) * world_size if shuffle == "window" else None


def plan_epoch(
    indices: list[int],
    lengths,
    *,
    seed: int,
    epoch: int,
    batch_tokens: int | None,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    shuffle_block_tokens: int | None = None,
) -> list[list[int]]:
    """Micro-batches (lists of sample indices) for ``rank`` in ``epoch``.

    With ``batch_tokens`` consecutive samples of the shuffled order are grouped until the next one
    would exceed the budget (one packed row per micro-batch); otherwise ``batch_size`` per batch.
    ``shuffle_block_tokens``: shuffle blocks of consecutive indices of at most that many tokens
    instead of all samples at once (see the module docstring); ``None``, or one block holding every
    sample, gives the global shuffle, bit for bit.
    """
    order = list(indices)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        blocks = shuffle_blocks(order, lengths, shuffle_block_tokens) if shuffle_block_tokens is not None else []
        if len(blocks) > 1:
            order = []
            for b in torch.randperm(len(blocks), generator=g).tolist():
                order += [blocks[b][i] for i in torch.randperm(len(blocks[b]), generator=g).tolist()]
        else:
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    batches = _group(order, lengths, batch_tokens, batch_size)
    if world_size > 1:
        per_rank = -(-len(batches) // world_size)
        batches = [batches[i % len(batches)] for i in range(per_rank * world_size)]
        batches = batches[rank::world_size]
    return batches
