"""Turn one target forward over a padded batch into unpadded per-sample cache records.

Everything here is position-aligned (unshifted): the reader applies the EAGLE-3 shift. Only the
supervised positions (``loss_mask[p] == 1``) get target-side rows, because after the shift every
other row meets a zero ``position_mask`` in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftcache.cache_format.fp8 import quantize_rows, row_amax, scale_name
from draftcache.data.vocab import DraftVocab
from draftcache.targets.supervision import compute_target_distribution

__all__ = ["SupervisionSpec", "batch_to_records", "NON_FINITE_PARTS"]

# What a sample's non-finite flags ``[2] bool`` refer to, in order.
NON_FINITE_PARTS = ("aux_hidden_states", "supervision (logits / final hidden state)")


@dataclass(frozen=True)
class SupervisionSpec:
    """How target-side rows are encoded: ``probs`` (draft-vocab softmax), ``topk`` (renormalised
    top-k of it), ``hidden`` (the lm_head input, rebuilt to logits at read time) or ``argmax``
    (DFlash caches: ``target_argmax`` alone, label-aligned, see ``batch_to_records``; a DFlash
    cache with ``hidden`` stores both, label-aligned: ``label_aligned``)."""

    encoding: str
    vocab: DraftVocab
    dtype: torch.dtype          # of probability rows; also of hidden states not in ``quantized``
    topk: int | None = None
    # fp8 cache: the hidden states stored as float8_e4m3fn + float32 scale per row (schema.quantized_tensors)
    quantized: tuple[str, ...] = ()
    label_aligned: bool = False  # dflash caches: rows of supervised q hold the target's output FOR q (at q - 1)
    num_layers: int = 1         # captured layers: aux rows split into this many scaled (and checked) rows


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

    Returns one dict per row (``SampleRecord`` fields, views of one host copy per tensor, plus
    ``non_finite [2] bool``: NaN/Inf in the sample's ``NON_FINITE_PARTS``, checked here on the
    device over its real positions; the caller drops such a sample) with
    ``input_ids [S] int32``, ``loss_mask [S] uint8``, ``aux_hidden_states [S, F]``, ``target_argmax
    [M] int32`` and the encoding's rows (``target_probs [M, Vd]`` | ``topk_probs``/``topk_ids [M, k]``
    | ``final_hidden [M, H]``), ``M = loss_mask[:S].sum()``; the hidden states in ``spec.quantized``
    are fp8 with ``aux_hidden_states_scale [S, L]`` / ``final_hidden_scale [M, 1]``, the
    scales taken from the same per-row max |x| pass as the check. On CUDA the copies are asynchronous:
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
    if spec.label_aligned:
        # DFlash: row of supervised position q = the target's greedy token FOR q (argmax at q - 1),
        # what a block slot predicting q is labelled with; q = 0 has no prediction (the data token)
        greedy = torch.cat([input_ids[:, :1].to(greedy.dtype), greedy[:, :-1]], dim=1)
        if final_hidden is not None:  # likewise the lm_head input at q - 1 (zeros for q = 0, never read)
            final_hidden = torch.cat([torch.zeros_like(final_hidden[:, :1]), final_hidden[:, :-1]], dim=1)
    target_argmax = greedy[sup].to(torch.int32)              # [M_total]
    batch, width, features = aux_hidden_states.shape
    layers = spec.num_layers
    real = torch.arange(width, device=logits.device)[None, :] < torch.tensor(lengths, device=logits.device)[:, None]
    aux_amax = row_amax(aux_hidden_states.reshape(batch * width, features), layers)     # [B*T, L] NaN/inf kept
    bad_aux = (~torch.isfinite(aux_amax)).any(-1).view(batch, width) & real              # [B, T]
    # -inf logits are a legitimate "never" (masked vocabulary); NaN / +inf are a broken forward
    bad_sup = (logits.isnan() | logits.isposinf()).any(-1) & real                        # [B, T]
    if spec.encoding == "argmax":
        payload = {}
    elif spec.encoding == "hidden":
        if final_hidden is None:
            raise ValueError("the hidden encoding needs the target's final hidden state (capture_final_hidden=True)")
        rows = final_hidden[sup]                             # [M_total, H]
        amax = row_amax(rows, 1)                             # [M_total, 1]
        bad_sup = bad_sup.clone()
        bad_sup[sup] |= ~torch.isfinite(amax[:, 0])
        if "final_hidden" in spec.quantized:
            values, scale = quantize_rows(rows, 1, amax)
            payload = {"final_hidden": values, scale_name("final_hidden"): scale}
        else:
            payload = {"final_hidden": rows.to(spec.dtype)}
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
    if "aux_hidden_states" in spec.quantized:
        values, scale = quantize_rows(aux_hidden_states.reshape(batch * width, features), layers, aux_amax)
        aux = {"aux_hidden_states": values.view(batch, width, features),                     # [B, T, F] fp8
               scale_name("aux_hidden_states"): scale.view(batch, width, layers)}             # [B, T, L] fp32
    else:
        aux = {"aux_hidden_states": aux_hidden_states.to(spec.dtype)}                          # [B, T, F]
    device_tensors = {
        "input_ids": input_ids.to(torch.int32),                   # [B, T]
        "loss_mask": loss_mask.to(torch.uint8),                   # [B, T]
        **aux,
        "target_argmax": target_argmax,                           # [M_total]
        "non_finite": torch.stack([bad_aux.any(1), bad_sup.any(1)], dim=1),  # [B, 2] bool
        **payload,                                                # [M_total, ...]
    }
    non_blocking = logits.device.type == "cuda"
    host = {name: t.to("cpu", non_blocking=non_blocking) for name, t in device_tensors.items()}
    records = []
    start = 0
    for b, length in enumerate(lengths):
        stop = start + counts[b]
        rec = {name: host[name][b, :length] for name in ("input_ids", *aux, "loss_mask")}
        rec.update({name: host[name][start:stop] for name in ("target_argmax", *payload)})
        rec["non_finite"] = host["non_finite"][b]
        records.append(rec)
        start = stop
    return records

