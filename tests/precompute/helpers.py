"""Shared helpers for the precompute tests: the CLI in a subprocess, small chat files, tiny targets.

Every model is built from a config (nothing is downloaded); all of them use the embedded default
tokenizer, so they read the same chat data.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from draftcache.defaults import default_data_path, default_target_path
from prewarmed import SUBPROCESS_ENV, run_python  # noqa: F401 (SUBPROCESS_ENV: re-exported for the tests here)



def target_dir() -> str:
    return default_target_path()


def data_file() -> str:
    return default_data_path()


def default_dims() -> tuple[int, int, int]:
    """``(hidden_size, vocab_size, num_hidden_layers)`` of the embedded default target."""
    config = json.loads((Path(target_dir()) / "config.json").read_text(encoding="utf-8"))
    return config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]


def precompute_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftcache.precompute", *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``precompute-eagle3 ARGS`` in its own process (``prewarmed.run_python``); stdout/stderr as text."""
    return run_python(precompute_cmd(*args), env=SUBPROCESS_ENV, timeout=timeout)


def write_chat_subset(path: Path, count: int, *, start: int = 0) -> Path:
    """The embedded chats' lines ``[start, start + count)`` as a new JSONL file."""
    lines = Path(data_file()).read_text(encoding="utf-8").splitlines()[start : start + count]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (names relative to it)."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read_manifest_json(directory: Path) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8"))


def save_tiny_target(directory: Path, family: str, **overrides) -> Path:
    """A tiny fp32 ``family`` causal LM (8 layers, hidden 32) over the default tokenizer's vocabulary,
    saved with that tokenizer as a Hugging Face model directory."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(target_dir(), local_files_only=True)
    vocab = max(len(tokenizer), 1024)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=16),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8),          # final_logit_softcapping=30 by default
        "cohere": lambda: tf.CohereConfig(**common),                       # logit_scale=0.0625 by default
    }
    config = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
