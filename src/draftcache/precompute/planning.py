"""Which samples go into which shard and which forward batch.

Shard ``k`` always holds global samples ``[k * shard_size, (k + 1) * shard_size)``, so a cache's
layout depends only on the global sample order. Inside a shard, samples are sorted by length and
cut into batches of ``batch_size`` so that little of each forward is spent on padding; results are
put back into global order before they are written.
"""

from __future__ import annotations

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


def plan_shards(num_samples: int, shard_size: int) -> list[ShardPlan]:
    """Every shard of a cache of ``num_samples`` samples, in order (the last one may be short)."""
    return [
        ShardPlan(k, start, min(shard_size, num_samples - start))
        for k, start in enumerate(range(0, num_samples, shard_size))
    ]


def length_bucketed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped in batches of similar length (longest first, so an
    out-of-memory error shows up on the first batch rather than hours in)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
