"""Reader round trips against a reference computed with the shared supervision functions."""

from __future__ import annotations

import pickle

import pytest
import torch

from draftcache.cache_format import CacheReader, open_cache
from draftcache.data.vocab import DraftVocab, build_draft_vocab

from .synth import AUX, HIDDEN, SELECTED, VOCAB, expected_sample, topk_rows, write_cache

FIELDS = {"input_ids": torch.int64, "attention_mask": torch.int64, "loss_mask": torch.int64,
          "target_probs": torch.float32, "position_mask": torch.bool}


def _check_layout(got: dict, seq: int, vd: int, aux_dtype: torch.dtype) -> None:
    assert list(got) == ["input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs",
                         "position_mask"]
    for name, dtype in FIELDS.items():
        assert got[name].dtype == dtype, name
    assert got["aux_hidden_states"].dtype == aux_dtype
    assert got["target_probs"].shape == (seq, vd)
    assert got["position_mask"].shape == (seq, 1)
    assert got["aux_hidden_states"].shape == (seq, AUX)


def test_probs_fp32_round_trip_is_exact(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=10, encoding="probs", dtype="fp32", shard_size=4)
    reader = open_cache(cache.path, verify=True)
    assert len(reader) == 10 and reader.aux_dim == AUX
    assert reader.selected_token_ids.tolist() == sorted(SELECTED)
    assert reader.num_tokens == sum(s.input_ids.numel() for s in cache.samples)
    for i, sample in enumerate(cache.samples):
        got, want = reader[i], expected_sample(sample, cache.vocab)
        _check_layout(got, sample.input_ids.numel(), len(SELECTED), torch.float32)
        for name in want:
            assert torch.equal(got[name], want[name].to(got[name].dtype)), (i, name)


def test_shift_semantics_on_one_sample(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=3, encoding="probs", dtype="fp32")
    sample, got = cache.samples[1], open_cache(cache.path)[1]
    seq = sample.input_ids.numel()
    assert got["input_ids"][:-1].tolist() == sample.input_ids[1:].tolist() and int(got["input_ids"][-1]) == 0
    assert got["loss_mask"][:-1].tolist() == sample.loss_mask[1:].tolist() and int(got["loss_mask"][-1]) == 0
    assert torch.equal(got["aux_hidden_states"], sample.aux)  # features are never shifted
    for t in range(seq):
        supervised = t + 1 < seq and bool(sample.loss_mask[t + 1])
        if supervised:  # slot t carries position t+1's distribution
            logits = sample.logits[t + 1, cache.vocab.selected_token_ids]
            assert torch.equal(got["target_probs"][t], torch.softmax(logits, -1))
            in_draft = bool(cache.vocab.t2d[sample.logits[t + 1].argmax()])
            assert bool(got["position_mask"][t, 0]) == in_draft
        else:
            assert not got["target_probs"][t].any() and not got["position_mask"][t, 0]


def test_supervised_position_zero_has_no_slot(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=3, encoding="probs", dtype="fp32")
    sample = cache.samples[2]  # synth marks position 0 supervised for i % 5 == 2
    assert int(sample.loss_mask[0]) == 1
    reader = open_cache(cache.path)
    raw = reader.get_raw(2)
    assert raw["target_probs"].shape[0] == int(sample.loss_mask.sum())  # stored, incl. position 0
    got = reader[2]
    assert int(got["position_mask"].sum()) == int(expected_sample(sample, cache.vocab)["position_mask"].sum())


