"""Fingerprints of what shapes a cache: the target's weights and config, the tokenizer and chat template.

Weights are fingerprinted from the tensors already in memory (names, shapes, dtypes and a strided
sample of each tensor's values), so a 70B target costs no extra disk pass; a fine-tuned checkpoint
of the same architecture still changes the fingerprint because its values differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

from draftcache.data.templates import template_sha256

__all__ = ["model_fingerprint", "named_tensors_fingerprint", "config_fingerprint", "tokenizer_fingerprint", "chat_template_fingerprint"]

_SAMPLES_PER_TENSOR = 4096


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_fingerprint(config) -> str:
    """sha256 of the model config as sorted JSON (minus fields that name paths, not behaviour)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path"):
        d.pop(key, None)
    return _sha(json.dumps(d, sort_keys=True, default=str).encode())


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter/buffer name, shape, dtype and a strided sample of its values."""
    return named_tensors_fingerprint(sorted(model.state_dict().items()))


@torch.no_grad()
def named_tensors_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``model_fingerprint`` over ``(name, tensor)`` pairs given in name order, consumed one at a
    time (so a generator can stream a checkpoint without holding it in memory)."""
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised state (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(
        {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}, sort_keys=True
    )
    return _sha((state + "\n" + special).encode())


def chat_template_fingerprint(tokenizer) -> str:
    """sha256 of ``tokenizer.chat_template``: the template conversations are rendered with, since a
    ``--chat-template`` is put on the tokenizer (``draftcache.data.set_chat_template``) before use."""
    return template_sha256(getattr(tokenizer, "chat_template", None))
