"""``SampleRecord``: one sample as the precompute pipeline hands it to the writer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SampleRecord"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass
class SampleRecord:
    """One sample, UNSHIFTED (position-aligned) and unpadded, with S real tokens and
    M = loss_mask.sum() supervised positions.

    Attributes:
        input_ids: ``[S]`` int token ids.
        loss_mask: ``[S]`` 0/1 (any int or bool dtype); 1 where the token is supervised.
        aux_hidden_states: ``[S, F]`` the captured decoder-layer outputs at each position.
        target_argmax: ``[M]`` int, the target's full-vocab argmax at each supervised position.
        target_probs: ``[M, Vd]`` draft-vocab distribution (encoding ``probs``).
        topk_probs, topk_ids: ``[M, k]`` renormalised top-k probabilities and their int
            draft-vocab ids (encoding ``topk``).
        final_hidden: ``[M, H]`` the target's final hidden state, lm_head input (encoding ``hidden``).
        aux_hidden_states_scale, final_hidden_scale: ``[S, L]`` / ``[M, 1]`` float32 per-row scales
            when ``aux_hidden_states`` / ``final_hidden`` are already fp8 (``fp8.quantize_rows``); None
            otherwise (a writer of an fp8 cache quantizes float rows itself).

    Row r of every ``[M, ...]`` tensor belongs to the r-th position with ``loss_mask == 1``.
    At most one encoding's tensors may be set; none is the ``argmax`` encoding of DFlash caches,
    whose ``target_argmax`` row for supervised position ``q`` is the target's greedy token FOR
    ``q`` (the argmax of the logits at ``q - 1``; the data token at ``q = 0``, which no block predicts).
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    aux_hidden_states: torch.Tensor
    target_argmax: torch.Tensor
    target_probs: torch.Tensor | None = None
    topk_probs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    aux_hidden_states_scale: torch.Tensor | None = None
    final_hidden_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        ids, mask, aux, argmax = self.input_ids, self.loss_mask, self.aux_hidden_states, self.target_argmax
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in _INT_DTYPES:
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor [S]; got shape {tuple(ids.shape)} "
                             f"dtype {ids.dtype}")
        seq = ids.numel()
        if mask.shape != (seq,):
            raise ValueError(f"loss_mask must have shape [S] = ({seq},) like input_ids; got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("loss_mask must hold only 0 and 1")
        if aux.dim() != 2 or aux.shape[0] != seq:
            raise ValueError(f"aux_hidden_states must have shape [S, F] with S = {seq}; got {tuple(aux.shape)}")
        num_supervised = int(mask.sum())
        if argmax.shape != (num_supervised,) or argmax.dtype not in _INT_DTYPES:
            raise ValueError(f"target_argmax must be an integer tensor of shape [M] with M = loss_mask.sum() = "
                             f"{num_supervised}; got shape {tuple(argmax.shape)} dtype {argmax.dtype}")
        given = [name for name in ("target_probs", "topk_probs", "topk_ids", "final_hidden")
                 if getattr(self, name) is not None]
        if given not in ([], ["target_probs"], ["topk_probs", "topk_ids"], ["final_hidden"]):
            raise ValueError(f"set exactly one encoding (or none: argmax, DFlash caches): target_probs (probs), "
                             f"topk_probs + topk_ids (topk) or final_hidden (hidden); got {given}")
        for name in given:
            rows = getattr(self, name)
            if rows.dim() != 2 or rows.shape[0] != num_supervised:
                raise ValueError(f"{name} must have shape [M, ...] with M = loss_mask.sum() = {num_supervised} "
                                 f"(one row per supervised position); got {tuple(rows.shape)}")
        for name in ("aux_hidden_states", "final_hidden"):
            values, scale = getattr(self, name), getattr(self, f"{name}_scale")
            if values is not None and (values.dtype == torch.float8_e4m3fn) != (scale is not None):
                raise ValueError(f"{name} is {values.dtype}: fp8 rows need {name}_scale, other dtypes must not have it")
            if scale is not None and (scale.dim() != 2 or scale.shape[0] != values.shape[0]):
                raise ValueError(f"{name}_scale must have shape [rows, groups] with rows = {values.shape[0]}; got "
                                 f"{tuple(scale.shape)}")
        if self.topk_ids is not None:
            if self.topk_ids.shape != self.topk_probs.shape or self.topk_ids.dtype not in _INT_DTYPES:
                raise ValueError(f"topk_ids must be an integer tensor shaped like topk_probs {tuple(self.topk_probs.shape)}; "
                                 f"got {tuple(self.topk_ids.shape)} dtype {self.topk_ids.dtype}")

    @property
    def encoding(self) -> str:
        """``probs`` | ``topk`` | ``hidden`` | ``argmax``: which target-side tensors this record carries."""
        if self.target_probs is not None:
            return "probs"
        if self.topk_probs is not None:
            return "topk"
        return "hidden" if self.final_hidden is not None else "argmax"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_supervised(self) -> int:
        return int(self.target_argmax.numel())
