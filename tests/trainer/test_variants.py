"""EAGLE-3.1 flags, multi-layer drafts and P-EAGLE (issue 18) against a reference in plain torch ops.

The reference below restates vLLM 0.32's ``llama_eagle3.py`` (``combine_hidden_states``, the
decoder layers, the final norm and what it returns for the next step) and the P-EAGLE slot layout
of ``v1/spec_decode`` (bonus slot, then ``K - 1`` slots reading ``mask_token_id`` and
``combine_hidden_states(mask_hidden)``, causal) with explicit matmuls, softmax and RoPE, over one
causal sequence of draft entries. The draft's own decoding (its KV caches), its training-time
test and its exports are checked against it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from draftcache.trainer.eagle3.export import export_draft, load_exported_draft, read_export_config
from draftcache.trainer.eagle3.model import Eagle3DecodeCache, Eagle3DraftConfig, Eagle3DraftModel
from draftcache.trainer.mask_token import choose_mask_token
from draftcache.trainer.eagle3.ttt import ttt_forward
from prewarmed import SUBPROCESS_ENV, run_python

from .helpers import random_draft, tiny_target_config
from .pipeline_fixtures import build_tiny_target_dir, precompute_cache, write_chats

VARIANTS = {
    "fc_norm": dict(fc_norm=True),
    "norm_before_fc": dict(norm_before_fc=True),
    "norm_output": dict(norm_output=True),
    "attention_bias": dict(attention_bias=True),
    "two_layers": dict(num_hidden_layers=2),
    "eagle31_three_layers": dict(fc_norm=True, norm_output=True, num_hidden_layers=3, attention_bias=True),
    "peagle": dict(parallel_drafting=True, mask_token_id=7),
    "peagle_eagle31_two_layers": dict(parallel_drafting=True, mask_token_id=7, fc_norm=True, norm_output=True,
                                      num_hidden_layers=2),
}


def _config(**variant) -> Eagle3DraftConfig:
    target = tiny_target_config(rope_scaling=None)  # plain RoPE: the reference restates it in a few lines
    return Eagle3DraftConfig.from_target_config(target, draft_vocab_size=64, aux_layer_ids=[1, 3, 4], **variant)


# ---------------------------------------------------------------------------------------------
# The reference (plain torch ops, one sequence of entries, no cache)
# ---------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x, positions, theta):
    """``x [T, heads, d]`` rotated by ``positions [T]`` (rotate-half layout, no scaling)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]  # [T, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].float(), torch.cat([ang.sin()] * 2, -1)[:, None].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _linear(sd, name, x, bias):
    out = x @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if bias else out


def _attention(sd, prefix, x, cfg):
    """Causal GQA attention of ``x [T, width]``; q/k/v/o biases under ``attention_bias``."""
    T, d, hq, hk = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    pos = torch.arange(T)
    q = _rope(_linear(sd, f"{prefix}q_proj", x, cfg.attention_bias).view(T, hq, d), pos, cfg.rope_theta)
    k = _rope(_linear(sd, f"{prefix}k_proj", x, cfg.attention_bias).view(T, hk, d), pos, cfg.rope_theta)
    v = _linear(sd, f"{prefix}v_proj", x, cfg.attention_bias).view(T, hk, d)
    k, v = k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, hq * d)
    return _linear(sd, f"{prefix}o_proj", out, cfg.attention_bias)


def _mlp(sd, prefix, x):
    return _linear(sd, f"{prefix}down_proj", torch.nn.functional.silu(_linear(sd, f"{prefix}gate_proj", x, False))
                   * _linear(sd, f"{prefix}up_proj", x, False), False)


