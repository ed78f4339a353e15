"""Shard plans follow the manifest's boundaries; batches regroup one shard's samples by length."""

from __future__ import annotations

from draftcache.precompute.planning import ShardPlan, length_bucketed_batches, plan_shards


def test_shards_follow_the_boundaries():
    assert plan_shards([0, 8, 16, 21]) == [ShardPlan(0, 0, 8), ShardPlan(1, 8, 8), ShardPlan(2, 16, 5)]
    assert plan_shards([0, 3]) == [ShardPlan(0, 0, 3)]


def test_batches_are_length_bucketed_longest_first_and_cover_every_index():
    lengths = [5, 40, 7, 40, 12, 3, 39]
    batches = length_bucketed_batches(lengths, 3)
    assert batches == [[1, 3, 6], [4, 2, 0], [5]]  # equal lengths keep their order
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_bucketed_batches(lengths, 1) == [[1], [3], [6], [4], [2], [0], [5]]
