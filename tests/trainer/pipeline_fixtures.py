"""A tiny real target on disk (default tokenizer + a small random Llama) and a cache made from it
by the real precompute pipeline, shared by the training-loop, parity and evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from draftcache.defaults import default_data_path, default_target_path


def build_tiny_target_dir(path: Path, *, seed: int = 0) -> Path:
    """Save a random tiny Llama (8 layers, hidden 32) with the embedded default tokenizer."""
    tok = AutoTokenizer.from_pretrained(default_target_path(), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_chats(path: Path, n: int) -> Path:
    """The first ``n`` embedded conversations, as a local JSONL file."""
    lines = Path(default_data_path()).read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def precompute_cache(target_dir: Path, data: Path, out: Path, **overrides) -> Path:
    from draftcache.precompute.config import PrecomputeConfig
    from draftcache.precompute.main import precompute_from_config

    settings = dict(output_dir=str(out), target_model=str(target_dir), input_data=str(data), seq_length=128,
                    dtype="fp32", supervision="probs", batch_size=1, shard_size=8, device="cpu", progress=False)
    settings.update(overrides)
    precompute_from_config(PrecomputeConfig(**settings), log=lambda *_: None)
    assert json.loads((out / "manifest.json").read_text())["complete"]
    return out