def ref_combine(sd, cfg, aux):
    """vLLM's ``combine_hidden_states``: input_norm (norm_before_fc), fc_norm per chunk, fc."""
    if cfg.norm_before_fc:
        aux = _rms(aux, sd["input_norm.weight"], cfg.rms_norm_eps)
    if cfg.fc_norm:
        chunks = aux.chunk(cfg.num_aux_layers, dim=-1)
        aux = torch.cat([_rms(c, sd[f"fc_norm.{i}.weight"], cfg.rms_norm_eps) for i, c in enumerate(chunks)], -1)
    return aux @ sd["fc.weight"].T


def ref_draft(sd, cfg, tokens, hidden):
    """One causal sequence of entries (``tokens [T]``, ``hidden [T, H]``) -> ``(logits [T, Vd],
    the hidden fed to the next step [T, H])``."""
    eps = cfg.rms_norm_eps
    embeds = sd["embed_tokens.weight"][tokens]
    normed = _rms(hidden, sd["midlayer.hidden_norm.weight"], eps)
    residual = normed if cfg.norm_before_residual else hidden
    x = torch.cat([_rms(embeds, sd["midlayer.input_layernorm.weight"], eps), normed], -1)  # [T, 2H]
    h = residual + _attention(sd, "midlayer.self_attn.", x, cfg)
    h = h + _mlp(sd, "midlayer.mlp.", _rms(h, sd["midlayer.post_attention_layernorm.weight"], eps))
    for i in range(1, cfg.num_hidden_layers):  # standard pre-norm layers reading H
        p = f"layers.{i}."
        h = h + _attention(sd, p + "self_attn.", _rms(h, sd[p + "input_layernorm.weight"], eps), cfg)
        h = h + _mlp(sd, p + "mlp.", _rms(h, sd[p + "post_attention_layernorm.weight"], eps))
    out = _rms(h, sd["norm.weight"], eps)
    return out @ sd["lm_head.weight"].T, (out if cfg.norm_output else h)


def _inputs(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.target_vocab_size, (n + 1,), generator=g)
    aux = torch.randn(n, cfg.num_aux_layers * cfg.target_hidden_size, generator=g) * 3
    return tokens, aux


def _model_round(model: Eagle3DraftModel, tokens, aux, K=3):
    """Our decoding of one round: ``n`` context entries, then (chain) one more entry reading the
    last context entry's output, or (P-EAGLE) ``K - 1`` mask slots in the same forward."""
    n = aux.shape[0]
    cache = Eagle3DecodeCache()
    hidden = model.combine_hidden_states(aux[None])
    if model.config.parallel_drafting:
        ids = torch.cat([tokens[:n], torch.full((K - 1,), model.config.mask_token_id)])[None]
        hidden = torch.cat([hidden, model.mask_hidden_state()[None].expand(1, K - 1, -1)], dim=1)
        return model.decode(ids, hidden, cache).logits[0]
    first = model.decode(tokens[None, :n], hidden, cache)
    second = model.decode(tokens[None, n:], first.hidden_states[:, -1:], cache)
    return torch.cat([first.logits[0], second.logits[0]])


def _reference_round(sd, cfg, tokens, aux, K=3):
    n = aux.shape[0]
    hidden = ref_combine(sd, cfg, aux)
    if cfg.parallel_drafting:
        ids = torch.cat([tokens[:n], torch.full((K - 1,), cfg.mask_token_id)])
        mask = ref_combine(sd, cfg, sd["mask_hidden"]).expand(K - 1, -1)
        return ref_draft(sd, cfg, ids, torch.cat([hidden, mask]))[0]
    _, feedback = ref_draft(sd, cfg, tokens[:n], hidden)
    return ref_draft(sd, cfg, tokens, torch.cat([hidden, feedback[-1:]]))[0]


