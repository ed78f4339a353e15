"""Training memory at real sizes: the DFlash attention runs in checkpointed anchor chunks and both
losses project the vocabulary in checkpointed row chunks. Results must equal the unchunked
computation the trainer used before (kept here in plain torch ops as the reference), and autograd
must keep no tensor as large as one head's context scores or the full ``[N, V]`` logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from draftcache.trainer.dflash.loss import (
    dflash_block_labels,
    dflash_loss,
    dflash_position_weights,
    sample_anchors,
)
from draftcache.trainer.dflash.model import build_dflash_blocks
from draftcache.trainer.eagle3.ttt import ttt_forward
from draftcache.trainer.layers import apply_rotary, document_layout
from draftcache.trainer.vocab_loss import chunked_cross_entropy, chunked_soft_cross_entropy

from .helpers import random_draft
from .test_dflash_model import random_model, tiny_config


# ----------------------------------------------------- the unchunked path, as the trainer computed it before


def _unchunked_attention(attn, x, cos, sin, context_k, context_v, context_mask, block_size):
    """Every anchor's ``[B, h, A, Bk, S]`` scores at once (einsum), one softmax over context + own block."""
    batch, slots, _ = x.shape
    blocks, h, d = slots // block_size, attn.num_heads, attn.head_dim
    groups = attn.num_heads // attn.num_kv_heads

    def heads(t, n):
        return t.view(batch, -1, n, d).transpose(1, 2)

    q = apply_rotary(attn.q_norm(heads(attn.q_proj(x), h)), cos, sin)
    k = apply_rotary(attn.k_norm(heads(attn.k_proj(x), attn.num_kv_heads)), cos, sin)
    v = heads(attn.v_proj(x), attn.num_kv_heads)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    context_k, context_v = context_k.repeat_interleave(groups, 1), context_v.repeat_interleave(groups, 1)
    qb, kb, vb = (t.reshape(batch, h, blocks, block_size, d) for t in (q, k, v))
    scale = 1.0 / math.sqrt(d)
    ctx = torch.einsum("bhakd,bhsd->bhaks", qb, context_k) * scale
    ctx = ctx.masked_fill(~context_mask[:, None, :, None, :], float("-inf"))
    own = torch.einsum("bhakd,bhajd->bhakj", qb, kb) * scale
    probs = torch.cat([ctx, own], -1).float().softmax(-1)
    seq = context_k.shape[2]
    out = torch.einsum("bhaks,bhsd->bhakd", probs[..., :seq], context_v)
    out = out + torch.einsum("bhakj,bhajd->bhakd", probs[..., seq:], vb)
    return attn.o_proj(out.reshape(batch, h, slots, d).transpose(1, 2).reshape(batch, slots, -1))


def unchunked_dflash_loss(model, feats, ids, argmax, loss_mask, anchors, valid, seq_lens):
    """The loss with full-width attention scores and full ``[N, V]`` fp32 logits."""
    c = model.config
    batch, seq = ids.shape
    _, positions, _ = document_layout(seq_lens, seq)
    blocks = build_dflash_blocks(ids, anchors, valid, block_size=c.block_size, mask_token_id=c.mask_token_id,
                                 seq_lens=seq_lens)
    context = model.context(feats)
    ctx_cos, ctx_sin = model.rotary.cos_sin(positions, context.dtype)
    cos, sin = model.rotary.cos_sin(blocks.position_ids.reshape(batch, -1), context.dtype)
    x = model.embed_tokens(blocks.input_ids.reshape(batch, -1))
    for layer in model.layers:
        ck, cv = layer.self_attn.context_kv(context, ctx_cos, ctx_sin)
        h = x + _unchunked_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, ck, cv,
                                     blocks.context_mask, c.block_size)
        x = h + layer.mlp(layer.post_attention_layernorm(h))
    hidden = model.norm(x).view(batch, anchors.shape[1], c.block_size, -1)
    labels, label_mask = dflash_block_labels(argmax, loss_mask, anchors, valid, block_size=c.block_size,
                                             seq_lens=seq_lens)
    w = dflash_position_weights(c.block_size).expand_as(label_mask)[label_mask]
    logits = model.lm_head(hidden[label_mask]).float()  # [N, V]
    ce = F.cross_entropy(logits, labels[label_mask], reduction="none")
    return (ce * w).sum() / w.sum(), logits.argmax(-1) == labels[label_mask]


