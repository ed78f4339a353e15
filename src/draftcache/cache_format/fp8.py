"""fp8 storage of hidden states: ``float8_e4m3fn`` values with one float32 scale per row.

A "row" is one token's output of one captured layer (``aux_hidden_states [N, L*H]`` has ``L``
rows per token, scales ``[N, L]``) or one supervised position's final hidden state
(``final_hidden [M, H]``, scales ``[M, 1]``). ``q = round_e4m3(x / s)`` with
``s = max(|x|) / 448`` (448 is e4m3's largest finite value), so every row uses the full e4m3
range and ``x ~= q * s`` to within e4m3's relative precision (3 mantissa bits, <= 6.25% per value,
~2-3% rms).

Why float32 scales: they cost 4 bytes per ``H`` fp8 bytes (0.1% at H = 4096, 7% at the embedded
default's H = 64); a bf16 scale would add up to 0.4% of systematic error to every value of the
row, which the per-value e4m3 rounding does not average away. Scales of an all-zero row are
``1 / 448`` (never 0), so a valid cache's scales are always finite and positive.

Quantizing runs wherever ``x`` is (the precompute does it on the target's device, before the
copy to the host, in the same pass that checks the row for NaN/Inf); dequantizing runs wherever
``q`` is (the trainer: after the host-to-device copy).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "SCALE_DTYPE", "QUANTIZED_TENSORS", "scale_name", "row_amax", "quantize_rows",
           "dequantize_rows", "stored_rows_on"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_DTYPE = torch.float32
# tensors stored as fp8 + a scale tensor in an fp8 cache; probs / topk rows stay 16-bit (bf16)
QUANTIZED_TENSORS = ("aux_hidden_states", "final_hidden")
_MIN_AMAX = 1.0  # amax of an all-zero row: any positive scale is exact there


def scale_name(name: str) -> str:
    """``aux_hidden_states`` -> ``aux_hidden_states_scale``: the scale tensor stored next to ``name``."""
    return f"{name}_scale"


def row_amax(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[R, groups]`` float32 ``max |x|`` over each of the ``groups`` equal parts of every row of
    ``x [R, groups * W]`` (NaN where a part holds a NaN, inf where it holds an inf)."""
    rows, width = x.shape
    if width % groups:
        raise ValueError(f"a row of width {width} cannot be split into {groups} equal parts")
    parts = x.reshape(rows, groups, width // groups)
    # amax drops NaN on some backends; make it explicit so the finiteness check sees it
    amax = parts.abs().amax(dim=-1).float()                                   # [R, groups]
    return torch.where(parts.isnan().any(dim=-1), torch.full_like(amax, float("nan")), amax)


def quantize_rows(x: torch.Tensor, groups: int, amax: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, groups * W]`` (any float dtype) -> ``(q [R, groups * W] float8_e4m3fn,
    scale [R, groups] float32)`` with ``x ~= q * scale`` per part. ``amax`` (``row_amax(x, groups)``)
    may be passed when already computed. Non-finite rows give non-finite scales (check first)."""
    rows, width = x.shape
    if amax is None:
        amax = row_amax(x, groups)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, _MIN_AMAX))
    scale = (amax / FP8_MAX).to(SCALE_DTYPE)                                   # [R, groups]
    scaled = x.float().reshape(rows, groups, width // groups) / scale.unsqueeze(-1)
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(rows, width)    # [R, groups * W]
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q [R, groups * W]`` float8_e4m3fn and ``scale [R, groups]`` -> ``[R, groups * W]`` ``dtype``.
    Runs on ``q``'s device (move both there first)."""
    rows, width = q.shape
    groups = scale.shape[1]
    out = q.reshape(rows, groups, width // groups).float() * scale.float().unsqueeze(-1)
    return out.reshape(rows, width).to(dtype)


def stored_rows_on(raw: dict[str, torch.Tensor], name: str, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``raw[name]`` copied to ``device`` as it is stored (one byte a value for fp8) and, when the
    raw batch carries its scales, dequantized there to ``dtype``; other dtypes are only copied."""
    values = raw[name].to(device, non_blocking=True)
    scale = raw.get(scale_name(name))
    if scale is None:
        return values
    return dequantize_rows(values, scale.to(device, non_blocking=True), dtype)
