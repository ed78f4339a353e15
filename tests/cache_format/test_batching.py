"""collate_padded and pack_samples on hand-made samples with known values."""

from __future__ import annotations

import pytest
import torch

from draftcache.cache_format import collate_padded, pack_samples


def _sample(seq: int, base: int, vd: int = 3, aux: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.arange(seq) + base
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(seq, dtype=torch.int64),
        "loss_mask": (ids % 2).long(),
        "aux_hidden_states": (torch.arange(seq * aux, dtype=torch.float32).reshape(seq, aux) + base).bfloat16(),
        "target_probs": torch.full((seq, vd), float(base)),
        "position_mask": (ids % 2).bool().unsqueeze(-1),
    }


def test_pack_samples_hand_example():
    a, b, c = _sample(3, 10), _sample(2, 20), _sample(4, 30)
    batch = pack_samples([a, b, c], max_tokens=6)  # next-fit rows: [a, b] (5 tokens), [c] (4 tokens)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 0, 0, 1], [0, 1, 0, 1, 0]]
    assert batch["seq_lens"].tolist() == [[3, 2], [4, 1]]  # the padding tail is a segment: rows sum to T
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["doc_remaining"].tolist() == [[2, 1, 0, 1, 0], [3, 2, 1, 0, 0]]
    assert batch["target_probs"][:, :, 0].tolist() == [[10, 10, 10, 20, 20], [30, 30, 30, 30, 0]]
    assert batch["position_mask"].shape == (2, 5, 1) and not batch["position_mask"][1, 4, 0]
    assert torch.equal(batch["aux_hidden_states"][0, 3:5], b["aux_hidden_states"])
    assert batch["aux_hidden_states"].dtype == torch.bfloat16 and not batch["aux_hidden_states"][1, 4].any()
    assert (batch["seq_lens"].sum(-1) == batch["input_ids"].shape[1]).all()


def test_pack_samples_pads_to_a_multiple_and_checks_the_budget():
    batch = pack_samples([_sample(3, 0), _sample(3, 5)], max_tokens=8, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["seq_lens"].tolist() == [[3, 3, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    with pytest.raises(ValueError, match="sample 1 has 5 tokens, more than max_tokens 4"):
        pack_samples([_sample(2, 0), _sample(5, 0)], max_tokens=4)


def test_collate_padded():
    a, b = _sample(2, 1), _sample(4, 7)
    batch = collate_padded([a, b], pad_to_multiple_of=3)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0, 0, 0], [7, 8, 9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]]
    assert batch["position_mask"][:, :, 0].tolist() == [[True, False, False, False, False, False],
                                                       [True, False, True, False, False, False]]
    assert batch["target_probs"][:, :, 2].tolist() == [[1, 1, 0, 0, 0, 0], [7, 7, 7, 7, 0, 0]]
    assert torch.equal(batch["aux_hidden_states"][1, :4], b["aux_hidden_states"])
    assert set(batch) == set(a)