# ---------------------------------------------------------------------------------------------
# Forward = reference; each flag changes it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_equals_the_plain_torch_reference_and_each_flag_changes_it(name):
    cfg = _config(**VARIANTS[name])
    model = random_draft(cfg).eval()
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    tokens, aux = _inputs(cfg, 6)
    with torch.no_grad():
        ours = _model_round(model, tokens, aux)
    torch.testing.assert_close(ours, _reference_round(sd, cfg, tokens, aux), rtol=1e-4, atol=1e-4)
    # each flag of the variant, turned off alone (same weights), changes the outputs (a P-EAGLE
    # round feeds no output back, so norm_output changes nothing there: rightly, as in vLLM)
    for flag, value in VARIANTS[name].items():
        if flag in ("mask_token_id", "parallel_drafting") or (flag == "norm_output" and cfg.parallel_drafting):
            continue
        off = dataclasses.replace(cfg, **{flag: 1 if flag == "num_hidden_layers" else False})
        assert not torch.allclose(_reference_round(sd, off, tokens, aux), ours, atol=1e-3), f"{flag} changes nothing"


def test_peagle_mask_slots_read_the_mask_token_and_mask_hidden():
    """The same draft with another mask token or another mask_hidden drafts other logits at the
    mask slots only (the context entries come first and attend causally)."""
    cfg = _config(**VARIANTS["peagle"])
    model = random_draft(cfg).eval()
    tokens, aux = _inputs(cfg, 5)
    with torch.no_grad():
        base = _model_round(model, tokens, aux)
        model.mask_hidden.mul_(-1.0)
        flipped = _model_round(model, tokens, aux)
    assert torch.equal(base[:5], flipped[:5]) and not torch.allclose(base[5:], flipped[5:])


# ---------------------------------------------------------------------------------------------
# Training-time test = inference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["norm_output", "eagle31_three_layers", "peagle", "peagle_eagle31_two_layers"])
def test_ttt_step_k_equals_what_decoding_computes_at_that_slot(name):
    """TTT step ``k`` at slot ``t`` is what decoding computes ``k`` entries after context ``0..t``:
    the chain feeds back ``hidden_states`` (``norm(out)`` under ``norm_output``) with the next true
    token; P-EAGLE appends ``k`` mask slots (token ``mask_token_id``, hidden from ``mask_hidden``)."""
    cfg = _config(**VARIANTS[name])
    model = random_draft(cfg).eval()
    T, steps = 8, 3
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.target_vocab_size, (1, T), generator=g)
    aux = torch.randn(1, T, cfg.num_aux_layers * cfg.target_hidden_size, generator=g)
    ones = torch.ones(1, T, dtype=torch.long)
    with torch.no_grad():
        out = ttt_forward(model, input_ids=ids, attention_mask=ones, loss_mask=ones, aux_hidden_states=aux,
                          target_probs=torch.softmax(torch.randn(1, T, 64, generator=g), -1), ttt_steps=steps,
                          return_logits=True)
        for t in (0, 3, 4):
            cache = Eagle3DecodeCache()
            step = model.decode(ids[:, : t + 1], model.combine_hidden_states(aux[:, : t + 1]), cache)
            for k in range(1, steps):
                if cfg.parallel_drafting:
                    step = model.decode(torch.full((1, 1), cfg.mask_token_id), model.mask_hidden_state()[None], cache)
                else:
                    step = model.decode(ids[:, t + k: t + k + 1], step.hidden_states[:, -1:], cache)
                torch.testing.assert_close(out.logits[k][0, t], step.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_peagle_loss_scores_depth_k_against_target_probs_at_anchor_plus_k():
    """Depth ``k``'s loss is the soft cross-entropy of its logits against ``target_probs[t + k]``."""
    cfg = _config(**VARIANTS["peagle"])
    model = random_draft(cfg)
    T = 7
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.target_vocab_size, (1, T), generator=g)
    aux = torch.randn(1, T, cfg.num_aux_layers * cfg.target_hidden_size, generator=g)
    probs = torch.softmax(torch.randn(1, T, 64, generator=g), -1)
    ones = torch.ones(1, T, dtype=torch.long)
    out = ttt_forward(model, input_ids=ids, attention_mask=ones, loss_mask=ones, aux_hidden_states=aux,
                      target_probs=probs, ttt_steps=3, return_logits=True)
    for k in range(3):
        expected = -(probs[0, k:] * torch.log_softmax(out.logits[k][0, : T - k], -1)).sum(-1).mean()
        torch.testing.assert_close(out.losses[k], expected)
    out.loss.backward()
    assert model.mask_hidden.grad is not None and model.mask_hidden.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Export -> our loader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
