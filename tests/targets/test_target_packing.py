"""Packed rows: the block-causal mask, per-document positions, and parity with running each document alone."""

from __future__ import annotations

import pytest
import torch
from tiny_targets import PACKING_FAMILIES, VOCAB, build_model

from draftcache.targets import HFEagle3TargetModel, PackingError, block_causal_mask, packed_position_ids
from draftcache.targets.packing import packed_attention_mask

# Row 0: three documents and a 2-token pad tail; row 1: two documents, an unused (zero) slot, full row.
SEQ_LENS = torch.tensor([[5, 7, 3], [9, 0, 8]])
T = 17


def test_block_causal_mask_bool_and_additive():
    seq_lens = torch.tensor([[2, 1, 0]])
    allowed = block_causal_mask(seq_lens, 5, torch.bool)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],  # doc 2 starts at position 2
            [0, 0, 0, 1, 0],  # pad tail: each position sees only itself
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert allowed.shape == (1, 1, 5, 5)
    assert torch.equal(allowed[0, 0], expected)
    additive = block_causal_mask(seq_lens, 5, torch.float16)
    assert additive.dtype == torch.float16
    assert torch.equal(additive == 0, allowed)
    assert torch.all(additive[~allowed] == torch.finfo(torch.float16).min)


def test_block_causal_mask_sliding_window():
    allowed = block_causal_mask(torch.tensor([[6]]), 6, torch.bool, sliding_window=3)[0, 0]
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(allowed, (k <= q) & (q - k < 3))


def test_packed_position_ids():
    positions = packed_position_ids(SEQ_LENS, T)
    assert positions.tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7],
    ]
    assert positions.dtype == torch.int64


@pytest.mark.parametrize(
    ("seq_lens", "match"),
    [
        (torch.tensor([[5, 13]]), r"sum to at most T=17, got row sums \[18\]"),
        (torch.tensor([[5, -1]]), r"must be >= 0, got \[\[5, -1\]\]"),
        (torch.tensor([5, 7]), r"shape \[B, max_docs\], got \(2,\)"),
        (torch.tensor([[5.0, 7.0]]), r"integer tensor, got dtype torch.float32"),
    ],
)
def test_seq_lens_validation(seq_lens, match):
    with pytest.raises(PackingError, match=match):
        block_causal_mask(seq_lens, T, torch.float32)


def test_seq_lens_batch_mismatch_in_generate_batch():
    target = HFEagle3TargetModel(build_model("llama"))
    ids = torch.randint(3, VOCAB, (2, T))
    with pytest.raises(PackingError, match=r"seq_lens must have shape \[B=2, max_docs\], got \(1, 3\)"):
        target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids), seq_lens=SEQ_LENS[:1])


def test_unsupported_attention_implementation():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, attn_implementation="flash_attention_2")
    with pytest.raises(PackingError, match=r"needs attn_implementation in \('eager', 'sdpa'\) .* 'flash_attention_2'"):
        packed_attention_mask(config, SEQ_LENS, T, torch.float32)


def test_hybrid_model_gets_a_mask_per_layer_type():
    masks = packed_attention_mask(build_model("gemma3").config, SEQ_LENS, T, torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["full_attention"], block_causal_mask(SEQ_LENS, T, torch.float32))
    assert torch.equal(masks["sliding_attention"], block_causal_mask(SEQ_LENS, T, torch.float32, sliding_window=4))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_packed_outputs_equal_each_document_alone(family, attn):
    model = build_model(family, attn)
    target = HFEagle3TargetModel(model)
    torch.manual_seed(2)
    input_ids = torch.randint(3, VOCAB - 4, (2, T))
    attention_mask = torch.ones_like(input_ids)
    packed = target.forward_capture(input_ids, attention_mask, seq_lens=SEQ_LENS, capture_final_hidden=True)

    for row, lengths in enumerate(SEQ_LENS.tolist()):
        start = 0
        for length in lengths:
            if length == 0:
                continue
            doc = input_ids[row : row + 1, start : start + length]
            alone = target.forward_capture(doc, torch.ones_like(doc), capture_final_hidden=True)
            span = slice(start, start + length)
            torch.testing.assert_close(packed.logits[row : row + 1, span], alone.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                packed.aux_hidden_states[row : row + 1, span], alone.aux_hidden_states, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(packed.final_hidden[row : row + 1, span], alone.final_hidden, atol=1e-5, rtol=0)
            start += length


def test_packing_without_block_mask_would_leak():
    """Sanity check that the parity test has teeth: a plain causal run differs on the second document."""
    target = HFEagle3TargetModel(build_model("llama"))
    input_ids = torch.randint(3, VOCAB - 4, (2, T))
    packed = target.forward_capture(input_ids, torch.ones_like(input_ids), seq_lens=SEQ_LENS)
    plain = target.forward_capture(input_ids, torch.ones_like(input_ids))
    assert torch.allclose(packed.logits[0, :5], plain.logits[0, :5], atol=1e-5)
    assert not torch.allclose(packed.logits[0, 5:12], plain.logits[0, 5:12], atol=1e-3)


def test_generate_batch_passes_packing_fields_unshifted():
    target = HFEagle3TargetModel(build_model("qwen3"))
    input_ids = torch.randint(3, VOCAB - 4, (2, T))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 15:] = 0
    loss_mask = attention_mask.clone()
    doc_remaining = torch.arange(T).flip(0).expand(2, T).contiguous()
    batch = target.generate_batch(input_ids, attention_mask, loss_mask, seq_lens=SEQ_LENS, doc_remaining=doc_remaining)
    raw = target.forward_capture(input_ids, attention_mask, seq_lens=SEQ_LENS)

    assert torch.equal(batch.position_ids, packed_position_ids(SEQ_LENS, T))
    assert torch.equal(batch.seq_lens, SEQ_LENS)
    assert torch.equal(batch.doc_remaining, doc_remaining)
    assert torch.equal(batch.attention_mask, attention_mask)
    assert torch.equal(batch.aux_hidden_states, raw.aux_hidden_states)
    assert torch.equal(batch.logits[:, :-1], raw.logits[:, 1:])
    assert torch.equal(batch.loss_mask[:, :-1], loss_mask[:, 1:])
    inputs = batch.to_trainer_inputs()
    assert {"position_ids", "seq_lens", "doc_remaining", "logits"} <= set(inputs)

    # Explicit position ids are used as given (here the same values) and passed through.
    explicit = packed_position_ids(SEQ_LENS, T)
    again = target.generate_batch(input_ids, attention_mask, loss_mask, position_ids=explicit, seq_lens=SEQ_LENS)
    assert again.position_ids is explicit or torch.equal(again.position_ids, explicit)
    assert torch.equal(again.logits, batch.logits)
