"""The batch-level fast path: get_raw_batch / collate_raw / expand_batch / CacheBatchLoader give
exactly what collate_padded / pack_samples give from reader[i]."""

from __future__ import annotations

import os

import pytest
import torch

from draftcache.cache_format import (
    CacheBatchLoader,
    CacheCorruptError,
    collate_padded,
    collate_raw,
    open_cache,
    pack_samples,
)
from draftcache.cache_format.reader import MAX_OPEN_SHARDS
from draftcache.cache_format.shard_file import ShardFile

from .synth import write_cache

# (indices, max_tokens, pad_to_multiple_of): padded and packed, with and without rounding; sample 2
# has a supervised position 0, samples 1, 4, 7, 10 have several supervised runs (see synth.py)
LAYOUTS = [([2], None, None), ([3, 1, 12, 7, 2], None, None), ([3, 1, 12, 7, 2], None, 8),
           ([5, 0, 2, 9, 4, 11], 40, None), ([12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0], 64, 16)]


def _dense(reader, indices, max_tokens, pad):
    samples = [reader[i] for i in indices]
    if max_tokens is None:
        return collate_padded(samples, pad_to_multiple_of=pad)
    return pack_samples(samples, max_tokens, pad_to_multiple_of=pad)


def _assert_same_batch(got: dict, want: dict, *, probs_atol: float = 0.0) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if name == "target_probs" and probs_atol:
            torch.testing.assert_close(got[name], want[name], atol=probs_atol, rtol=0)
        else:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("encoding,dtype,topk", [("probs", "fp32", None), ("probs", "bf16", None),
                                                 ("topk", "bf16", 5), ("hidden", "bf16", None)])
def test_expand_batch_equals_the_dense_path(tmp_path, encoding, dtype, topk):
    torch.manual_seed(0)
    cache = write_cache(tmp_path / "c", num_samples=13, encoding=encoding, dtype=dtype, topk=topk, shard_size=4)
    reader = open_cache(cache.path)
    for indices, max_tokens, pad in LAYOUTS:
        raw = reader.get_raw_batch(indices, max_tokens=max_tokens, pad_to_multiple_of=pad)
        reference = collate_raw([reader.get_raw(i) for i in indices], max_tokens=max_tokens, pad_to_multiple_of=pad)
        assert raw.pop("sample_ids").tolist() == list(indices)  # which samples, for messages naming their shard
        assert list(raw) == list(reference)
        for name in reference:
            assert torch.equal(raw[name], reference[name]), name
        # hidden: the lm_head matmul runs over the whole batch instead of per sample, so float32
        # rounding may differ in the last bit; every other field is bit-identical
        _assert_same_batch(reader.expand_batch(raw), _dense(reader, indices, max_tokens, pad),
                           probs_atol=1e-6 if encoding == "hidden" else 0.0)


def test_raw_batch_layout_fields(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=6, encoding="probs", dtype="fp32", shard_size=4)
    reader = open_cache(cache.path)
    lengths = [s.input_ids.numel() for s in cache.samples]
    raw = reader.get_raw_batch([4, 1], max_tokens=lengths[4] + lengths[1])
    assert raw["sample_offsets"].tolist() == [0, lengths[4], lengths[4] + lengths[1]]
    supervised = [int(cache.samples[i].loss_mask.sum()) for i in (4, 1)]
    assert raw["supervised_offsets"].tolist() == [0, supervised[0], supervised[0] + supervised[1]]
    assert raw["sample_rows"].tolist() == [0, 0] and raw["sample_starts"].tolist() == [0, lengths[4]]
    assert raw["batch_shape"].tolist() == [1, lengths[4] + lengths[1]] and bool(raw["packed"])
    assert torch.equal(raw["input_ids"], torch.cat([cache.samples[4].input_ids, cache.samples[1].input_ids]).int())
    padded = reader.get_raw_batch([4, 1], pad_to_multiple_of=32)
    assert padded["sample_rows"].tolist() == [0, 1] and padded["sample_starts"].tolist() == [0, 0]
    assert padded["batch_shape"].tolist() == [2, 32] and not bool(padded["packed"])


