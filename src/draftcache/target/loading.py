"""Load the frozen target and its tokenizer (local dir, HF name, or the embedded default)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["resolve_device", "load_target_model", "load_tokenizer"]


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # Full precision on CPU (bf16 matmuls there are slow and inexact); bf16 on GPUs.
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_target_model(path: str, *, device: torch.device, trust_remote_code: bool = False,
                      dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` in eval mode on ``device``; safetensors weights only. ``dtype``
    None: fp32 on the CPU, bf16 on GPUs."""
    from transformers import AutoModelForCausalLM

    local = Path(path).is_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or _compute_dtype(device),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=local,
    )
    return model.to(device).eval()


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        local_files_only=Path(path).is_dir())
    if getattr(tok, "chat_template", None) in (None, ""):
        raise ValueError(
            f"the tokenizer of {path} has no chat template; draftcache renders conversations with the "
            "tokenizer's own template, so use a chat/instruct model or add a chat_template to its tokenizer_config.json"
        )
    return tok
