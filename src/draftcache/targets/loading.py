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
                      device_map: str | dict | None = None, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` in eval mode; safetensors weights only.

    One device (``device_map=None``) needs nothing beyond the base install: transformers refuses
    any ``device_map`` without ``accelerate``, so the weights are read onto the host and, for
    another device, moved there with ``.to`` (host RAM then holds the target once, briefly); on
    the CPU nothing moves. ``device_map="auto"`` (or an explicit ``{module: device}`` map) splits
    a target too large for one device over the visible devices (needs the ``devices`` extra,
    ``accelerate``); ``device`` then only picks the compute dtype, the captured layers may live
    on different devices, and ``forward_capture`` gathers their outputs on the device of the
    logits. ``dtype``: the compute dtype (default: fp32 on the CPU, bf16 on GPUs).
    """
    from transformers import AutoModelForCausalLM

    if device_map is not None and device_map != "auto" and not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto', a {{module: device}} dict or None; got {device_map!r}")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ImportError(f"device_map={device_map!r} splits the target with accelerate, which is not installed: "
                              "pip install 'draftcache[devices]'") from None
    local = Path(path).is_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype if dtype is not None else _compute_dtype(device),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=local,
        device_map=device_map,
    )
    if device_map is None and device.type != "cpu":
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """The target's tokenizer. It must carry a chat template unless ``chat_template`` (a
    ``--chat-template`` value the caller then sets on it) supplies one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        local_files_only=Path(path).is_dir())
    if chat_template is None and getattr(tok, "chat_template", None) in (None, ""):
        raise ValueError(
            f"the tokenizer of {path} has no chat template; draftcache renders conversations with a chat "
            "template: pass --chat-template (a Jinja file or the template text), or use a chat/instruct model"
        )
    return tok
