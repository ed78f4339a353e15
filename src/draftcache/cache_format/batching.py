"""Batching cached samples: right-padded batches and token-budget packed rows.

Both take the per-sample dicts of ``CacheReader.__getitem__`` (already shifted, S_i tokens each)
and return ``[B, T]`` batches with the same fields:

    input_ids [B, T] int64, attention_mask [B, T] int64, loss_mask [B, T] int64,
    aux_hidden_states [B, T, F] storage dtype, target_probs [B, T, Vd] float32,
    position_mask [B, T, 1] bool

Padding slots hold attention_mask 0, loss_mask 0, position_mask False and zeros elsewhere.
Packed rows add ``seq_lens``, ``position_ids`` and ``doc_remaining`` (see ``pack_samples``).
Because the reader zeroes each sample's last slot, no target crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["collate_padded", "pack_samples", "plan_packed_rows"]

_FIELDS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs", "position_mask")


def collate_padded(samples: Sequence[dict[str, torch.Tensor]], pad_to_multiple_of: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Right-pad ``samples`` to ``T = max S_i`` (rounded up to ``pad_to_multiple_of``): one row each."""
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    return _assemble(samples, [[i] for i in range(len(samples))], pad_to_multiple_of, packed=False)


def plan_packed_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Next-fit: walk ``lengths`` in order and start a new row when the next one does not fit in
    ``max_tokens``. Returns the sample indices of each row."""
    rows: list[list[int]] = []
    used = max_tokens + 1
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens {max_tokens}; raise the token budget "
                             "to at least the cache's seq_length")
        if used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_samples(samples: Sequence[dict[str, torch.Tensor]], max_tokens: int, *,
                 pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate ``samples`` into rows of at most ``max_tokens`` tokens (next-fit, in order).

    Besides the padded-batch fields, returns:
        seq_lens [B, max_docs] int64: segment lengths of each row in order: its documents, then
            the padding tail as one more segment when the row is shorter than T, then zeros; every
            row sums to T (the trainer's block-causal mask reads it that way).
        position_ids [B, T] int64: restart at 0 at each document; 0 on padding.
        doc_remaining [B, T] int64: real tokens after t within its document (a document of n
            tokens holds n-1, ..., 0); 0 on padding.
    """
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    groups = plan_packed_rows([int(s["input_ids"].numel()) for s in samples], max_tokens)
    return _assemble(samples, groups, pad_to_multiple_of, packed=True)


def _assemble(samples: Sequence[dict[str, torch.Tensor]], groups: list[list[int]],
              pad_to_multiple_of: int | None, *, packed: bool) -> dict[str, torch.Tensor]:
    lengths = [int(s["input_ids"].numel()) for s in samples]
    row_lengths = [sum(lengths[i] for i in g) for g in groups]
    width = max(row_lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch, first = len(groups), samples[0]
    out: dict[str, torch.Tensor] = {}
    for name in _FIELDS:
        ref = first[name]
        out[name] = torch.empty((batch, width, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
    if packed:
        device = first["input_ids"].device
        max_docs = max(len(g) + (row < width) for g, row in zip(groups, row_lengths))
        out["seq_lens"] = torch.zeros(batch, max_docs, dtype=torch.int64)
        out["position_ids"] = torch.zeros(batch, width, dtype=torch.int64, device=device)
        out["doc_remaining"] = torch.zeros(batch, width, dtype=torch.int64, device=device)
    for b, group in enumerate(groups):  # one copy per document and field, no per-token work
        start = 0
        for d, i in enumerate(group):
            n = lengths[i]
            for name in _FIELDS:
                out[name][b, start:start + n].copy_(samples[i][name])
            if packed:
                out["seq_lens"][b, d] = n
                out["position_ids"][b, start:start + n] = torch.arange(n)
                out["doc_remaining"][b, start:start + n] = torch.arange(n - 1, -1, -1)
            start += n
        if packed and start < width:
            out["seq_lens"][b, len(group)] = width - start  # the padding tail
        for name in _FIELDS:
            out[name][b, start:].zero_()
    if packed:
        out["seq_lens"] = out["seq_lens"].to(first["input_ids"].device)
    return out
