"""Tiny real configs and drafts shared by the trainer tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from draftcache.data.vocab import DraftVocab
from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_target_config(**overrides) -> LlamaConfig:
    """An 8-layer Llama target with a long context and llama3 RoPE scaling."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=131072,
                  rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), architectures=["LlamaForCausalLM"])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_draft(config: Eagle3DraftConfig, *, seed: int = 0, draft_vocab_seed: int = 1) -> Eagle3DraftModel:
    """A draft with every parameter (norms included) randomised and a random draft vocabulary."""
    torch.manual_seed(seed)
    model = Eagle3DraftModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms around 1
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name == "embed_tokens.weight":
                param.copy_(torch.randn_like(param))
            else:  # variance-preserving, so activations and logits stay O(1) as in a real model
                param.copy_(torch.randn_like(param) / param.size(1) ** 0.5)
    gen = torch.Generator().manual_seed(draft_vocab_seed)
    selected = torch.randperm(config.target_vocab_size, generator=gen)[: config.draft_vocab_size]
    model.set_draft_vocab(DraftVocab.from_selected(selected, config.target_vocab_size))
    return model


def train_dflash_toy(draft, rows, *, steps: int, num_anchors: int, lr: float = 1e-2):
    """Train a DFlash/DSpark ``draft`` with ``dflash_loss`` on ``rows(seed=i)`` for ``steps`` steps
    (AdamW, fixed anchor sampling), then return the loss output on held-out ``rows(seed=10_000)``."""
    from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors

    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)

    def step(batch):
        anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=num_anchors, generator=gen)
        return dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, **batch)

    for i in range(steps):
        out = step(rows(seed=i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        return step(rows(seed=10_000))
