"""CacheDataset / CacheIterableDataset: rank split, reproducible shuffling, DataLoader workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from draftcache.cache_format import CacheDataset, CacheIterableDataset, open_cache

from .synth import write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", num_samples=23, shard_size=4)


def _sample_id(sample: dict) -> tuple:
    """Identify a sample by its token ids (synthetic samples are distinct)."""
    return tuple(sample["input_ids"].tolist())


@pytest.fixture(scope="module")
def ids_by_index(cache):
    reader = open_cache(cache.path)
    return {_sample_id(reader[i]): i for i in range(len(reader))}


def _indices(dataset, ids_by_index) -> list[int]:
    return [ids_by_index[_sample_id(s)] for s in dataset]


def test_map_style_dataset(cache):
    reader = open_cache(cache.path)
    dataset = CacheDataset(reader)
    assert len(dataset) == 23 and torch.equal(dataset[5]["input_ids"], reader[5]["input_ids"])


def test_rank_split_is_disjoint_covering_and_equal_length(cache, ids_by_index):
    world = 3
    per_rank = [_indices(CacheIterableDataset(cache.path, seed=1, rank=r, world_size=world), ids_by_index)
                for r in range(world)]
    assert [len(p) for p in per_rank] == [8, 8, 8]  # ceil(23 / 3) each
    blocks = [p[:7] for p in per_rank[:1]] + per_rank[1:]  # blocks of 7, 8, 8; rank 0 repeats one sample
    flat = [i for p in blocks for i in p]
    assert sorted(flat) == list(range(23))  # the real blocks are disjoint and covering
    assert per_rank[0][7] in flat  # the padding is a repeat, not a new sample


def test_shuffle_is_reproducible_by_seed_and_changes_with_epoch(cache, ids_by_index):
    def order(seed, epoch):
        return _indices(CacheIterableDataset(cache.path, seed=seed, epoch=epoch), ids_by_index)

    assert order(3, 0) == order(3, 0)
    assert sorted(order(3, 0)) == list(range(23))
    assert order(3, 0) != order(4, 0) and order(3, 0) != order(3, 1)
    dataset = CacheIterableDataset(cache.path, seed=3)
    dataset.set_epoch(1)
    assert _indices(dataset, ids_by_index) == order(3, 1)
    # shard-then-sample: each shard's samples stay together
    shard_of = [i // 4 for i in order(3, 0)]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) == 5
    assert _indices(CacheIterableDataset(cache.path, shuffle=False), ids_by_index) == list(range(23))


def test_dataloader_with_two_workers_covers_the_rank(cache, ids_by_index):
    dataset = CacheIterableDataset(cache.path, seed=0, rank=1, world_size=2)
    expected = sorted(i for unit in dataset.rank_units() for i in unit)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    got = sorted(ids_by_index[_sample_id(s)] for s in loader)
    assert got == expected and len(got) == 12


def test_batched_modes(cache):
    lengths = open_cache(cache.path).sample_lengths()
    padded = list(CacheIterableDataset(cache.path, batch_size=5, rank=0, world_size=2))
    # units of 5, 5, 5, 5, 3 samples: rank 0 takes units 0-1 and repeats unit 0, rank 1 takes units 2-4
    assert [b["input_ids"].shape[0] for b in padded] == [5, 5, 5]
    rank1 = list(CacheIterableDataset(cache.path, batch_size=5, rank=1, world_size=2))
    assert [b["input_ids"].shape[0] for b in rank1] == [5, 5, 3]
    assert torch.equal(padded[2]["input_ids"], padded[0]["input_ids"])
    budget = int(lengths.max()) + 10
    packed_ranks = [list(CacheIterableDataset(cache.path, batch_tokens=budget, rank=r, world_size=2)) for r in (0, 1)]
    assert len(packed_ranks[0]) == len(packed_ranks[1])
    for batch in packed_ranks[0] + packed_ranks[1]:
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= budget
        assert int(batch["seq_lens"].sum()) == batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="batch_tokens 3 is smaller than the longest sample"):
        CacheIterableDataset(cache.path, batch_tokens=3)
    with pytest.raises(ValueError, match="not both"):
        CacheIterableDataset(cache.path, batch_tokens=100, batch_size=2)
