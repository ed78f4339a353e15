"""Which samples make each micro-batch: a held-out split, then a seeded per-epoch plan per rank.

The plan is a pure function of (seed, epoch, rank, world size), so a resumed run skips exactly the
micro-batches it had consumed, and every rank gets the same number of micro-batches (DDP needs it):
the global list of micro-batches is dealt round-robin and, when it does not divide evenly, the
first few micro-batches are dealt again rather than dropping data.
"""

from __future__ import annotations

import torch

__all__ = ["split_train_val", "plan_epoch"]


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
) -> list[list[int]]:
    """Micro-batches (lists of sample indices) for ``rank`` in ``epoch``.

    With ``batch_tokens`` consecutive samples of the shuffled order are grouped until the next one
    would exceed the budget (one packed row per micro-batch); otherwise ``batch_size`` per batch.
    """
    order = list(indices)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    batches = _group(order, lengths, batch_tokens, batch_size)
    if world_size > 1:
        per_rank = -(-len(batches) // world_size)
        batches = [batches[i % len(batches)] for i in range(per_rank * world_size)]
        batches = batches[rank::world_size]
    return batches
