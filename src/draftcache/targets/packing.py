"""Packed rows: several documents concatenated in one row, run so each sees only itself.

``seq_lens [B, max_docs]`` lists the document lengths of each row in order; zero entries are
unused slots and a row's lengths sum to at most ``T``. Positions past the sum (the pad tail)
form one-token "documents" that attend only to themselves.

What transformers 5.23 does with a custom mask (read from ``masking_utils`` and the attention
functions, and checked by ``tests/targets/test_packing.py``):

* Any 4D ``attention_mask`` is returned unchanged by ``create_causal_mask`` and
  ``create_sliding_window_causal_mask`` (it is taken as already prepared), so the model
  applies NEITHER its causal rule NOR its sliding window on top of it: the mask must encode both.
* ``eager`` attention ADDS the mask to the scores. It needs an additive float mask (0 where
  allowed, ``finfo(dtype).min`` elsewhere); a bool mask is silently wrong there (adds 1/0).
* ``sdpa`` passes the mask to ``scaled_dot_product_attention``, which accepts either a bool mask
  (True = attend) or an additive float one.
* Hybrid models (``config.layer_types`` with ``"sliding_attention"``, e.g. Gemma3, Qwen2 with
  ``use_sliding_window``) accept a dict ``{layer_type: mask}``; models with one window for every
  layer (Mistral: ``config.sliding_window`` and no ``layer_types``) take one tensor.

So :func:`packed_attention_mask` builds an additive float mask (works for eager and sdpa) with
the window folded in where the model has one.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import text_config

__all__ = [
    "PackingError",
    "validate_seq_lens",
    "block_causal_mask",
    "packed_position_ids",
    "packed_attention_mask",
    "PACKING_ATTN_IMPLEMENTATIONS",
]

#: Attention implementations whose handling of a custom 4D mask we have checked.
PACKING_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class PackingError(ValueError):
    """Packing metadata (``seq_lens``) is malformed or the target cannot run packed rows."""


def validate_seq_lens(seq_lens: torch.Tensor, seq_len: int, batch_size: int | None = None) -> None:
    """Check ``seq_lens`` is an integer ``[B, max_docs]`` tensor of non-negative lengths summing to <= T per row.

    ``batch_size``, when given, must equal ``B``.
    """
    if not isinstance(seq_lens, torch.Tensor):
        raise PackingError(f"seq_lens must be a tensor [B, max_docs], got {type(seq_lens).__name__}")
    if seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool or seq_lens.is_complex():
        raise PackingError(f"seq_lens must be an integer tensor, got dtype {seq_lens.dtype}")
    if seq_lens.dim() != 2 or (batch_size is not None and seq_lens.size(0) != batch_size):
        expected = "B" if batch_size is None else f"B={batch_size}"
        raise PackingError(f"seq_lens must have shape [{expected}, max_docs], got {tuple(seq_lens.shape)}")
    if seq_lens.numel() and int(seq_lens.min()) < 0:
        raise PackingError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    totals = seq_lens.sum(dim=1)
    if seq_lens.numel() and int(totals.max()) > seq_len:
        raise PackingError(f"each row of seq_lens must sum to at most T={seq_len}, got row sums {totals.tolist()}")


def _document_ids(seq_lens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position document index ``[B, T]`` (pad-tail positions get unique ids) and doc starts ``[B, T]``."""
    seq_lens = seq_lens.long()
    batch_size, max_docs = seq_lens.shape
    ends = torch.cumsum(seq_lens, dim=1)  # [B, D] exclusive end of each doc
    positions = torch.arange(seq_len, device=seq_lens.device).expand(batch_size, seq_len).contiguous()
    if max_docs == 0:
        doc = torch.zeros_like(positions)
        ends = torch.zeros(batch_size, 1, dtype=torch.long, device=seq_lens.device)
        max_docs = 1
    else:
        # Number of doc ends <= t = index of the doc holding t (zero-length slots are skipped).
        doc = torch.searchsorted(ends, positions, right=True)  # [B, T]
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # [B, D]
    in_doc = positions < ends[:, -1:]  # [B, T]
    doc_start = torch.gather(starts, 1, doc.clamp(max=max_docs - 1))  # [B, T]
    # Each tail position is its own document, distinct from every real one.
    doc = torch.where(in_doc, doc, max_docs + positions)
    doc_start = torch.where(in_doc, doc_start, positions)
    return doc, doc_start