def test_hidden_cache_with_a_read_time_draft_vocab(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=8, encoding="hidden", dtype="fp32", shard_size=3)
    reader = open_cache(cache.path, draft_vocab=10)
    indices = [7, 0, 3, 5]
    got = reader.expand_batch(reader.get_raw_batch(indices, max_tokens=96))
    _assert_same_batch(got, _dense(reader, indices, 96, None), probs_atol=1e-6)
    assert got["target_probs"].shape[-1] == 10


def test_batch_spanning_more_shards_than_the_open_file_limit(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=MAX_OPEN_SHARDS + 4, encoding="topk", dtype="bf16", topk=4,
                        shard_size=1)
    reader = open_cache(cache.path)
    indices = list(range(len(reader)))[::-1]
    _assert_same_batch(reader.expand_batch(reader.get_raw_batch(indices)), _dense(reader, indices, None, None))
    assert len(reader._open) <= MAX_OPEN_SHARDS


def test_get_raw_batch_fills_the_given_buffer(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=5, encoding="probs", dtype="bf16", shard_size=2)
    reader = open_cache(cache.path)
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    raw = reader.get_raw_batch([0, 4], allocate=lambda n: buffer)
    for name in ("input_ids", "aux_hidden_states", "target_probs"):
        assert raw[name].untyped_storage().data_ptr() == buffer.data_ptr(), name
    with pytest.raises(ValueError, match=r"allocate\(\d+\) must return a 1-D uint8 CPU tensor of at least"):
        reader.get_raw_batch([0, 4], allocate=lambda n: torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(IndexError, match="sample 5 is out of range: the cache has 5 committed samples"):
        reader.get_raw_batch([0, 5])
    with pytest.raises(ValueError, match="sample 3 has .* tokens, more than max_tokens 3"):
        reader.get_raw_batch([3, 1], max_tokens=3)


def test_damaged_rows_are_caught_per_batch(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=6, encoding="probs", dtype="fp32", shard_size=2)
    path = cache.path / "shard-000001.safetensors"
    shard = ShardFile(path, path.stat().st_size)
    _, _, mask_at = shard.tensors["loss_mask"]
    _, _, argmax_at = shard.tensors["target_argmax"]
    shard.close()
    data = bytearray(path.read_bytes())
    first_zero = next(p for p in range(cache.samples[2].input_ids.numel()) if not cache.samples[2].loss_mask[p])
    data[mask_at + first_zero] = 1
    path.write_bytes(bytes(data))
    reader = open_cache(cache.path)
    with pytest.raises(CacheCorruptError, match=r"shard-000001.safetensors: sample 2 has \d+ supervised positions but "
                                                r"\d+ stored target rows"):
        reader.get_raw_batch([0, 2, 5])
    data[mask_at + first_zero] = 0
    data[argmax_at:argmax_at + 4] = (10**6).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard-000001.safetensors: sample 2 has target_argmax >= vocab_size"):
        open_cache(cache.path).get_raw_batch([5, 2])


def _assert_raw_equal(raw: dict, want: dict, where) -> None:
    """``raw`` holds exactly ``want``'s tensors, in its order, bit for bit."""
    assert list(raw) == list(want), where
    for name in want:
        assert torch.equal(raw[name], want[name]), (*where, name)


def test_loader_yields_the_plan_in_order_reusing_its_buffers(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=13, encoding="hidden", dtype="bf16", shard_size=4)
    reader = open_cache(cache.path)
    plan = [[3, 1], [12], [7, 2, 0], [5, 6], [11, 10, 9], [4, 8]]
    loader = CacheBatchLoader(cache.path, plan, max_tokens=80, num_threads=2, prefetch=1, window_bytes=1,
                              pin_memory=False)  # a window per batch
    assert len(loader) == len(plan)
    storages = []
    for epoch in range(2):
        for b, raw in enumerate(loader):
            _assert_raw_equal(raw, reader.get_raw_batch(plan[b], max_tokens=80), (epoch, b))
            storages.append(raw["aux_hidden_states"].untyped_storage().data_ptr())
            _assert_same_batch(reader.expand_batch(raw), _dense(reader, plan[b], 80, None), probs_atol=1e-6)
    assert len(set(storages)) <= 2 * 2  # prefetch=1: two windows of one buffer, replaced only while they grow
    loader.set_plan(plan[::-1])
    assert [raw["batch_shape"].tolist() for raw in loader] == [
        reader.get_raw_batch(batch, max_tokens=80)["batch_shape"].tolist() for batch in plan[::-1]]


def test_loader_rejects_bad_arguments_and_stops_early(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=4, encoding="probs", dtype="fp32", shard_size=2)
    lengths = [s.input_ids.numel() for s in cache.samples]
    with pytest.raises(IndexError, match="plan refers to sample 4, but the cache has 4 committed samples"):
        CacheBatchLoader(cache.path, [[0], [4]], pin_memory=False)
    with pytest.raises(ValueError, match="plan batch 1 is empty"):
        CacheBatchLoader(cache.path, [[0], []], pin_memory=False)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        CacheBatchLoader(cache.path, [[0]], num_threads=0, pin_memory=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            CacheBatchLoader(cache.path, [[0]], pin_memory=True)
    loader = CacheBatchLoader(cache.path, [[0], [1], [2], [3]], prefetch=2, pin_memory=False)
    for b, raw in enumerate(loader):
        if b == 1:
            break  # the reader threads are shut down and the loader is reusable
    assert [int(raw["sample_offsets"][-1]) for raw in loader] == lengths


def test_collate_raw_checks_its_input(tmp_path):
    probs = open_cache(write_cache(tmp_path / "p", num_samples=2, encoding="probs").path)
    hidden = open_cache(write_cache(tmp_path / "h", num_samples=2, encoding="hidden").path)
    with pytest.raises(ValueError, match="collate_raw needs at least one sample"):
        collate_raw([])
    with pytest.raises(ValueError, match="raw sample 1 has fields .* but sample 0 has"):
        collate_raw([probs.get_raw(0), hidden.get_raw(1)])


def test_read_calls_merge_near_ranges_into_few_reads(tmp_path):
    """A batch's ranges are read in file order, near ones as one request (the gap discarded): the
    bytes equal one read per range, in fewer requests (what a cold disk pays per batch)."""
    cache = write_cache(tmp_path / "c", num_samples=8, encoding="topk", dtype="fp8", topk=5, shard_size=8)
    path = cache.path / "shard-000000.safetensors"
    shard = ShardFile(path, path.stat().st_size)
    names = [n for n in ("input_ids", "loss_mask", "aux_hidden_states", "aux_hidden_states_scale", "target_argmax",
                         "topk_probs", "topk_ids") if n in shard.tensors]
    assert "aux_hidden_states_scale" in names
    requests, want = [], []
    for name in names:  # rows 5..7, then 0..2 of every tensor: out of order, with gaps
        for start, stop in ((5, 7), (0, 2)):
            out = torch.empty((stop - start, *shard.tensors[name][1][1:]), dtype=shard.tensors[name][0])
            requests.append((name, start, stop, out))
            want.append(shard.read(name, start, stop))
    calls = shard.read_calls(requests)
    assert len(calls) == 1  # a small shard: everything within one gap of the next
    for call in calls:
        call()
    separate = shard.read_calls([(n, a, b, torch.empty_like(o)) for n, a, b, o in requests], max_gap=0)
    assert len(separate) == len(requests)  # no range touches the next: one request each
    for (name, _, _, out), expected in zip(requests, want):
        assert out.view(torch.uint8).equal(expected.view(torch.uint8)), name
    shard.close()


def test_loader_reads_windows_of_batches_in_one_pass_with_bounded_buffers(tmp_path):
    """Batches grouped into windows of at most window_bytes are read in one sorted pass: the same
    raw batches in plan order, from (prefetch + 1) windows of buffers reused across epochs."""
    cache = write_cache(tmp_path / "c", num_samples=13, encoding="topk", dtype="fp8", topk=5, shard_size=4)
    reader = open_cache(cache.path)
    plan = [[3, 1], [12], [7, 2, 0], [5, 6], [11, 10, 9], [4, 8]]
    sizes = [reader.raw_batch_nbytes(batch) for batch in plan]
    assert sizes == [reader.get_raw_batch(batch).pop("input_ids").untyped_storage().nbytes() for batch in plan]
    window = sizes[0] + sizes[1]  # windows [0, 1], [2], [3, 4]?, ...: at least two batches share one
    loader = CacheBatchLoader(cache.path, plan, max_tokens=80, prefetch=1, window_bytes=window, pin_memory=False)
    windows = loader.windows()
    assert [b for w in windows for b in w] == list(range(len(plan))) and windows[0] == [0, 1]
    assert all(sum(sizes[b] for b in w) <= window or len(w) == 1 for w in windows)
    storages = set()
    for epoch in range(2):
        for b, raw in enumerate(loader):
            _assert_raw_equal(raw, reader.get_raw_batch(plan[b], max_tokens=80), (epoch, b))
            storages.add(raw["input_ids"].untyped_storage().data_ptr())
    assert len(storages) <= 2 * max(len(w) for w in windows)  # two windows of buffers, reused in epoch 2


def test_read_calls_are_one_per_merged_range_read_in_pieces_and_independent(tmp_path, monkeypatch):
    """``read_calls`` gives one call per merged range, which reads it front to back in ``preadv``s of
    at most 8 MiB; the calls fill their own bytes: run in any order (here: backwards, on threads)
    they give what one ``read`` per range gives."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    values = torch.arange(6 * 1024 * 1024, dtype=torch.int32).view(-1, 1024)  # 24 MiB, 6144 rows of 4 KiB
    save_file({"a": values, "b": values[:64, :8].clone()}, str(path))
    shard = ShardFile(path, path.stat().st_size)
    ranges = [("a", 5000, 6144), ("a", 10, 4000), ("b", 3, 9), ("a", 4001, 4002)]  # 4.5 + 15.6 MiB, gaps
    outs = [torch.empty((stop - start, *shard.tensors[name][1][1:]), dtype=torch.int32) for name, start, stop in ranges]
    calls = shard.read_calls([(name, start, stop, out) for (name, start, stop), out in zip(ranges, outs)])
    # a[10:4002] (4 KiB apart: one range) and a[5000:] (4 MiB further: another); b's 24 bytes lie
    # within 512 KiB of a's first rows or not, depending on where safetensors put it
    assert len(calls) in (2, 3)
    sizes, preadv = [], os.preadv

    def counted(fd, views, offset):
        sizes.append(sum(memoryview(v).nbytes for v in views))
        return preadv(fd, views, offset)

    monkeypatch.setattr(os, "preadv", counted)
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(call) for call in calls[::-1]]:
            future.result()
    assert max(sizes) <= 8 << 20 and len(sizes) >= len(calls) + 1  # the 15.6 MiB range took two preadvs
    for (name, start, stop), out in zip(ranges, outs):
        assert out.equal(shard.read(name, start, stop)), (name, start, stop)
    shard.close()


def test_loader_with_requests_in_flight_across_more_shards_than_the_open_file_limit(tmp_path):
    """``io_depth > 1``: one window's reads over more shards than a reader keeps open, run on a pool
    of threads, give the same raw batches as one read at a time; no shard is closed under a read."""
    cache = write_cache(tmp_path / "c", num_samples=2 * MAX_OPEN_SHARDS + 3, encoding="hidden", dtype="fp8",
                        shard_size=1)
    reader = open_cache(cache.path)
    n = len(reader)
    plan = [[(7 * i) % n, (7 * i + 3) % n] for i in range(n // 2)]
    for io_depth in (1, 8):
        loader = CacheBatchLoader(cache.path, plan, max_tokens=80, io_depth=io_depth, pin_memory=False)
        for epoch in range(2):
            for b, raw in enumerate(loader):
                _assert_raw_equal(raw, reader.get_raw_batch(plan[b], max_tokens=80), (io_depth, epoch, b))
        assert all(len(r._open) <= MAX_OPEN_SHARDS for r in loader._readers)
        loader.close()
    with pytest.raises(ValueError, match="io_depth"):
        CacheBatchLoader(cache.path, plan, io_depth=0, pin_memory=False)