@pytest.mark.parametrize("dtype, atol", [("fp32", 1e-6), ("bf16", 2e-2)])
def test_hidden_round_trip_within_storage_rounding(tmp_path, dtype, atol):
    cache = write_cache(tmp_path / "c", num_samples=6, encoding="hidden", dtype=dtype)
    reader = open_cache(cache.path)
    for i, sample in enumerate(cache.samples):
        got, want = reader[i], expected_sample(sample, cache.vocab)
        _check_layout(got, sample.input_ids.numel(), len(SELECTED), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        assert torch.equal(got["position_mask"], want["position_mask"])  # from the exact stored argmax
        assert torch.allclose(got["target_probs"], want["target_probs"], atol=atol, rtol=0)
        if dtype == "bf16":  # exact up to fp32 matmul order once the stored rounding is applied
            rounded = sample.final_hidden.bfloat16().float()
            sample.logits = rounded @ cache.weight.T + cache.bias
            assert torch.allclose(got["target_probs"], expected_sample(sample, cache.vocab)["target_probs"],
                                  atol=1e-5, rtol=0)


def test_topk_round_trip_argmax_exact(tmp_path):
    k = 4
    cache = write_cache(tmp_path / "c", num_samples=6, encoding="topk", dtype="bf16", topk=k)
    reader = open_cache(cache.path)
    for i, sample in enumerate(cache.samples):
        got, want = reader[i], expected_sample(sample, cache.vocab)
        assert torch.equal(got["position_mask"], want["position_mask"])
        rows = want["loss_mask"].bool()
        dense = got["target_probs"]
        assert torch.equal(dense[rows].argmax(-1), want["target_probs"][rows].argmax(-1))
        assert ((dense[rows] > 0).sum(-1) == k).all() and not dense[~rows].any()
        vals, ids = topk_rows(want["target_probs"][rows], k)
        ref = torch.zeros_like(dense[rows]).scatter_(1, ids, vals)
        assert torch.allclose(dense[rows], ref, atol=1e-2, rtol=0)
        assert torch.allclose(dense[rows].sum(-1), torch.ones(int(rows.sum())), atol=1e-2)


def test_hidden_cache_changes_draft_vocab_at_open(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=6, encoding="hidden", dtype="fp32")
    counts = torch.tensor(open_cache(cache.path).manifest["token_counts"])
    by_size = open_cache(cache.path, draft_vocab=10)
    want_vocab = build_draft_vocab(counts, 10)
    assert torch.equal(by_size.selected_token_ids, want_vocab.selected_token_ids)
    explicit_ids = [5, 1, 40, 63]
    explicit = open_cache(cache.path, draft_vocab=explicit_ids)
    assert explicit.selected_token_ids.tolist() == sorted(explicit_ids)
    for reader, vocab in ((by_size, want_vocab), (explicit, DraftVocab.from_selected(explicit_ids, VOCAB))):
        for i, sample in enumerate(cache.samples):
            got, want = reader[i], expected_sample(sample, vocab)
            assert got["target_probs"].shape[1] == vocab.size
            assert torch.equal(got["position_mask"], want["position_mask"])
            assert torch.allclose(got["target_probs"], want["target_probs"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("encoding, topk", [("probs", None), ("topk", 3)])
def test_fixed_vocab_caches_refuse_another_draft_vocab(tmp_path, encoding, topk):
    cache = write_cache(tmp_path / "c", num_samples=2, encoding=encoding, topk=topk)
    assert open_cache(cache.path, draft_vocab=len(SELECTED)).draft_vocab.size == len(SELECTED)
    assert open_cache(cache.path, draft_vocab=list(reversed(SELECTED))).draft_vocab.size == len(SELECTED)
    with pytest.raises(ValueError, match="Only caches precomputed with --supervision hidden can change"):
        open_cache(cache.path, draft_vocab=10)
    with pytest.raises(ValueError, match="3 explicit ids"):
        open_cache(cache.path, draft_vocab=[1, 2, 3])


def test_raw_rebuilt_by_a_pickled_reader_matches_the_stored_arrays(tmp_path):
    """``rebuild_targets(get_raw(i))`` of a pickled reader against the stored rows turned into
    targets by hand: bf16 final_hidden @ W[selected].T + b[selected] in fp32, softmax, shifted."""
    cache = write_cache(tmp_path / "c", num_samples=5, encoding="hidden", dtype="bf16")
    reader = open_cache(cache.path, draft_vocab=12)
    reader[0]
    clone = pickle.loads(pickle.dumps(reader))
    raw = clone.get_raw(3)
    assert raw["input_ids"].dtype == torch.int32 and raw["loss_mask"].dtype == torch.uint8
    assert raw["final_hidden"].shape == (int(raw["loss_mask"].sum()), HIDDEN)
    got = clone.rebuild_targets(raw, "cpu")
    sample, selected = cache.samples[3], clone.selected_token_ids.tolist()
    stored = sample.final_hidden[sample.loss_mask.bool()].bfloat16().float()  # [M, H] as written
    positions = torch.nonzero(sample.loss_mask).flatten().tolist()
    for row, p in enumerate(positions):
        if p == 0:
            continue  # position 0's target has no slot
        logits = stored[row] @ cache.weight[selected].T + cache.bias[selected]  # [Vd]
        torch.testing.assert_close(got["target_probs"][p - 1], torch.softmax(logits, -1), rtol=0, atol=1e-6)
        argmax = int(sample.logits[p].argmax())
        assert bool(got["position_mask"][p - 1, 0]) == (argmax in selected)
    unsupervised = [t for t in range(sample.input_ids.numel()) if t + 1 not in positions]
    assert not got["target_probs"][unsupervised].any() and not got["position_mask"][unsupervised].any()
    assert got["input_ids"].tolist() == sample.input_ids[1:].tolist() + [0]


def test_side_files_lengths_and_index_errors(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=9, shard_size=4)
    reader = CacheReader(cache.path)
    assert torch.equal(reader.target_embeddings(), cache.embeddings)
    assert reader.sample_lengths().tolist() == [s.input_ids.numel() for s in cache.samples]
    assert reader.shard_ranges() == [(0, 4), (4, 8), (8, 9)]
    assert torch.equal(reader[-1]["input_ids"], reader[8]["input_ids"])
    with pytest.raises(IndexError, match="sample 9 is out of range: the cache has 9 committed samples"):
        reader[9]


def test_many_shards_stay_within_open_file_limit(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=24, shard_size=2)
    reader = open_cache(cache.path)
    for i in range(len(reader)):
        reader[i]
    assert len(reader._open) == 8
