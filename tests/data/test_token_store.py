"""TokenStore: tokenized samples on disk read back exactly, sliced as views, and summarised
(lengths, supervised-token counts) a chunk at a time."""

from __future__ import annotations

import pytest
import torch

from draftcache.data import token_store
from draftcache.data import (
    ChatTokenizer,
    TokenizedSample,
    TokenStore,
    TokenStoreWriter,
    load_conversations,
    sample_lengths,
    share_token_counts,
    supervised_token_counts,
    tokenize_all,
)
from draftcache.defaults import default_data_path, default_target_path
from draftcache.targets.loading import load_tokenizer


@pytest.fixture(scope="module")
def samples() -> list[TokenizedSample]:
    conversations = load_conversations(default_data_path(), num_samples=20)
    return tokenize_all(conversations, ChatTokenizer(load_tokenizer(default_target_path()), 96), conversations.skipped)


def test_tokenizing_into_a_store_gives_the_same_samples(samples, tmp_path):
    conversations = load_conversations(default_data_path(), num_samples=20, lazy=True)
    store = tokenize_all(conversations, ChatTokenizer(load_tokenizer(default_target_path()), 96),
                         conversations.skipped, limit=20, into=TokenStoreWriter(tmp_path / "s")).close()
    assert isinstance(store, TokenStore) and len(store) == len(samples) == 20
    for got, want in zip(store, samples):
        assert got.input_ids.dtype == want.input_ids.dtype == torch.int64
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.loss_mask, want.loss_mask)
        assert got.source == want.source
    # ids are int32 and the mask uint8 on disk: 5 bytes a token
    assert (tmp_path / "s" / "input_ids.bin").stat().st_size == 4 * sum(len(s.input_ids) for s in samples)
    assert (tmp_path / "s" / "loss_mask.bin").stat().st_size == sum(len(s.input_ids) for s in samples)


@pytest.mark.parametrize("chunks", [None, (3, 7)])
def test_slices_lengths_and_counts_match_a_list(samples, tmp_path, monkeypatch, chunks):
    if chunks:  # whole-store passes cut into many chunks (samples, tokens)
        monkeypatch.setattr(token_store, "_CHUNK_SAMPLES", chunks[0])
        monkeypatch.setattr(token_store, "_CHUNK_TOKENS", chunks[1])
    writer = TokenStoreWriter(tmp_path / "s")
    for s in samples:
        writer.append(s)
    store = writer.close()
    view = store[5:13]
    assert len(view) == 8 and view[0].source == samples[5].source and view[-1].source == samples[12].source
    assert list(sample_lengths(view)) == list(sample_lengths(samples[5:13]))
    assert list(sample_lengths(store)) == list(sample_lengths(samples))
    with pytest.raises(IndexError):
        view[8]
    counts = sum(share_token_counts(store, 2048, r, 3) for r in range(3))
    assert torch.equal(counts, supervised_token_counts([s.input_ids for s in samples],
                                                       [s.loss_mask for s in samples], 2048))
    with pytest.raises(FileExistsError, match="already holds a token store"):
        TokenStoreWriter(tmp_path / "s")
