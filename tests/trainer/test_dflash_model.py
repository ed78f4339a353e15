"""DFlash draft and loss against a slow per-block reference written here from the definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.loss import (
    dflash_block_labels,
    dflash_loss,
    dflash_position_weights,
    sample_anchors,
)
from draftcache.trainer.dflash.model import DFlashDraftModel, build_dflash_blocks, dflash_context_mask

BLOCK = 4
MASK_ID = 63


def tiny_config(**overrides) -> DFlashDraftConfig:
    kwargs = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=256, vocab_size=64, target_hidden_size=24, num_target_layers=6,
                  target_layer_ids=[1, 3], block_size=BLOCK, mask_token_id=MASK_ID)
    kwargs.update(overrides)
    return DFlashDraftConfig(**kwargs)


def random_model(config: DFlashDraftConfig, seed: int = 0) -> DFlashDraftModel:
    torch.manual_seed(seed)
    model = DFlashDraftModel(config)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.size(-1) ** 0.5)
    return model


# ------------------------------------------------------------------ slow reference, one block at a time


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]  # [T, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = d // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def reference_block_hidden(model, feats, ctx_pos, block_ids, block_pos):
    """One block: feats [C, F] (its context only), ctx_pos [C], block_ids/pos [Bk] -> [Bk, H]."""
    c = model.config
    p = dict(model.named_parameters())
    eps, theta, d = c.rms_norm_eps, c.rope_theta, c.head_dim
    ctx = _rms(feats @ p["fc.weight"].T, p["hidden_norm.weight"], eps)
    x = p["embed_tokens.weight"][block_ids]
    for i in range(c.num_hidden_layers):
        pre = f"layers.{i}."
        h = _rms(x, p[pre + "input_layernorm.weight"], eps)
        q = (h @ p[pre + "self_attn.q_proj.weight"].T).view(-1, c.num_attention_heads, d)
        kb = (h @ p[pre + "self_attn.k_proj.weight"].T).view(-1, c.num_key_value_heads, d)
        vb = (h @ p[pre + "self_attn.v_proj.weight"].T).view(-1, c.num_key_value_heads, d)
        kc = (ctx @ p[pre + "self_attn.k_proj.weight"].T).view(-1, c.num_key_value_heads, d)
        vc = (ctx @ p[pre + "self_attn.v_proj.weight"].T).view(-1, c.num_key_value_heads, d)
        qn, kn = p[pre + "self_attn.q_norm.weight"], p[pre + "self_attn.k_norm.weight"]
        q = _rope(_rms(q, qn, eps).transpose(0, 1), block_pos, theta)  # [h, Bk, d]
        kb = _rope(_rms(kb, kn, eps).transpose(0, 1), block_pos, theta)
        kc = _rope(_rms(kc, kn, eps).transpose(0, 1), ctx_pos, theta)
        keys = torch.cat([kc, kb], 1)  # every context slot and every block slot visible
        vals = torch.cat([vc.transpose(0, 1), vb.transpose(0, 1)], 1)
        rep = c.num_attention_heads // c.num_key_value_heads
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
        att = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(d), -1) @ vals  # [h, Bk, d]
        x = x + att.transpose(0, 1).reshape(len(block_ids), -1) @ p[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, p[pre + "post_attention_layernorm.weight"], eps)
        gate, up = h @ p[pre + "mlp.gate_proj.weight"].T, h @ p[pre + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
    return _rms(x, p["norm.weight"], eps)


def reference_loss(model, feats, ids, argmax, loss_mask, docs, anchors):
    """docs: per row, list of document lengths; anchors: per row, list of anchor slots."""
    c = model.config
    num = den = 0.0
    for b, row_anchors in enumerate(anchors):
        starts = [sum(docs[b][:j]) for j in range(len(docs[b]))]
        for a in row_anchors:
            j = max(i for i, s in enumerate(starts) if s <= a)
            start, end = starts[j], starts[j] + docs[b][j]
            ctx_slots = torch.arange(start, a)
            block_ids = torch.tensor([int(ids[b, a])] + [c.mask_token_id] * (c.block_size - 1))
            block_pos = torch.arange(c.block_size) + (a - start)
            hidden = reference_block_hidden(model, feats[b, ctx_slots], ctx_slots - start, block_ids, block_pos)
            logits = hidden @ model.lm_head.weight.T
            for k in range(1, c.block_size):
                if a + k >= end or not loss_mask[b, a + k]:
                    continue
                w = math.exp(-(k - 1) / 7)
                num += w * F.cross_entropy(logits[k], argmax[b, a + k - 1]).item()
                den += w
    return num / den


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs = [[7, 9, 4], [20]]
    seq = 20
    feats = torch.randn(2, seq, 48, generator=gen)
    ids = torch.randint(0, 60, (2, seq), generator=gen)
    argmax = torch.randint(0, 64, (2, seq), generator=gen)
    loss_mask = (torch.rand(2, seq, generator=gen) < 0.7).long()
    seq_lens = torch.tensor([[7, 9, 4], [20, 0, 0]])
    return docs, feats, ids, argmax, loss_mask, seq_lens


def test_context_mask_matches_per_block_definition():
    docs, _, _, _, _, seq_lens = _batch()
    from draftcache.trainer.layers import document_layout
    doc_ids, _, _ = document_layout(seq_lens, 20)
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    attention_mask[1, 17:] = 0
    anchors = torch.tensor([[1, 6, 7, 12, 16], [0, 3, 11, 18, 19]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    mask = dflash_context_mask(anchors, valid, doc_ids, attention_mask)
    for b in range(2):
        starts = [sum(docs[b][:j]) for j in range(len(docs[b]))]
        for a_idx, a in enumerate(anchors[b].tolist()):
            start = max(s for s in starts if s <= a)
            expected = torch.zeros(20, dtype=torch.bool)
            if valid[b, a_idx]:
                expected[start:a] = True
                expected &= attention_mask[b].bool()
            assert torch.equal(mask[b, a_idx], expected), (b, a)


def test_blocks_inputs_and_positions_restart_per_document():
    _, _, ids, _, _, seq_lens = _batch()
    anchors = torch.tensor([[3, 8], [5, 19]])
    blocks = build_dflash_blocks(ids, anchors, torch.ones(2, 2, dtype=torch.bool), block_size=BLOCK,
                                 mask_token_id=MASK_ID, seq_lens=seq_lens)
    assert blocks.input_ids[0, 1].tolist() == [int(ids[0, 8])] + [MASK_ID] * 3
    assert blocks.position_ids[0, 1].tolist() == [1, 2, 3, 4]  # slot 8 is position 1 of document 2
    assert blocks.position_ids[1, 1].tolist() == [19, 20, 21, 22]


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_loss_equals_slow_per_block_reference(kv_heads):
    config = tiny_config(num_key_value_heads=kv_heads)
    model = random_model(config)
    docs, feats, ids, argmax, loss_mask, seq_lens = _batch()
    anchors, valid = sample_anchors(loss_mask, num_anchors=6, seq_lens=seq_lens,
                                    generator=torch.Generator().manual_seed(3))
    out = dflash_loss(model, target_hidden=feats, input_ids=ids, target_argmax=argmax, loss_mask=loss_mask,
                      anchor_positions=anchors, anchor_valid=valid, seq_lens=seq_lens)
    row_anchors = [[int(a) for a, v in zip(anchors[b], valid[b]) if v] for b in range(2)]
    expected = reference_loss(model, feats, ids, argmax, loss_mask, docs, row_anchors)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_blocks == sum(len(r) for r in row_anchors)
    out.loss.backward()
    assert model.fc.weight.grad is not None and model.embed_tokens.weight.grad is None


def test_anchor_sampling_respects_supervision_and_documents():
    _, _, _, _, loss_mask, seq_lens = _batch()
    from draftcache.trainer.layers import document_layout
    _, positions, remaining = document_layout(seq_lens, 20)
    anchors, valid = sample_anchors(loss_mask, num_anchors=512, seq_lens=seq_lens)
    for b in range(2):
        chosen = sorted(int(a) for a, v in zip(anchors[b], valid[b]) if v)
        expected = [t for t in range(20) if loss_mask[b, t] and positions[b, t] >= 1 and remaining[b, t] >= 1]
        assert chosen == expected  # 512 > candidates: every candidate, once
    few, few_valid = sample_anchors(loss_mask, num_anchors=3, seq_lens=seq_lens)
    assert few.shape == (2, 3) and bool(few_valid.all())
    assert bool((few[:, 1:] >= few[:, :-1]).all())


def test_labels_are_target_argmax_shifted_and_cut_at_document_end():
    _, _, _, argmax, _, seq_lens = _batch()
    ones = torch.ones(2, 20, dtype=torch.long)
    labels, mask = dflash_block_labels(argmax, ones, torch.tensor([[5, 14]] * 2), torch.ones(2, 2, dtype=torch.bool),
                                       block_size=BLOCK, seq_lens=seq_lens)
    # row 0: slot 5 is in document [0, 7): block slots k=1 (pos 6) counts, k=2 (pos 7) is the next document
    assert mask[0, 0].tolist() == [False, True, False, False]
    assert labels[0, 0, 1] == argmax[0, 5]
    assert mask[1, 1].tolist() == [False, True, True, True]
    assert labels[1, 1, 1:].tolist() == argmax[1, 14:17].tolist()


def test_position_weights_follow_the_recipe():
    w = dflash_position_weights(16)
    assert w[0] == 0 and w[1] == 1
    assert w[8].item() == pytest.approx(math.exp(-1.0))


def test_config_rejects_bad_values_with_every_problem_named():
    with pytest.raises(ValueError) as info:
        tiny_config(block_size=1, mask_token_id=64, target_layer_ids=[1, 1])
    text = str(info.value)
    assert "block_size" in text and "mask_token_id" in text and "target_layer_ids" in text