@pytest.mark.parametrize("name", ["eagle31_three_layers", "norm_before_fc", "peagle_eagle31_two_layers"])
def test_export_writes_the_real_flags_and_tensors_and_loads_back(tmp_path, name, fmt):
    cfg = _config(**VARIANTS[name])
    model = random_draft(cfg).eval()
    target = tiny_target_config(rope_scaling=None)
    export_draft(model, tmp_path, target_config=target, format=fmt, include_embeddings=True)
    data = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for flag in ("fc_norm", "norm_output", "norm_before_fc"):
        assert data[flag] == getattr(cfg, flag)
    layer_fields = data["transformer_layer_config"] if fmt == "speculators" else data
    assert layer_fields["num_hidden_layers"] == cfg.num_hidden_layers
    assert layer_fields["attention_bias"] == cfg.attention_bias
    assert ("input_norm.weight" in tensors) == cfg.norm_before_fc
    assert sorted(n for n in tensors if n.startswith("fc_norm.")) == (
        [f"fc_norm.{i}.weight" for i in range(3)] if cfg.fc_norm else [])
    assert {n.split(".")[1] for n in tensors if n.startswith("layers.") and n.split(".")[1] != "0"} == {
        str(i) for i in range(1, cfg.num_hidden_layers)}
    if cfg.attention_bias:
        assert "layers.1.self_attn.q_proj.bias" in tensors and "layers.1.self_attn.o_proj.bias" in tensors
    if cfg.parallel_drafting:
        assert tensors["mask_hidden"].shape == (1, 3 * cfg.target_hidden_size)
        assert data["mask_token_id"] == cfg.mask_token_id
        if fmt == "speculators":  # vLLM maps this type to eagle3 + parallel_drafting, mask_token_id to pard_token
            assert data["speculators_model_type"] == "peagle"
            assert data["transformer_layer_config"]["fc_norm"] == cfg.fc_norm  # where the peagle conversion reads it
    if fmt == "eagle3":  # what a transformers-based engine sees
        parsed = AutoConfig.from_pretrained(tmp_path)
        assert (parsed.fc_norm, parsed.norm_output, parsed.num_hidden_layers) == (
            cfg.fc_norm, cfg.norm_output, cfg.num_hidden_layers)
    loaded = load_exported_draft(tmp_path).eval()
    assert loaded.config == cfg and read_export_config(tmp_path) == cfg
    tokens, aux = _inputs(cfg, 6)
    with torch.no_grad():
        assert torch.equal(_model_round(loaded, tokens, aux), _model_round(model, tokens, aux))


def test_peagle_mask_token_follows_the_shared_rule_never_a_zero_row():
    """P-EAGLE takes its mask token by DFlash's rule (trainer/mask_token.py, tested there in full):
    an unused special with a non-zero row first, never the zero pad row, a zero --mask-token-id refused."""
    emb = torch.randn(10, 4)
    emb[9] = 0.0  # a padding_idx row
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[0, 1, 8]] = 5  # supervised tokens of the data
    assert choose_mask_token(embeddings=emb, supervised_counts=counts, rms_norm_eps=1e-6,
                             special_ids=[9, 7]).token_id == 7
    assert choose_mask_token(embeddings=emb, supervised_counts=counts, rms_norm_eps=1e-6).token_id == 2
    with pytest.raises(ValueError, match="--mask-token-id"):
        choose_mask_token(embeddings=emb, supervised_counts=counts, rms_norm_eps=1e-6, given=9)
    with pytest.raises(ValueError, match="parallel_drafting needs mask_token_id"):
        _config(parallel_drafting=True)


