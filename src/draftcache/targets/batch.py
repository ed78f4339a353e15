"""``Eagle3TargetBatch``: the target-side supervision of one EAGLE-3 training batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .supervision import shift_left_with_zero

__all__ = ["Eagle3TargetBatch", "TargetBatchError", "check_sequence_inputs", "shifted_eagle3_batch"]


class TargetBatchError(ValueError):
    """An ``Eagle3TargetBatch`` was built with a missing, doubled or mis-shaped field."""


@dataclass
class Eagle3TargetBatch:
    """Target supervision for one draft-training batch, already shifted (see ``docs/DESIGN.md``).

    Slot ``t`` carries the feature ``aux_hidden_states[t]`` (not shifted), the next token
    ``input_ids[t] = x_{t+1}``, ``loss_mask[t] = m_{t+1}`` and the target distribution at
    position ``t + 1``; the last slot's shifted fields are zero. ``attention_mask`` is not shifted.

    Exactly one supervision encoding:

    * ``logits [B, S, V]``: full-vocab logits; the draft-vocab projection happens in the trainer.
    * ``target_probs [B, S, Vd]`` + ``position_mask [B, S, 1]``: already projected with
      ``compute_target_distribution`` (e.g. read from a cache).

    Attributes:
        aux_hidden_states: ``[B, S, 3H]`` the three captured layers, concatenated (not shifted).
        input_ids: ``[B, S]`` shifted token ids.
        attention_mask: ``[B, S]`` not shifted.
        loss_mask: ``[B, S]`` shifted.
        logits: ``[B, S, V]`` shifted, or None.
        target_probs: ``[B, S, Vd]`` float, or None.
        position_mask: ``[B, S, 1]`` bool, or None.
        position_ids: ``[B, S]`` packing only, not shifted.
        seq_lens: ``[B, max_docs]`` packing only.
        doc_remaining: ``[B, S]`` packing only, not shifted: real tokens after ``t`` in its document.
    """

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    position_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._check_encoding()
        self._check_shapes()

    def _check_encoding(self) -> None:
        has_logits = self.logits is not None
        has_probs = self.target_probs is not None
        has_mask = self.position_mask is not None
        if has_probs != has_mask:
            present, absent = ("target_probs", "position_mask") if has_probs else ("position_mask", "target_probs")
            raise TargetBatchError(
                f"Eagle3TargetBatch got {present} without {absent}; the draft-vocab encoding needs both "
                "(build them together with compute_target_distribution)"
            )
        if has_logits and has_probs:
            raise TargetBatchError(
                "Eagle3TargetBatch got two supervision encodings (logits and target_probs+position_mask); "
                "pass exactly one"
            )
        if not has_logits and not has_probs:
            raise TargetBatchError(
                "Eagle3TargetBatch carries no supervision; pass logits [B, S, V] or "
                "target_probs [B, S, Vd] + position_mask [B, S, 1]"
            )

    def _check_shapes(self) -> None:
        if self.input_ids.dim() != 2:
            raise TargetBatchError(f"input_ids must be [B, S], got shape {tuple(self.input_ids.shape)}")
        batch, seq = self.input_ids.shape
        expected_ndim = {
            "aux_hidden_states": 3,
            "attention_mask": 2,
            "loss_mask": 2,
            "logits": 3,
            "target_probs": 3,
            "position_mask": 3,
            "position_ids": 2,
            "doc_remaining": 2,
        }
        for name, ndim in expected_ndim.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value.dim() != ndim or tuple(value.shape[:2]) != (batch, seq):
                dims = ", ".join(["B", "S", "..."][:ndim])
                raise TargetBatchError(
                    f"{name} must be [{dims}] with B, S = {batch}, {seq} (from input_ids "
                    f"{tuple(self.input_ids.shape)}), got shape {tuple(value.shape)}"
                )
        if self.position_mask is not None and self.position_mask.size(-1) != 1:
            raise TargetBatchError(
                f"position_mask must be [B, S, 1] = [{batch}, {seq}, 1], got shape {tuple(self.position_mask.shape)}"
            )
        if self.aux_hidden_states.size(-1) % 3 != 0:
            raise TargetBatchError(
                f"aux_hidden_states must be [B, S, 3H] (three layers concatenated), got last dim "
                f"{self.aux_hidden_states.size(-1)}, not a multiple of 3"
            )
        if self.seq_lens is not None and (self.seq_lens.dim() != 2 or self.seq_lens.size(0) != batch):
            raise TargetBatchError(
                f"seq_lens must be [B, max_docs] with B = {batch}, got shape {tuple(self.seq_lens.shape)}"
            )

    def to_trainer_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the EAGLE-3 trainer's forward.

        Always ``input_ids, attention_mask, loss_mask, aux_hidden_states``; then either ``logits``
        or ``target_probs, position_mask``; then the packing fields that are present.
        """
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
            "aux_hidden_states": self.aux_hidden_states,
        }
        if self.logits is not None:
            inputs["logits"] = self.logits
        else:
            inputs["target_probs"] = self.target_probs
            inputs["position_mask"] = self.position_mask
        for name in ("position_ids", "seq_lens", "doc_remaining"):
            value = getattr(self, name)
            if value is not None:
                inputs[name] = value
        return inputs


def check_sequence_inputs(input_ids: torch.Tensor, **masks: torch.Tensor | None) -> None:
    """Check ``input_ids`` is ``[B, S]`` and every given mask has the same shape, before running a target."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TargetBatchError(f"input_ids must be a [B, S] tensor, got {shape}")
    for name, mask in masks.items():
        if mask is not None and tuple(mask.shape) != tuple(input_ids.shape):
            raise TargetBatchError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}"
            )


def shifted_eagle3_batch(
    *,
    logits: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
) -> Eagle3TargetBatch:
    """Build the shifted batch from one unshifted target forward.

    ``logits``, ``input_ids`` and ``loss_mask`` are shifted left by one with a zero tail;
    ``aux_hidden_states``, ``attention_mask`` and the packing fields stay position-aligned.
    Every backend (HF hooks, runners) goes through here, so their batches agree bit for bit.
    """
    return Eagle3TargetBatch(
        aux_hidden_states=aux_hidden_states,
        input_ids=shift_left_with_zero(input_ids),
        attention_mask=attention_mask,
        loss_mask=shift_left_with_zero(loss_mask),
        logits=shift_left_with_zero(logits),
        position_ids=position_ids,
        seq_lens=seq_lens,
        doc_remaining=doc_remaining,
    )
