"""ShardFileWriter (rows written in place, in any order) and the byte-capped shard boundaries."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from draftcache.cache_format import Manifest, SampleBytes, ShardFileWriter, plan_shard_boundaries
from draftcache.cache_format.writer import write_shard_file

from draftcache.data.vocab import DraftVocab

from .synth import DTYPES, HIDDEN, SELECTED, VOCAB, make_record, make_samples, manifest_for


def _records(n: int, encoding: str = "probs", dtype: str = "bf16"):
    samples = make_samples(n, weight=torch.randn(VOCAB, HIDDEN), bias=torch.zeros(VOCAB))
    manifest = manifest_for(samples, encoding=encoding, dtype=dtype, shard_size=n)
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    return Manifest(manifest), [make_record(s, encoding, vocab, DTYPES[dtype], None) for s in samples]


@pytest.mark.parametrize("encoding", ["probs", "hidden"])
def test_rows_written_in_any_order_give_the_one_shot_bytes(tmp_path, encoding):
    meta, records = _records(5, encoding)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entry = write_shard_file(tmp_path / "a", meta, 0, records)
    shard = ShardFileWriter(tmp_path / "b", meta, 0, [r.num_tokens for r in records],
                            [r.num_supervised for r in records])
    for j in (3, 0, 4, 1, 2):  # length-bucketed batches arrive out of order
        shard.write(j, records[j])
    other = shard.commit()
    assert other == entry
    assert (tmp_path / "a" / entry.file).read_bytes() == (tmp_path / "b" / entry.file).read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [entry.file]
    with safe_open(str(tmp_path / "b" / entry.file), "pt") as f:
        ids = f.get_tensor("input_ids")
    assert ids.tolist() == torch.cat([r.input_ids for r in records]).tolist()


def test_missing_sample_is_refused_and_abort_leaves_nothing(tmp_path):
    meta, records = _records(3)
    shard = ShardFileWriter(tmp_path, meta, 0, [r.num_tokens for r in records], [r.num_supervised for r in records])
    shard.write(0, records[0])
    with pytest.raises(ValueError, match="outside the shard or was already written"):
        shard.write(0, records[0])
    with pytest.raises(ValueError, match="2 sample\\(s\\) were never written \\(first: 1\\)"):
        shard.commit()
    assert [p.name for p in tmp_path.iterdir()] == [f"shard-000000.safetensors.tmp-{os.getpid()}"]
    shard.abort()
    assert list(tmp_path.iterdir()) == []


def test_boundaries_depend_on_order_and_sizes_only():
    sizes = [10, 10, 50, 10, 10, 10, 200, 5]
    assert plan_shard_boundaries(sizes, shard_size=3) == [0, 3, 6, 8]
    # cap 16 + 40: a shard closes before the sample that would take it past 56 bytes
    assert plan_shard_boundaries(sizes, shard_size=100, max_shard_bytes=56) == [0, 2, 3, 6, 7, 8]
    # a sample larger than the cap gets a shard of its own
    assert plan_shard_boundaries([500], shard_size=4, max_shard_bytes=56) == [0, 1]


def test_sample_bytes_match_the_written_file(tmp_path):
    meta, records = _records(4, "probs", "bf16")
    entry = write_shard_file(tmp_path, meta, 0, records)
    size = SampleBytes(meta.data)
    data = sum(size(r.num_tokens, r.num_supervised) for r in records) + 16  # + the two leading int64 offsets
    raw = (tmp_path / entry.file).read_bytes()
    assert entry.bytes == len(raw)
    # safetensors: u64 little-endian length N, then N bytes of JSON header, then the tensor data
    header = 8 + int.from_bytes(raw[:8], "little")
    assert entry.bytes == header + data