# ---------------------------------------------------------------------------------------------
# P-EAGLE decoding is lossless; the CLI trains and evaluates it
# ---------------------------------------------------------------------------------------------


def test_peagle_eval_on_the_embedded_default_target_is_lossless_with_one_draft_forward_per_round(tmp_path):
    from draftcache.defaults import default_target_path
    from draftcache.targets.layer_ids import default_eagle3_aux_layer_ids
    from draftcache.trainer.eagle3.export import EMBEDDED_TARGET_ID
    from draftcache.trainer.evaluate import evaluate_draft

    target = AutoConfig.from_pretrained(default_target_path())
    forwards = {}
    for name, variant in {"peagle": dict(parallel_drafting=True, mask_token_id=5), "chain": {}}.items():
        cfg = Eagle3DraftConfig.from_target_config(target, draft_vocab_size=target.vocab_size, fc_norm=True,
                                                   aux_layer_ids=default_eagle3_aux_layer_ids(target.num_hidden_layers),
                                                   **variant)
        export_draft(random_draft(cfg), tmp_path / name, target_config=target, target_model_id=EMBEDDED_TARGET_ID)
        report = evaluate_draft(draft_dir=str(tmp_path / name), num_prompts=3, draft_tokens=3, max_new_tokens=24,
                                device="cpu")
        assert report.mismatches == 0
        forwards[name] = report.stats.draft_forwards / report.stats.num_drafts
    assert forwards == {"peagle": 1.0, "chain": 3.0}


def test_cli_trains_peagle_from_a_cache_and_online_and_evaluates_it(tmp_path):
    from typer.testing import CliRunner

    from draftcache.cli import app

    target = build_tiny_target_dir(tmp_path / "target")
    data = write_chats(tmp_path / "chats.jsonl", 6)
    cache = precompute_cache(target, data, tmp_path / "cache")
    common = ["--method", "peagle", "--max-steps", "2", "--ttt-steps", "3", "--batch-tokens", "0", "--batch-size",
              "3", "--val-fraction", "0", "--device", "cpu", "--quiet"]
    r = run_python(["-m", "draftcache.cli", "train", "--cached-target-path", str(cache),
                    "--output-dir", str(tmp_path / "cached"), *common],
                   env=SUBPROCESS_ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--target-model", str(target), "--input-data", str(data), "--seq-length", "128",
                            "--output-dir", str(tmp_path / "online"), *common, "--mask-token-id", "3"])
    assert r.exit_code == 0, r.output
    cached_cfg = read_export_config(tmp_path / "cached" / "export")
    assert cached_cfg.parallel_drafting and read_export_config(tmp_path / "online" / "export").mask_token_id == 3
    emb = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    assert emb[cached_cfg.mask_token_id].abs().sum() > 0  # the default mask token has a real embedding row
    r = runner.invoke(app, ["eval", "--draft", str(tmp_path / "cached" / "export"), "--target-model", str(target),
                            "--input-data", str(data), "--num-prompts", "2", "--draft-tokens", "3",
                            "--max-new-tokens", "12", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "lossless           yes" in r.output
    assert re.search(r"drafter forwards   1\.00 per verify round", r.output), r.output
    # the pad row (HF keeps padding_idx at zero) is refused as a mask token, naming the flag, nothing written
    pad = json.loads((target / "config.json").read_text())["pad_token_id"]
    assert emb[pad].abs().sum() == 0
    r = runner.invoke(app, ["train", "--cached-target-path", str(cache), "--output-dir", str(tmp_path / "bad"),
                            *common, "--mask-token-id", str(pad)])
    assert r.exit_code == 1 and "--mask-token-id" in r.output and not (tmp_path / "bad").exists()