def _dflash_batch(seq=40, vocab=64, feat=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([[seq // 2, seq - seq // 2], [seq - 5, 5]])
    ids = torch.randint(0, vocab - 1, (2, seq), generator=gen)
    feats = torch.randn(2, seq, feat, generator=gen)
    argmax = torch.randint(0, vocab, (2, seq), generator=gen)
    loss_mask = (torch.rand(2, seq, generator=gen) > 0.25).long()
    return feats, ids, argmax, loss_mask, seq_lens


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_dflash_chunked_loss_and_gradients_equal_the_unchunked_path(kv_heads):
    model = random_model(tiny_config(num_key_value_heads=kv_heads))
    feats, ids, argmax, loss_mask, seq_lens = _dflash_batch()
    anchors, valid = sample_anchors(loss_mask, num_anchors=9, seq_lens=seq_lens,
                                    generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    ref, ref_hit = unchunked_dflash_loss(model, feats, ids, argmax, loss_mask, anchors, valid, seq_lens)
    ref_grads = torch.autograd.grad(ref, params)
    # 1 anchor per attention chunk, 5 rows per logits chunk: many chunks, a ragged last one
    out = dflash_loss(model, target_hidden=feats, input_ids=ids, target_argmax=argmax, loss_mask=loss_mask,
                      anchor_positions=anchors, anchor_valid=valid, seq_lens=seq_lens,
                      attention_chunk_elements=1, logits_chunk_elements=5 * model.config.vocab_size)
    grads = torch.autograd.grad(out.loss, params)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert int(out.correct.sum()) == int(ref_hit.sum())
    for (name, _), g, r in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), name


def _saved_numels(fn, *existing) -> list[int]:
    """Element counts of the tensors autograd keeps for the backward of ``fn()``'s graph, leaving out
    those sharing storage with ``existing`` tensors or modules' parameters (alive anyway, no memory added)."""
    alive = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
    alive |= {p.untyped_storage().data_ptr() for m in existing if isinstance(m, torch.nn.Module) for p in m.parameters()}
    numels: list[int] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in alive:
            numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


def test_dflash_backward_keeps_neither_context_scores_nor_full_logits():
    batch, seq, anchors_wanted, vocab = 2, 128, 32, 128
    config = tiny_config(vocab_size=vocab, mask_token_id=vocab - 1)
    model = random_model(config)
    feats, ids, argmax, _, seq_lens = _dflash_batch(seq=seq, vocab=vocab)
    loss_mask = torch.ones(batch, seq, dtype=torch.long)
    anchors, valid = sample_anchors(loss_mask, num_anchors=anchors_wanted, seq_lens=seq_lens,
                                    generator=torch.Generator().manual_seed(0))
    args = (model, feats, ids, argmax, loss_mask, anchors, valid, seq_lens)
    rows = int(dflash_block_labels(argmax, loss_mask, anchors, valid, block_size=config.block_size,
                                   seq_lens=seq_lens)[1].sum())
    one_head_scores = batch * anchors.shape[1] * config.block_size * seq
    limit = min(one_head_scores, rows * vocab)
    # the reference path keeps both (so the measure can see them) ...
    assert max(_saved_numels(lambda: unchunked_dflash_loss(*args), *args)) >= limit
    # ... the trainer's, in several chunks (one anchor, 8 rows), keeps tensors of O(A*Bk*H + S*H) only
    kept = _saved_numels(lambda: dflash_loss(model, target_hidden=feats, input_ids=ids, target_argmax=argmax,
                                             loss_mask=loss_mask, anchor_positions=anchors, anchor_valid=valid,
                                             seq_lens=seq_lens, attention_chunk_elements=1,
                                             logits_chunk_elements=8 * vocab), *args)
    assert max(kept) < limit, (max(kept), one_head_scores, rows * vocab)


# ----------------------------------------------------------------------------------- the vocabulary loss


def test_chunked_cross_entropy_equals_full_logits_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    full = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    ref = torch.autograd.grad(full.sum(), [hidden, head.weight])
    ce, top = chunked_cross_entropy(hidden, head, labels, vocab_size=50, chunk_elements=4 * 50)  # 6 chunks
    got = torch.autograd.grad(ce.sum(), [hidden, head.weight])
    assert torch.allclose(ce, full, atol=1e-6)
    assert torch.equal(top, head(hidden).argmax(-1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ref))


def test_chunked_soft_cross_entropy_equals_full_logits_with_gradients(draft_config):
    model = random_draft(draft_config)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 11, draft_config.hidden_size, generator=gen, requires_grad=True)
    probs = torch.softmax(torch.randn(2, 13, draft_config.draft_vocab_size, generator=gen), -1)[:, 2:]  # a view
    params = [hidden, model.lm_head.weight, model.norm.weight]
    full = -(probs * F.log_softmax(model.compute_logits(hidden).float(), -1)).sum(-1)
    ref = torch.autograd.grad(full.sum(), params)
    vd = draft_config.draft_vocab_size
    loss, top = chunked_soft_cross_entropy(hidden, model.compute_logits, probs, vocab_size=vd,
                                           chunk_elements=2 * 3 * vd)  # 3 slots a chunk
    got = torch.autograd.grad(loss.sum(), params)
    assert torch.allclose(loss, full, atol=1e-6)
    assert torch.equal(top, model.compute_logits(hidden).argmax(-1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ref))


def test_chunked_soft_cross_entropy_takes_the_target_distribution_chunk_by_chunk(draft_config):
    """A target given as row indices into final hidden states (a lm_head with a bias makes the logits):
    loss and gradients equal the full ``softmax(lm_head(final_hidden[rows]))`` formula, and ``to_probs``
    only ever sees one chunk, without gradients and outside autocast."""
    model = random_draft(draft_config)
    vd = draft_config.draft_vocab_size
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, draft_config.hidden_size, generator=gen, requires_grad=True)
    final_hidden = torch.randn(30, 24, generator=gen)  # [T, H_t]
    target_head = torch.nn.Linear(24, vd).requires_grad_(False)
    rows = torch.randint(0, 30, (2, 11), generator=gen)  # [B, N] the target row each slot reads
    params = [hidden, model.lm_head.weight, model.norm.weight]
    probs = torch.softmax(target_head(final_hidden[rows]), -1)  # [B, N, Vd] all at once
    full = -(probs * F.log_softmax(model.compute_logits(hidden).float(), -1)).sum(-1)
    ref = torch.autograd.grad(full.sum(), params)
    seen = []

    def to_probs(chunk):  # [B, n] -> [B, n, Vd]
        seen.append((chunk.shape, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return torch.softmax(target_head(final_hidden[chunk]), -1)

    loss, top = chunked_soft_cross_entropy(hidden, model.compute_logits, rows, vocab_size=vd, to_probs=to_probs,
                                           chunk_elements=2 * 3 * vd)  # 3 slots a chunk
    got = torch.autograd.grad(loss.sum(), params)
    assert torch.allclose(loss, full, atol=1e-6)
    assert torch.equal(top, model.compute_logits(hidden).argmax(-1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ref))
    assert {shape[1] for shape, _, _ in seen} == {3, 2} and len(seen) == 2 * 4  # 4 chunks, again in the backward
    assert not any(grad or autocast for _, grad, autocast in seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the draft's mixed precision does not reach the target
        chunked_soft_cross_entropy(hidden, model.compute_logits, rows, vocab_size=vd, to_probs=to_probs,
                                   chunk_elements=2 * 3 * vd)
    assert not any(autocast for _, _, autocast in seen)


def test_ttt_backward_keeps_no_full_draft_logits(draft_config):
    from draftcache.trainer.eagle3.model import Eagle3DraftConfig

    vd = 2048  # large against every activation, so a kept [B, T, Vd] tensor stands out
    cfg = Eagle3DraftConfig.from_dict({**draft_config.to_dict(), "draft_vocab_size": vd, "target_vocab_size": 4096})
    model = random_draft(cfg)
    gen = torch.Generator().manual_seed(0)
    b, t = 2, 16
    batch = dict(input_ids=torch.randint(0, 4096, (b, t), generator=gen), attention_mask=torch.ones(b, t, dtype=torch.long),
                 loss_mask=torch.ones(b, t, dtype=torch.long),
                 aux_hidden_states=torch.randn(b, t, 3 * cfg.target_hidden_size, generator=gen),
                 target_probs=torch.softmax(torch.randn(b, t, vd, generator=gen), -1))
    kept = _saved_numels(lambda: ttt_forward(model, **batch, ttt_steps=3, logits_chunk_elements=b * 4 * vd),
                         model, *batch.values())
    assert max(kept) < b * t * vd // 2, max(kept)
