"""Batching cached samples: right-padded batches and token-budget packed rows.

Both take the per-sample dicts of ``CacheReader.__getitem__`` (already shifted, S_i tokens each)
and return ``[B, T]`` batches with the same fields:

    input_ids [B, T] int64, attention_mask [B, T] int64, loss_mask [B, T] int64,
    aux_hidden_states [B, T, F] storage dtype, target_probs [B, T, Vd] float32,
    position_mask [B, T, 1] bool

Padding slots hold attention_mask 0, loss_mask 0, position_mask False and zeros elsewhere.
Packed rows add ``seq_lens``, ``position_ids`` and ``doc_remaining`` (see ``pack_samples``).
Because the reader zeroes each sample's last slot, no target crosses a document boundary.

Raw batches keep the STORED representation instead (``collate_raw`` of ``get_raw`` dicts, or
``CacheReader.get_raw_batch`` which reads a batch straight into one buffer): the samples' rows
concatenated, unshifted and unpadded, plus where each sample goes in the ``[B, T]`` batch.
``CacheReader.expand_batch`` turns one into exactly what ``collate_padded`` / ``pack_samples``
return, in one vectorised pass on the training device:

    input_ids [N] int32, loss_mask [N] uint8, aux_hidden_states [N, F] storage dtype,
    target_argmax [M] int32, the encoding's rows [M, ...] (target_probs | topk_probs, topk_ids |
    final_hidden), with N = sum S_i tokens and M = sum M_i supervised positions;
    sample_offsets [n+1] int64 (sample j = tokens [off[j], off[j+1])),
    supervised_offsets [n+1] int64 (its target rows), sample_rows [n] int64 (its batch row),
    sample_starts [n] int64 (its first column), batch_shape [2] int64 (B, T), packed [] bool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RAW_LAYOUT_FIELDS", "collate_padded", "collate_raw", "pack_samples", "plan_packed_rows",
           "raw_batch_layout"]

_FIELDS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs", "position_mask")
_TOKEN_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", "aux_hidden_states_scale")  # [S, ...] per sample
_ROW_FIELDS = ("target_argmax", "target_probs", "topk_probs", "topk_ids", "final_hidden",
               "final_hidden_scale")  # [M, ...] per sample
RAW_LAYOUT_FIELDS = ("sample_offsets", "supervised_offsets", "sample_rows", "sample_starts", "batch_shape", "packed")


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


def _row_width(row_lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    width = max(row_lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def raw_batch_layout(lengths: Sequence[int], num_supervised: Sequence[int], *, max_tokens: int | None = None,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Where each of ``n`` samples goes in the batch: the ``RAW_LAYOUT_FIELDS`` of a raw batch.

    ``max_tokens=None``: one right-padded row per sample (``collate_padded``); else next-fit rows
    of at most ``max_tokens`` tokens (``pack_samples``). ``lengths[j]`` = S_j tokens,
    ``num_supervised[j]`` = M_j stored target rows of sample j.
    """
    if not lengths:
        raise ValueError("a raw batch needs at least one sample")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    groups = [[j] for j in range(len(lengths))] if max_tokens is None else plan_packed_rows(lengths, max_tokens)
    rows, starts = [0] * len(lengths), [0] * len(lengths)
    row_lengths = []
    for b, group in enumerate(groups):
        used = 0
        for j in group:
            rows[j], starts[j] = b, used
            used += lengths[j]
        row_lengths.append(used)
    zero = torch.zeros(1, dtype=torch.int64)
    return {
        "sample_offsets": torch.cat([zero, torch.tensor(lengths, dtype=torch.int64).cumsum(0)]),  # [n+1]
        "supervised_offsets": torch.cat([zero, torch.tensor(num_supervised, dtype=torch.int64).cumsum(0)]),  # [n+1]
        "sample_rows": torch.tensor(rows, dtype=torch.int64),  # [n]
        "sample_starts": torch.tensor(starts, dtype=torch.int64),  # [n]
        "batch_shape": torch.tensor([len(groups), _row_width(row_lengths, pad_to_multiple_of)], dtype=torch.int64),
        "packed": torch.tensor(max_tokens is not None),  # [] bool
    }


def collate_raw(raws: Sequence[dict[str, torch.Tensor]], *, max_tokens: int | None = None,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate ``CacheReader.get_raw`` dicts into one raw batch (see the module docstring).

    ``reader.expand_batch(collate_raw(raws))`` equals ``collate_padded`` (``max_tokens=None``) or
    ``pack_samples(..., max_tokens)`` of the same samples' ``reader[i]``, with the same
    ``pad_to_multiple_of``. ``CacheReader.get_raw_batch`` returns the same dict without the
    per-sample tensors in between.
    """
    if not raws:
        raise ValueError("collate_raw needs at least one sample")
    names = [n for n in (*_TOKEN_FIELDS, *_ROW_FIELDS) if n in raws[0]]
    for j, raw in enumerate(raws):
        got = [n for n in (*_TOKEN_FIELDS, *_ROW_FIELDS) if n in raw]
        if got != names:
            raise ValueError(f"raw sample {j} has fields {got} but sample 0 has {names}; all samples of a batch must "
                             "come from one cache (CacheReader.get_raw)")
    out = {name: torch.cat([raw[name] for raw in raws]) for name in names}
    out.update(raw_batch_layout([int(r["input_ids"].numel()) for r in raws],
                                [int(r["target_argmax"].numel()) for r in raws],
                                max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of))
    return out


def _assemble(samples: Sequence[dict[str, torch.Tensor]], groups: list[list[int]],
              pad_to_multiple_of: int | None, *, packed: bool) -> dict[str, torch.Tensor]:
    lengths = [int(s["input_ids"].numel()) for s in samples]
    row_lengths = [sum(lengths[i] for i in g) for g in groups]
    width = _row_width(row_lengths, pad_to_multiple_of)
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
