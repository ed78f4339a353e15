"""Draft model: config derivation, exact parameter layout, RoPE, masks and warm starts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from draftcache.data.vocab import DraftVocab
from draftcache.trainer.eagle3.model import (
    Eagle3DraftConfig,
    Eagle3DraftModel,
    build_attention_mask,
)
from draftcache.trainer.layers import document_layout, rope_inverse_frequencies

from .helpers import LLAMA3_ROPE, random_draft, tiny_target_config

EXPECTED_PARAMS = {
    "embed_tokens.weight": (128, 32),
    "fc.weight": (32, 96),
    "midlayer.hidden_norm.weight": (32,),
    "midlayer.input_layernorm.weight": (32,),
    "midlayer.self_attn.q_proj.weight": (32, 64),
    "midlayer.self_attn.k_proj.weight": (16, 64),
    "midlayer.self_attn.v_proj.weight": (16, 64),
    "midlayer.self_attn.o_proj.weight": (32, 32),
    "midlayer.post_attention_layernorm.weight": (32,),
    "midlayer.mlp.gate_proj.weight": (64, 32),
    "midlayer.mlp.up_proj.weight": (64, 32),
    "midlayer.mlp.down_proj.weight": (32, 64),
    "norm.weight": (32,),
    "lm_head.weight": (64, 32),
    "d2t": (64,),
    "t2d": (128,),
}


def test_from_target_config_copies_long_context_and_llama3_rope(target_config):
    cfg = Eagle3DraftConfig.from_target_config(target_config, draft_vocab_size=64, aux_layer_ids=[1, 3, 4])
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3_ROPE  # transformers 5 keeps theta inside rope_parameters; we split it out
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 64, 4, 2)
    assert (cfg.head_dim, cfg.rms_norm_eps, cfg.hidden_act) == (8, 1e-6, "silu")
    assert (cfg.target_hidden_size, cfg.target_vocab_size, cfg.draft_vocab_size) == (32, 128, 64)
    assert cfg.aux_layer_ids == [1, 3, 4] and cfg.num_aux_layers == 3
    # the to_dict() form (what caches store) gives the same config
    assert Eagle3DraftConfig.from_target_config(target_config.to_dict(), draft_vocab_size=64,
                                                aux_layer_ids=[1, 3, 4]) == cfg
    assert Eagle3DraftConfig.from_dict(cfg.to_dict()) == cfg


def test_from_target_config_reads_legacy_rope_fields_and_text_config():
    legacy = {**tiny_target_config().to_dict()}
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=65536)
    cfg = Eagle3DraftConfig.from_target_config(legacy, draft_vocab_size=16, aux_layer_ids=[0, 2, 5])
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings) == (
        250000.0, {"type": "linear", "factor": 2.0}, 65536)

    composite = LlavaConfig(text_config=tiny_target_config(hidden_size=48, num_attention_heads=6,
                                                           num_key_value_heads=3).to_dict())
    cfg = Eagle3DraftConfig.from_target_config(composite, draft_vocab_size=16, aux_layer_ids=[1, 3, 4])
    assert (cfg.hidden_size, cfg.target_hidden_size, cfg.max_position_embeddings) == (48, 48, 131072)


def test_from_target_config_refuses_missing_context_length_and_bad_ids(target_config):
    no_context = target_config.to_dict()
    no_context.pop("max_position_embeddings")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Eagle3DraftConfig.from_target_config(no_context, draft_vocab_size=64, aux_layer_ids=[1, 3, 4])
    with pytest.raises(ValueError, match=r"out of range for a target with 8 decoder layers"):
        Eagle3DraftConfig.from_target_config(target_config, draft_vocab_size=64, aux_layer_ids=[1, 3, 8])


def test_config_validation_collects_every_problem(draft_config):
    fields = draft_config.to_dict()
    fields.update(num_key_value_heads=3, draft_vocab_size=500, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError) as err:
        Eagle3DraftConfig(**fields)
    text = str(err.value)
    assert "num_attention_heads (4) must be a multiple of num_key_value_heads (3)" in text
    assert "draft_vocab_size (500) exceeds target_vocab_size (128)" in text
    assert "rope_scaling type 'yarn' is not supported" in text
    with pytest.raises(ValueError, match="unknown Eagle3DraftConfig keys \\['bogus'\\]"):
        Eagle3DraftConfig.from_dict({**draft_config.to_dict(), "bogus": 1})


def test_state_dict_names_and_shapes_are_the_checkpoint_layout(draft_config):
    model = Eagle3DraftModel(draft_config)
    state = model.state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == EXPECTED_PARAMS
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert not model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "embed_tokens.weight")
    assert Eagle3DraftModel(draft_config, freeze_embeddings=False).embed_tokens.weight.requires_grad


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, dict(LLAMA3_ROPE,
                                     original_max_position_embeddings=64)])
def test_rope_frequencies_match_transformers(scaling):
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    assert torch.allclose(rope_inverse_frequencies(64, 500000.0, scaling), expected.float(), rtol=1e-6, atol=0)


def test_rope_rejects_incomplete_scaling():
    with pytest.raises(ValueError, match=r"lacks \['low_freq_factor'"):
        rope_inverse_frequencies(8, 10000.0, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192})


def test_document_layout_and_block_causal_mask():
    seq_lens = torch.tensor([[3, 2, 1], [6, 0, 0]])
    doc_ids, positions, remaining = document_layout(seq_lens, 6)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert remaining.tolist() == [[2, 1, 0, 1, 0, 0], [5, 4, 3, 2, 1, 0]]
    with pytest.raises(ValueError, match="sum to the sequence length 6"):
        document_layout(torch.tensor([[3, 2]]), 6)

    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    mask = build_attention_mask(attention, seq_len=6, batch_size=2, seq_lens=seq_lens)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]  # own document, causal
    # row 1: key 0 is padding, never attended by real queries; a padded query sees only itself
    assert mask[1, 0, 3].tolist() == [False, True, True, True, False, False]
    assert mask[1, 0, 5].tolist() == [False, True, True, True, False, True]


def test_vocab_embeddings_and_lm_head_warm_start(draft_config):
    torch.manual_seed(0)
    model = Eagle3DraftModel(draft_config)
    vocab = DraftVocab.from_selected(torch.arange(0, 128, 2), 128)
    model.set_draft_vocab(vocab)
    assert torch.equal(model.selected_token_ids, vocab.selected_token_ids)
    assert torch.equal(model.t2d, vocab.t2d)

    target_embed = torch.randn(128, 32)
    model.load_target_embeddings(target_embed)
    assert torch.equal(model.embed_tokens.weight, target_embed)
    target_head = torch.randn(128, 32)
    model.init_lm_head_from_target(target_head)
    assert torch.equal(model.lm_head.weight, target_head[0::2])

    with pytest.raises(ValueError, match=r"target embeddings have shape \(128, 16\)"):
        model.load_target_embeddings(torch.randn(128, 16))
    with pytest.raises(ValueError, match="draft vocabulary is 32 of 128 tokens"):
        model.set_draft_vocab(DraftVocab.from_selected(torch.arange(32), 128))


def test_forward_equals_first_ttt_step_and_norm_before_residual_changes_output(draft_config):
    from draftcache.trainer.eagle3.ttt import ttt_forward

    model = random_draft(draft_config)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 9))
    aux = torch.randn(2, 9, 96)
    ones = torch.ones(2, 9, dtype=torch.long)
    out = model(ids, aux, attention_mask=ones)
    assert out.logits.shape == (2, 9, 64) and out.hidden_states.shape == (2, 9, 32)
    ttt = ttt_forward(model, input_ids=ids, attention_mask=ones, loss_mask=ones, aux_hidden_states=aux,
                      target_probs=torch.full((2, 9, 64), 1 / 64), ttt_steps=1, return_logits=True)
    assert torch.equal(ttt.logits[0], out.logits)

    other = Eagle3DraftModel(Eagle3DraftConfig.from_dict({**draft_config.to_dict(), "norm_before_residual": True}))
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(ids, aux).logits, out.logits)


def test_decode_cache_path_is_the_same_with_fused_and_eager_attention(draft_config):
    """Chain drafting at inference (Eagle3DecodeCache: context entries, then one entry per drafted
    token, each causal over everything before it) gives the same outputs with both implementations."""
    import copy

    from draftcache.trainer.eagle3.model import Eagle3DecodeCache

    fused = random_draft(draft_config).eval()
    eager = copy.deepcopy(fused)
    eager.attn_implementation = "eager"
    torch.manual_seed(4)
    ids, aux = torch.randint(0, 128, (1, 7)), torch.randn(1, 7, 96)
    outs = []
    for model in (fused, eager):
        cache = Eagle3DecodeCache()
        with torch.no_grad():
            step = model.decode(ids, model.fc(aux), cache)
            logits = [step.logits]
            for _ in range(3):
                token = model.selected_token_ids[step.logits[0, -1].argmax()].view(1, 1)
                step = model.decode(token, step.hidden_states[:, -1:], cache)
                logits.append(step.logits)
        assert cache.length == 10
        outs.append(logits)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
