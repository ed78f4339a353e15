"""Turn one target forward over a padded batch into unpadded per-sample cache records.

Everything here is position-aligned (unshifted): the reader applies the EAGLE-3 shift. Only the
supervised positions (``loss_mask[p] == 1``) get target-side rows, because after the shift every
other row meets a zero ``position_mask`` in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftcache.data.vocab import DraftVocab
from draftcache.targets.supervision import compute_target_distribution

__all__ = ["SupervisionSpec", "batch_to_records"]


@dataclass(frozen=True)
class SupervisionSpec:
    """How target-side rows are encoded: ``probs`` (draft-vocab softmax), ``topk`` (renormalised
    top-k of it), ``hidden`` (the lm_head input, rebuilt to logits at read time) or ``argmax``
    (DFlash caches: ``target_argmax`` alone, label-aligned, see ``batch_to_records``)."""

    encoding: str
    vocab: DraftVocab
    dtype: torch.dtype
    topk: int | None = None


@torch.no_grad()
def batch_to_records(
    *,
    logits: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    final_hidden: torch.Tensor | None,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    lengths: list[int],
    spec: SupervisionSpec,
) -> list[dict[str, torch.Tensor]]:
    """Per-sample host tensors in the storage dtype.

    Args:
        logits: ``[B, T, V]`` unshifted target logits (right-padded batch).
        aux_hidden_states: ``[B, T, F]`` captured layers, position-aligned.
        final_hidden: ``[B, T, H]`` lm_head input, required for ``hidden``.
        input_ids, loss_mask: ``[B, T]``; padding has ``loss_mask == 0``.
        lengths: real length ``S_b`` of each row.

    Returns one dict per row (``SampleRecord`` fields, views of one host copy per tensor) with
    ``input_ids [S] int32``, ``loss_mask [S] uint8``, ``aux_hidden_states [S, F]``, ``target_argmax
    [M] int32`` and the encoding's rows (``target_probs [M, Vd]`` | ``topk_probs``/``topk_ids [M, k]``
    | ``final_hidden [M, H]``), ``M = loss_mask[:S].sum()``. On CUDA the copies are asynchronous:
    synchronise (e.g. a ``torch.cuda.Event`` recorded on ``logits.device``'s current stream after this
    call) before reading them.
    """
    # a target split over devices returns logits on its last device: work there
    input_ids, loss_mask = input_ids.to(logits.device), loss_mask.to(logits.device)
    if final_hidden is not None:
        final_hidden = final_hidden.to(logits.device)
    aux_hidden_states = aux_hidden_states.to(logits.device)
    sup = loss_mask.bool()                                   # [B, T]
    greedy = logits.argmax(dim=-1)                           # [B, T]; no [M, V] copy for it
    if spec.encoding == "argmax":
        # DFlash: row of supervised position q = the target's greedy token FOR q (argmax at q - 1),
        # what a block slot predicting q is labelled with; q = 0 has no prediction (the data token)
        greedy = torch.cat([input_ids[:, :1].to(greedy.dtype), greedy[:, :-1]], dim=1)
    target_argmax = greedy[sup].to(torch.int32)              # [M_total]
    if spec.encoding == "argmax":
        payload = {}
    elif spec.encoding == "hidden":
        if final_hidden is None:
            raise ValueError("the hidden encoding needs the target's final hidden state (capture_final_hidden=True)")
        payload = {"final_hidden": final_hidden[sup].to(spec.dtype)}
    else:
        rows = logits[sup]                                   # [M_total, V]
        ones = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        probs, _ = compute_target_distribution(
            rows, ones, spec.vocab.selected_token_ids.to(rows.device), spec.vocab.t2d.to(rows.device)
        )                                                    # [M_total, Vd] float32
        if spec.encoding == "probs":
            payload = {"target_probs": probs.to(spec.dtype)}
        else:
            top_p, top_i = probs.topk(spec.topk, dim=-1)     # [M_total, k]
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
            payload = {"topk_probs": top_p.to(spec.dtype), "topk_ids": top_i.to(torch.int32)}
    counts = sup.sum(dim=1).tolist()
    # Every conversion happens on the device, BEFORE the copy: on CUDA the copy is asynchronous
    # into pinned memory, so the host tensors may not be read until the caller has synchronised
    # (an event); below they are only sliced (views, no reads).
    device_tensors = {
        "input_ids": input_ids.to(torch.int32),                   # [B, T]
        "loss_mask": loss_mask.to(torch.uint8),                   # [B, T]
        "aux_hidden_states": aux_hidden_states.to(spec.dtype),    # [B, T, F]
        "target_argmax": target_argmax,                           # [M_total]
        **payload,                                                # [M_total, ...]
    }
    non_blocking = logits.device.type == "cuda"
    host = {name: t.to("cpu", non_blocking=non_blocking) for name, t in device_tensors.items()}
    records = []
    start = 0
    for b, length in enumerate(lengths):
        stop = start + counts[b]
        rec = {name: host[name][b, :length] for name in ("input_ids", "loss_mask", "aux_hidden_states")}
        rec.update({name: host[name][start:stop] for name in ("target_argmax", *payload)})
        records.append(rec)
        start = stop
    return records
