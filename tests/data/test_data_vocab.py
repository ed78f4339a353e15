"""Draft vocabulary selection and the d2t/t2d maps."""

from __future__ import annotations

import pytest
import torch

from draftcache.data import DraftVocab, build_draft_vocab, count_supervised_tokens, full_vocab


def _check_maps(vocab: DraftVocab) -> None:
    size = vocab.size
    assert vocab.selected_token_ids.dtype == torch.int64 and vocab.d2t.dtype == torch.int64
    assert vocab.t2d.dtype == torch.bool
    assert torch.equal(vocab.selected_token_ids, torch.arange(size) + vocab.d2t)  # target = draft + d2t
    assert int(vocab.t2d.sum()) == size
    assert torch.equal(vocab.t2d.nonzero().flatten(), vocab.selected_token_ids)
    assert bool((vocab.selected_token_ids[1:] > vocab.selected_token_ids[:-1]).all())


def test_count_supervised_tokens_counts_only_masked_positions():
    input_ids = torch.tensor([[1, 5, 5, 7], [5, 2, 7, 7]])
    loss_mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]])
    counts = count_supervised_tokens(input_ids, loss_mask, 10)
    assert counts.tolist() == [0, 0, 0, 0, 0, 3, 0, 2, 0, 0]
    again = count_supervised_tokens(torch.tensor([9]), torch.tensor([1]), 10, counts)
    assert again is counts
    assert counts.tolist() == [0, 0, 0, 0, 0, 3, 0, 2, 0, 1]


def test_special_tokens_first_then_frequency_with_ties_by_lower_id():
    counts = torch.zeros(20, dtype=torch.int64)
    counts[[3, 8, 12, 15]] = torch.tensor([5, 9, 5, 5])
    vocab = build_draft_vocab(counts, 4, special_token_ids=[19, None, 19])
    # 19 (special), then 8 (count 9), then 3 and 12 (count 5, lower ids win over 15)
    assert vocab.selected_token_ids.tolist() == [3, 8, 12, 19]
    assert vocab.d2t.tolist() == [3, 7, 10, 16]
    _check_maps(vocab)


def test_specials_out_of_range_are_ignored_and_capped_by_size():
    counts = torch.tensor([0, 4, 0, 2, 0], dtype=torch.int64)
    assert build_draft_vocab(counts, 2, special_token_ids=[99, -1, 4, 2, 0]).selected_token_ids.tolist() == [2, 4]


def test_too_few_distinct_tokens_are_padded_with_unused_low_ids():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[6, 9]] = torch.tensor([1, 3])
    vocab = build_draft_vocab(counts, 5, special_token_ids=[1])
    assert vocab.selected_token_ids.tolist() == [0, 1, 2, 6, 9]
    _check_maps(vocab)


def test_full_vocab_is_identity():
    vocab = full_vocab(7)
    assert vocab.selected_token_ids.tolist() == list(range(7))
    assert vocab.d2t.tolist() == [0] * 7
    assert vocab.t2d.all() and vocab.target_vocab_size == 7
    _check_maps(vocab)


def test_from_selected_sorts_and_checks():
    vocab = DraftVocab.from_selected([9, 2, 4], 10)
    assert vocab.selected_token_ids.tolist() == [2, 4, 9]
    _check_maps(vocab)
    with pytest.raises(ValueError, match="draft vocabulary is empty"):
        DraftVocab.from_selected([], 10)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\); got min 2, max 10"):
        DraftVocab.from_selected([2, 10], 10)
    with pytest.raises(ValueError, match="duplicate token ids"):
        DraftVocab.from_selected([3, 3], 10)


@pytest.mark.parametrize("size", [0, 11])
def test_build_rejects_sizes_outside_the_target_vocab(size):
    with pytest.raises(ValueError, match=rf"draft_vocab_size must be in \[1, 10\] \(the target vocabulary\); got {size}"):
        build_draft_vocab(torch.ones(10, dtype=torch.int64), size)


def test_vocab_from_tokenized_samples(make_tokenizer):
    from data_chat_tokenizers import CHATML_TEMPLATE

    from draftcache.data import ChatTokenizer, Conversation

    chat = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 256)
    sample = chat.encode(Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "It is four."}], "x"))
    vocab_size = len(chat.tokenizer)
    counts = count_supervised_tokens(sample.input_ids, sample.loss_mask, vocab_size)
    supervised = set(sample.input_ids[sample.loss_mask.bool()].tolist())
    assert set(counts.nonzero().flatten().tolist()) == supervised
    vocab = build_draft_vocab(counts, len(supervised) + 1, special_token_ids=[chat.tokenizer.eos_token_id])
    assert set(vocab.selected_token_ids.tolist()) == supervised | {chat.tokenizer.eos_token_id}
    _check_maps(vocab)