def packed_position_ids(seq_lens: torch.Tensor, T: int) -> torch.Tensor:
    """Position ids ``[B, T]`` int64 restarting at 0 at each document; pad-tail positions get 0."""
    validate_seq_lens(seq_lens, T)
    _, doc_start = _document_ids(seq_lens, T)
    return torch.arange(T, device=seq_lens.device).unsqueeze(0) - doc_start


def _allowed(seq_lens: torch.Tensor, T: int, sliding_window: int | None) -> torch.Tensor:
    doc, _ = _document_ids(seq_lens, T)
    q = torch.arange(T, device=seq_lens.device).view(T, 1)
    k = torch.arange(T, device=seq_lens.device).view(1, T)
    allowed = (doc.unsqueeze(2) == doc.unsqueeze(1)) & (k <= q)  # [B, T, T]
    if sliding_window is not None:
        # Same rule as transformers' sliding_window_overlay: kv_idx > q_idx - window.
        allowed = allowed & (q - k < sliding_window)
    return allowed.unsqueeze(1)  # [B, 1, T, T]


def block_causal_mask(
    seq_lens: torch.Tensor,
    T: int,
    dtype: torch.dtype,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Block-causal attention mask ``[B, 1, T, T]`` for packed rows.

    Query ``q`` may attend key ``k`` iff both lie in the same document and ``k <= q`` (and
    ``q - k < sliding_window`` when given); a pad-tail position attends only to itself.

    ``dtype=torch.bool`` gives True where attention is allowed (for sdpa); a floating dtype gives
    the additive form, 0 where allowed and ``torch.finfo(dtype).min`` elsewhere (for eager and sdpa).
    """
    validate_seq_lens(seq_lens, T)
    if sliding_window is not None and sliding_window < 1:
        raise PackingError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    allowed = _allowed(seq_lens, T, sliding_window)
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise PackingError(f"mask dtype must be torch.bool or a floating dtype, got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)


def _attn_implementation(config: Any) -> str | None:
    impl = getattr(text_config(config), "_attn_implementation", None)
    return impl if impl is not None else getattr(config, "_attn_implementation", None)


def packed_attention_mask(
    config: Any, seq_lens: torch.Tensor, T: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument that makes an HF model with ``config`` run packed rows exactly.

    Returns one additive ``[B, 1, T, T]`` mask, or for hybrid sliding/full models a dict
    ``{"full_attention": ..., "sliding_attention": ...}`` as their forward accepts.
    Raises ``PackingError`` for attention implementations or layer types not handled here.
    """
    impl = _attn_implementation(config)
    if impl not in PACKING_ATTN_IMPLEMENTATIONS:
        raise PackingError(
            f"packing (seq_lens) needs attn_implementation in {PACKING_ATTN_IMPLEMENTATIONS} so a custom "
            f"4D mask is honoured; the target uses {impl!r}. Load it with attn_implementation='sdpa'."
        )
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:
        # One attention kind for every layer; models such as Mistral window all of them.
        return block_causal_mask(seq_lens, T, dtype, sliding_window=window)
    kinds = set(layer_types)
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise PackingError(
            f"packing is not supported for layer types {sorted(unknown)} of {type(cfg).__name__}; "
            "only full and sliding attention layers can be given a custom block-causal mask"
        )
    if "sliding_attention" not in kinds:
        return block_causal_mask(seq_lens, T, dtype)
    if window is None:
        raise PackingError(
            f"{type(cfg).__name__} has sliding_attention layers but sliding_window=None; cannot build their mask"
        )
    return {
        "full_attention": block_causal_mask(seq_lens, T, dtype),
        "sliding_attention": block_causal_mask(seq_lens, T, dtype, sliding_window=window),
    }
