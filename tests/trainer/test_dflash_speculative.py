"""DFlash end to end on a tiny real HF target: train briefly, export, reload, decode losslessly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftcache.defaults import default_target_path
from draftcache.targets import HFDFlashTargetModel
from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.export import export_dflash_draft, load_exported_dflash_draft
from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors
from draftcache.trainer.dflash.model import DFlashDraftModel
from draftcache.trainer.dflash.speculative import dflash_speculative_generate
from draftcache.trainer.speculative import SpecDecodeStats, greedy_generate
from prewarmed import SUBPROCESS_ENV, run_python

BLOCK = 4
LAYERS = [1, 4]
MASK = 0  # the target's pad token: never an input, so its embedding is free to mark masked slots


@pytest.fixture(scope="module")
def target():
    """The embedded default target (a small trained Llama, 8 layers, vocab 1024)."""
    return HFDFlashTargetModel(AutoModelForCausalLM.from_pretrained(default_target_path()).eval(), LAYERS)


def _prompts(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (6,), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(target):
    """A draft trained for a few hundred steps on the target's own greedy continuations."""
    config = DFlashDraftConfig.from_target_config(target.model.config, target_layer_ids=LAYERS,
                                                  mask_token_id=MASK, num_hidden_layers=1, block_size=BLOCK)
    torch.manual_seed(1)
    draft = DFlashDraftModel.from_target(config, target.model)
    rows = []
    for prompt in _prompts(16, seed=5):
        rows.append(torch.cat([prompt, torch.tensor(greedy_generate(target.model, prompt, 34))]))
    ids = torch.stack(rows)  # [16, 40]
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 6:] = 1
    fwd = target.forward_capture(ids)
    feats, argmax = fwd.aux_hidden_states, fwd.logits.argmax(-1)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(150):
        anchors, valid = sample_anchors(loss_mask, num_anchors=16, generator=gen)
        out = dflash_loss(draft, target_hidden=feats, input_ids=ids, target_argmax=argmax, loss_mask=loss_mask,
                          anchor_positions=anchors, anchor_valid=valid)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
        last = out.loss.item()
    assert last < 0.5 * first, (first, last)
    return draft.eval()


def test_block_speculative_decoding_equals_greedy_and_accepts(target, trained):
    stats = SpecDecodeStats(draft_tokens=BLOCK - 1)
    for prompt in _prompts(4, seed=5)[:2] + _prompts(2, seed=9):
        expected = greedy_generate(target.model, prompt, 30)
        assert dflash_speculative_generate(target, trained, prompt, max_new_tokens=30, stats=stats) == expected
    # the trained draft is accepted (here about 1 token in 4 rounds), so the accept path is exercised
    assert stats.num_accepted_tokens > 0 and stats.tau > 1.1
    assert stats.num_accepted_tokens_per_pos[0] >= stats.num_accepted_tokens_per_pos[-1]
    assert stats.emitted_tokens == 4 * 29


def test_untrained_draft_is_still_lossless(target):
    config = DFlashDraftConfig.from_target_config(target.model.config, target_layer_ids=LAYERS,
                                                  mask_token_id=MASK, block_size=BLOCK)
    torch.manual_seed(3)
    draft = DFlashDraftModel.from_target(config, target.model)
    prompt = _prompts(1, seed=11)[0]
    assert dflash_speculative_generate(target, draft, prompt, max_new_tokens=12) == greedy_generate(
        target.model, prompt, 12)


def test_export_has_vllm_names_and_reloads_identically(target, trained, tmp_path):
    out = export_dflash_draft(trained, tmp_path / "draft")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": LAYERS}
    assert config["block_size"] == BLOCK and config["num_target_layers"] == 8
    tensors = load_file(str(out / "model.safetensors"))
    assert "fc.weight" in tensors and "hidden_norm.weight" in tensors and "norm.weight" in tensors
    assert "layers.0.self_attn.q_norm.weight" in tensors and "layers.0.mlp.gate_proj.weight" in tensors
    assert not any("embed_tokens" in k or "lm_head" in k for k in tensors)  # vLLM shares the target's
    reloaded = load_exported_dflash_draft(out, target.model)
    for name, value in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    prompt = _prompts(1, seed=5)[0]
    assert dflash_speculative_generate(target, reloaded, prompt, max_new_tokens=10) == greedy_generate(
        target.model, prompt, 10)


def test_cli_eval_method_dflash_is_lossless_and_reports_block_counters(trained, tmp_path):
    out = export_dflash_draft(trained, tmp_path / "draft")
    r = run_python(["-m", "draftcache.cli", "eval", "--draft", str(out), "--method", "dflash",
                    "--num-prompts", "2", "--max-new-tokens", "16", "--device", "cpu"],
                   env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"draft tokens K     {BLOCK - 1}" in r.stdout
    assert "lossless           yes" in r.stdout
    drafts, draft_tokens = map(int, re.search(r"engine counters    drafts (\d+), draft tokens (\d+)", r.stdout).groups())
    assert draft_tokens == (BLOCK - 1) * drafts
    wrong = run_python(["-m", "draftcache.cli", "eval", "--draft", str(out), "--method", "eagle3",
                        "--num-prompts", "1"], env=SUBPROCESS_ENV,
                       timeout=300)
    assert wrong.returncode == 1 and "holds a dflash draft" in wrong.stderr
