"""Building blocks shared by the EAGLE-3 and DFlash drafts: RMSNorm, SwiGLU MLP, RoPE, and the
layout of packed documents in a row (``document_layout``).

Both drafts are Llama/Qwen3-style decoder layers; these pieces are numerically what the
engines run (RMSNorm in at least fp32, RoPE in the ``rotate_half`` / neox layout with
tables computed in fp32 from positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "document_layout",
    "RMSNorm",
    "Rotary",
    "SUPPORTED_ROPE_TYPES",
    "SwiGLUMLP",
    "apply_rotary",
    "rope_inverse_frequencies",
    "rope_type",
    "rotate_half",
    "target_rope",
    "text_config",
]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    """The RoPE scaling kind named by a HF ``rope_scaling`` / ``rope_parameters`` dict."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def target_rope(text_config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of a HF config, from transformers 4.x fields
    (``rope_theta`` + ``rope_scaling``) or 5.x ``rope_parameters`` (theta inside the dict)."""
    params = getattr(text_config, "rope_parameters", None)
    if isinstance(params, Mapping) and params:
        params = dict(params)
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = getattr(text_config, "rope_theta", None)
        scaling = params if rope_type(params) != "default" else None
    else:
        theta = getattr(text_config, "rope_theta", None)
        scaling = getattr(text_config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    if theta is None:
        raise ValueError(
            "target config has no rope_theta (nor rope_parameters['rope_theta']); "
            "pass a config of a RoPE model or build the draft config by hand"
        )
    return float(theta), scaling


def text_config(hf_config: Any) -> Any:
    """The language-model part of a HF config object or of its ``to_dict()`` form."""
    if isinstance(hf_config, Mapping):
        text = hf_config.get("text_config") or hf_config
        return SimpleNamespace(**text)
    getter = getattr(hf_config, "get_text_config", None)
    if callable(getter):
        return getter()
    return getattr(hf_config, "text_config", None) or hf_config


def target_decoder_shape(hf_config: Any, *, draft: str, required: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """``(text_config, fields)``: the decoder fields a draft copies from its target's HF config
    (object or ``to_dict()`` form): sizes, head counts and ``head_dim``, eps, activation, RoPE
    (``rope_theta``/``rope_scaling`` or transformers 5.x ``rope_parameters``) and context length,
    so the draft serves at the target's width and positions. ``fields`` use the names both draft
    configs share; ``required`` names further fields the caller needs present. ``draft`` names the
    draft in the error."""
    text = text_config(hf_config)
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
              *required)
    missing = [name for name in needed if getattr(text, name, None) is None]
    if missing:
        raise ValueError(f"target config lacks {', '.join(missing)}; cannot derive a {draft} draft config from it")
    heads = int(text.num_attention_heads)
    theta, scaling = target_rope(text)
    return text, {
        "hidden_size": int(text.hidden_size),
        "intermediate_size": int(text.intermediate_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or int(text.hidden_size) // heads),
        "rms_norm_eps": float(getattr(text, "rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(text.max_position_embeddings),
        "target_hidden_size": int(text.hidden_size),
        "hidden_act": str(getattr(text, "hidden_act", "silu")),
    }


def rope_inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """``[head_dim // 2]`` float32 RoPE inverse frequencies with ``linear`` or ``llama3`` scaling.

    ``linear`` divides every frequency by ``factor``. ``llama3`` keeps high frequencies
    (wavelength below ``original_max_position_embeddings / high_freq_factor``), divides low
    ones (wavelength above ``original / low_freq_factor``) by ``factor`` and interpolates
    linearly in ``original / wavelength`` between the two.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (float(rope_theta) ** exponents)
    kind = rope_type(rope_scaling)
    if kind == "default" or rope_scaling is None:
        return inv_freq
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    required = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [name for name in required if name not in rope_scaling]
    if absent:
        raise ValueError(f"rope_scaling of type {kind!r} lacks {absent}: {dict(rope_scaling)}")
    factor = float(rope_scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    original = float(rope_scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    is_mid = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(is_mid, interpolated, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., d]``: ``(x1, x2) -> (-x2, x1)`` over the two halves (neox layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, d]`` by the tables ``cos, sin`` (broadcastable to ``x``)."""
    return x * cos + rotate_half(x) * sin


class Rotary:
    """RoPE tables computed in float32 from positions; kept off the module's buffers so
    ``model.to(bfloat16)`` cannot degrade the frequencies and the state_dict stays exact."""

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None) -> None:
        self._inv_freq = rope_inverse_frequencies(head_dim, rope_theta, rope_scaling)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, T]`` -> ``cos, sin [B, 1, T, head_dim]`` in ``dtype``."""
        device = position_ids.device
        if device not in self._on_device:
            self._on_device[device] = self._inv_freq.to(device)
        freqs = position_ids.to(torch.float32)[..., None] * self._on_device[device]  # [B, T, d/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in at least fp32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wide = x.to(torch.promote_types(dtype, torch.float32))  # at least fp32, never a downcast
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(dtype)


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: ``[..., H] -> [..., H]``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def document_layout(seq_lens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slot document index, in-document position and remaining tokens for packed rows.

    Args:
        seq_lens: ``[B, D]`` int document lengths per row (zeros for unused slots), each row
            summing to ``seq_len``.
        seq_len: ``T``.

    Returns:
        ``doc_ids [B, T]`` int64, ``position_ids [B, T]`` (restarting at 0 in each document)
        and ``doc_remaining [B, T]`` = tokens after ``t`` in its document (``len - 1 - pos``).
    """
    seq_lens = seq_lens.to(torch.int64)
    if seq_lens.dim() != 2:
        raise ValueError(f"seq_lens must be [B, max_docs], got shape {tuple(seq_lens.shape)}")
    totals = seq_lens.sum(-1)
    if bool((totals != seq_len).any()) or bool((seq_lens < 0).any()):
        raise ValueError(
            f"seq_lens rows must be non-negative and sum to the sequence length {seq_len}; got sums {totals.tolist()}"
        )
    ends = seq_lens.cumsum(-1)  # [B, D]
    slots = torch.arange(seq_len, device=seq_lens.device).expand(seq_lens.size(0), seq_len).contiguous()
    doc_ids = torch.searchsorted(ends, slots, right=True)  # [B, T]
    doc_end = ends.gather(1, doc_ids)
    doc_start = doc_end - seq_lens.gather(1, doc_ids)
    return doc_ids, slots - doc_start, doc_end - 1 - slots
