"""Which samples go into which shard and which forward batch.

Shard ``k`` holds global samples ``[b[k], b[k+1])`` of the manifest's ``shard_boundaries``
(``cache_format.plan_shard_boundaries``: at most ``shard_size`` samples and ``max_shard_bytes``
bytes, from the global sample order and lengths only), so a cache's layout is the same whoever
computes it. Inside a shard, samples are sorted by length and cut into batches of ``batch_size``
so that little of each forward is spent on padding; each sample's rows go straight to their
place in the shard file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ShardPlan", "plan_shards", "length_bucketed_batches"]


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` holds global samples ``[first_sample, first_sample + num_samples)``."""

    index: int
    first_sample: int
    num_samples: int

    @property
    def stop(self) -> int:
        return self.first_sample + self.num_samples


def plan_shards(boundaries: Sequence[int]) -> list[ShardPlan]:
    """Every shard of a cache with these ``shard_boundaries`` (``[num_shards + 1]``), in order."""
    return [ShardPlan(k, a, b - a) for k, (a, b) in enumerate(zip(boundaries, boundaries[1:]))]


def length_bucketed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped in batches of similar length (longest first, so an
    out-of-memory error shows up on the first batch rather than hours in)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
