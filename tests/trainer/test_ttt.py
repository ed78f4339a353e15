"""TTT loss against a slow, explicit reference loop (one attention call per query slot)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from draftcache.data.vocab import DraftVocab
from draftcache.targets.supervision import compute_target_distribution
from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel
from draftcache.trainer.eagle3.ttt import simulated_acceptance_length, ttt_forward

from .helpers import random_draft

B, T = 2, 12


# ---------------------------------------------------------------------------------------------
# Reference: written from the TTT definition, sharing nothing with the implementation but the
# parameter tensors. RoPE comes from transformers' Llama implementation.
# ---------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _shift(t: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(t)
    if k < t.size(1):
        out[:, : t.size(1) - k] = t[:, k:]
    return out


def _layout(seq_lens, attention_mask):
    """Per-slot doc id, in-doc position and remaining tokens, by plain loops."""
    doc = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    remaining = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        lengths = seq_lens[b].tolist() if seq_lens is not None else [T]
        slot = 0
        for d, length in enumerate(lengths):
            for i in range(length):
                doc[b, slot], pos[b, slot], remaining[b, slot] = d, i, length - 1 - i
                slot += 1
    return doc, pos, remaining


def reference_ttt(model: Eagle3DraftModel, batch: dict, steps: int, weight: float):
    cfg = model.config
    layer, attn = model.midlayer, model.midlayer.self_attn
    eps = cfg.rms_norm_eps
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    rotary = LlamaRotaryEmbedding(LlamaConfig(
        hidden_size=cfg.num_attention_heads * cfg.head_dim, num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings))

    seq_lens = batch.get("seq_lens")
    doc, packed_pos, remaining = _layout(seq_lens, batch["attention_mask"])
    positions = packed_pos if seq_lens is not None else torch.arange(T).expand(B, T)
    real = batch["attention_mask"].bool()

    hidden = batch["aux_hidden_states"] @ model.fc.weight.T
    keys, values = [], []  # per step: [B, Hkv, T, d]
    all_logits, losses, correct, valid, supervised = [], [], [], [], []
    for k in range(steps):
        ids = _shift(batch["input_ids"], k)
        probs = _shift(batch["target_probs"], k)
        pmask = _shift(batch["position_mask"], k).squeeze(-1).bool()
        lmask = _shift(batch["loss_mask"], k).bool()
        if seq_lens is not None:
            pmask = pmask & (remaining > k)
            lmask = lmask & (remaining > k)

        normed = _rms(hidden, layer.hidden_norm.weight, eps)
        residual = normed if cfg.norm_before_residual else hidden
        x = torch.cat([_rms(model.embed_tokens.weight[ids], layer.input_layernorm.weight, eps), normed], -1)
        q = (x @ attn.q_proj.weight.T).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        key = (x @ attn.k_proj.weight.T).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        val = (x @ attn.v_proj.weight.T).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        cos, sin = rotary(x, positions + k)
        q, key = apply_rotary_pos_emb(q, key, cos, sin)
        keys.append(key)
        values.append(val)

        out = torch.zeros_like(q)
        for b in range(B):
            for t in range(T):
                block = [s for s in range(t + 1) if doc[b, s] == doc[b, t] and (real[b, s] or s == t)]
                k_list = [keys[0][b, :, s] for s in block] + [keys[j][b, :, t] for j in range(1, k + 1)]
                v_list = [values[0][b, :, s] for s in block] + [values[j][b, :, t] for j in range(1, k + 1)]
                k_mat = torch.stack(k_list, 1).repeat_interleave(groups, 0)  # [Hq, n, d]
                v_mat = torch.stack(v_list, 1).repeat_interleave(groups, 0)
                scores = torch.einsum("hnd,hd->hn", k_mat, q[b, :, t]) / math.sqrt(cfg.head_dim)
                out[b, :, t] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v_mat)
        h = residual + out.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T
        post = _rms(h, layer.post_attention_layernorm.weight, eps)
        mlp = (F.silu(post @ layer.mlp.gate_proj.weight.T) * (post @ layer.mlp.up_proj.weight.T)) \
            @ layer.mlp.down_proj.weight.T
        hidden = h + mlp
        logits = _rms(hidden, model.norm.weight, eps) @ model.lm_head.weight.T

        ce = -(probs * logits.log_softmax(-1)).sum(-1)  # [B, T]
        losses.append((ce * pmask).sum() / max(int(pmask.sum()), 1))
        correct.append(int(((logits.argmax(-1) == probs.argmax(-1)) & pmask).sum()))
        valid.append(int(pmask.sum()))
        supervised.append(int(lmask.sum()))
        all_logits.append(logits)
    w = torch.tensor([weight ** k for k in range(steps)])
    total = (w * torch.stack(losses)).sum() / w.sum()
    return all_logits, torch.stack(losses), total, correct, valid, supervised


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def make_batch(kind: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    attention = torch.ones(B, T, dtype=torch.long)
    seq_lens = None
    if kind == "padding":
        attention[0, 9:] = 0  # right padding
        attention[1, :3] = 0  # left padding: real queries must not see these keys
    elif kind == "packed":
        seq_lens = torch.tensor([[5, 4, 3], [7, 3, 2]])
        attention[1, 10:] = 0  # row 1 ends with a padding "document"
    loss_mask = (torch.rand(B, T, generator=gen) > 0.2).long() * attention
    probs = torch.softmax(torch.randn(B, T, 64, generator=gen) * 2, -1)
    position_mask = (loss_mask.bool() & (torch.rand(B, T, generator=gen) > 0.1)).unsqueeze(-1)
    batch = dict(
        input_ids=torch.randint(0, 128, (B, T), generator=gen),
        attention_mask=attention,
        loss_mask=loss_mask,
        aux_hidden_states=torch.randn(B, T, 96, generator=gen),
        target_probs=probs,
        position_mask=position_mask,
    )
    if seq_lens is not None:
        batch["seq_lens"] = seq_lens
    return batch


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("kind", ["plain", "padding", "packed"])
def test_ttt_matches_slow_reference(draft_config, kind, steps):
    model = random_draft(draft_config)
    batch = make_batch(kind)
    out = ttt_forward(model, **batch, ttt_steps=steps, step_weight=0.8, return_logits=True)
    with torch.no_grad():
        ref_logits, ref_losses, ref_total, ref_correct, ref_valid, ref_supervised = reference_ttt(model, batch, steps, 0.8)
    assert len(out.logits) == steps
    for k in range(steps):
        assert torch.allclose(out.logits[k], ref_logits[k], atol=1e-5, rtol=1e-5), f"step {k} logits"
    assert torch.allclose(out.losses, ref_losses, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.loss, ref_total, atol=1e-5, rtol=1e-5)
    assert out.correct.tolist() == ref_correct
    assert out.valid.tolist() == ref_valid
    assert out.supervised.tolist() == ref_supervised
    assert torch.allclose(out.accuracies, torch.tensor(ref_correct) / torch.tensor(ref_supervised).clamp(min=1))
    assert torch.allclose(out.loss_sums / out.valid.clamp(min=1), out.losses, atol=1e-6)


def test_ttt_matches_reference_exactly_in_float64(draft_config):
    """Same comparison without fp32 rounding: any semantic difference would show far above 1e-10."""
    model = random_draft(draft_config).double()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in make_batch("packed", seed=9).items()}
    out = ttt_forward(model, **batch, ttt_steps=7, return_logits=True)
    with torch.no_grad():
        ref_logits, ref_losses, _, _, _, _ = reference_ttt(model, batch, 7, 0.8)
    for k in range(7):
        assert torch.allclose(out.logits[k], ref_logits[k], atol=1e-10, rtol=0), f"step {k}"
    assert torch.allclose(out.losses.double(), ref_losses, atol=1e-10, rtol=0)


def test_ttt_matches_reference_with_norm_before_residual(draft_config):
    cfg = Eagle3DraftConfig.from_dict({**draft_config.to_dict(), "norm_before_residual": True})
    model = random_draft(cfg)
    batch = make_batch("packed", seed=5)
    out = ttt_forward(model, **batch, ttt_steps=3, return_logits=True)
    with torch.no_grad():
        ref_logits, _, ref_total, _, _, _ = reference_ttt(model, batch, 3, 0.8)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out.logits, ref_logits))
    assert torch.allclose(out.loss, ref_total, atol=1e-5, rtol=1e-5)


def test_packed_supervision_respects_doc_remaining(draft_config):
    model = random_draft(draft_config)
    batch = make_batch("packed")
    batch["position_mask"] = batch["attention_mask"].bool().unsqueeze(-1)  # every real slot supervised
    batch["loss_mask"] = batch["attention_mask"]
    derived = ttt_forward(model, **batch, ttt_steps=4)
    # docs [5,4,3] and [7,3] (+2 padding): step k keeps slots with k < remaining, i.e. len-1-k per doc
    expected = [sum(max(n - 1 - k, 0) for n in (5, 4, 3)) + sum(max(n - 1 - k, 0) for n in (7, 3))
                for k in range(4)]
    assert derived.valid.tolist() == expected
    # passing doc_remaining explicitly is the same as deriving it from seq_lens
    remaining = _layout(batch["seq_lens"], batch["attention_mask"])[2]
    explicit = ttt_forward(model, **batch, doc_remaining=remaining, ttt_steps=4)
    assert torch.equal(explicit.loss, derived.loss)


def test_accuracy_counts_targets_outside_the_draft_vocabulary_as_misses(draft_config):
    """A draft right wherever it can be: a third of the supervised targets lie outside its vocabulary.

    Its honest step-0 accuracy is 2/3 (it cannot propose those tokens, so serving rejects them);
    the accuracy over in-vocabulary positions alone reads 1.0."""
    model = random_draft(draft_config)
    batch = make_batch("plain", seed=3)
    for key in ("target_probs", "position_mask"):
        batch.pop(key)
    batch["loss_mask"] = torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        first = ttt_forward(model, **batch, target_probs=torch.full((B, T, 64), 1 / 64), ttt_steps=1,
                            return_logits=True)
    drafted = model.selected_token_ids[first.logits[0].argmax(-1)]  # [B, T] the draft's tokens
    outside = (~model.t2d).nonzero().flatten()
    logits = torch.zeros(B, T, 128)
    logits.scatter_(-1, drafted.unsqueeze(-1), 10.0)  # the target agrees with the draft ...
    unreachable = torch.arange(B * T).view(B, T) % 3 == 0  # ... except on every third slot,
    logits[unreachable, outside[0]] = 20.0  # where its argmax lies outside the draft vocabulary
    out = ttt_forward(model, **batch, logits=logits, ttt_steps=1)
    assert out.supervised.tolist() == [B * T] and out.valid.tolist() == [B * T - 8]
    assert out.correct.tolist() == [B * T - 8]
    assert out.accuracies.tolist() == pytest.approx([2 / 3])
    assert out.acc_in_draft_vocab.tolist() == [1.0]
    assert simulated_acceptance_length(out.accuracies) == pytest.approx(1 + 2 / 3)


def test_gradients_reach_trainable_parts_but_not_frozen_embeddings(draft_config):
    model = random_draft(draft_config)
    out = ttt_forward(model, **make_batch("padding"), ttt_steps=3)
    out.loss.backward()
    assert model.embed_tokens.weight.grad is None
    for name, param in model.named_parameters():
        if name != "embed_tokens.weight":
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_online_logits_equal_precomputed_distribution(draft_config):
    model_a = random_draft(draft_config)
    gen = torch.Generator().manual_seed(7)
    selected = torch.randperm(128, generator=gen)[:64]
    model_a.set_draft_vocab(DraftVocab.from_selected(selected, 128))
    model_b = copy.deepcopy(model_a)
    batch = make_batch("padding", seed=2)
    batch.pop("target_probs")
    batch.pop("position_mask")
    logits = torch.randn(B, T, 128, generator=gen) * 3

    online = ttt_forward(model_a, **batch, logits=logits, ttt_steps=3)
    probs, pmask = compute_target_distribution(logits, batch["loss_mask"], model_b.selected_token_ids, model_b.t2d)
    assert not pmask.all()  # some target argmaxes fall outside the draft vocabulary
    cached = ttt_forward(model_b, **batch, target_probs=probs, position_mask=pmask, ttt_steps=3)
    assert torch.equal(online.loss, cached.loss)
    assert online.valid.tolist() == cached.valid.tolist()
    online.loss.backward()
    cached.loss.backward()
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        if pa.requires_grad:
            assert torch.equal(pa.grad, pb.grad), name


def test_input_validation_names_the_problem(draft_config):
    model = random_draft(draft_config)
    batch = make_batch("plain")
    with pytest.raises(ValueError, match="exactly one of target_probs"):
        ttt_forward(model, **batch, logits=torch.zeros(B, T, 128))
    bad = dict(batch, aux_hidden_states=torch.zeros(B, T, 64))
    with pytest.raises(ValueError, match=r"aux_hidden_states has shape \(2, 12, 64\), expected \(2, 12, 96\)"):
        ttt_forward(model, **bad)
    with pytest.raises(ValueError, match="ttt_steps must be >= 1"):
        ttt_forward(model, **batch, ttt_steps=0)


def test_simulated_acceptance_length():
    assert simulated_acceptance_length([0.8, 0.5, 0.5]) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    assert simulated_acceptance_length(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert simulated_acceptance_length([]) == 1.0
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        simulated_acceptance_length([1.5])


# ---------------------------------------------------------------------------------------------
# Fused (SDPA) attention against the eager reference: outputs and every gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_chunk", [None, 5])  # one SDPA call per step; chunks of 5 (12 = 5 + 5 + 2)
@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("kind", ["plain", "padding", "packed"])
def test_sdpa_attention_matches_eager_outputs_and_gradients(draft_config, kind, steps, query_chunk):
    fused = random_draft(draft_config)
    eager = copy.deepcopy(fused)
    eager.attn_implementation = "eager"
    assert fused.attn_implementation == "sdpa"  # the default
    fused.midlayer.self_attn.query_chunk = query_chunk
    batch = make_batch(kind, seed=steps)
    a = ttt_forward(fused, **batch, ttt_steps=steps, return_logits=True)
    b = ttt_forward(eager, **batch, ttt_steps=steps, return_logits=True)
    for k in range(steps):
        torch.testing.assert_close(a.logits[k], b.logits[k], rtol=1e-5, atol=1e-5, msg=f"step {k} logits")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    assert a.correct.tolist() == b.correct.tolist()
    a.loss.backward()
    b.loss.backward()
    grads = 0
    for (name, pa), (_, pb) in zip(fused.named_parameters(), eager.named_parameters()):
        if not pa.requires_grad:
            continue
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
        grads += 1
    assert grads == 13  # every trainable parameter (all but the frozen embeddings)


def test_attention_implementation_is_validated(draft_config):
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \('sdpa', 'eager'\), got 'flash'"):
        Eagle3DraftModel(draft_config, attn_implementation="flash")
