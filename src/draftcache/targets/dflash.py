"""DFlash target side: capture any set of decoder layers as the draft's context features.

Unlike EAGLE-3 (exactly three layers, shifted supervision), DFlash concatenates an arbitrary
set of layer outputs and applies NO shift: its block attention mask does the alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batch import TargetBatchError, check_sequence_inputs
from .capture import TargetForward, run_with_capture
from .layer_ids import validate_dflash_layer_ids
from .layout import decoder_layers_and_depth, output_projection, target_hidden_size

__all__ = ["DFlashTargetBatch", "HFDFlashTargetModel"]


@dataclass
class DFlashTargetBatch:
    """Target context features for one DFlash training batch; every field position-aligned (no shift).

    Attributes:
        hidden_states: ``[B, S, n*H]`` outputs of the ``n`` target layers, concatenated in the given order.
        input_ids: ``[B, S]``.
        attention_mask: ``[B, S]``.
        loss_mask: ``[B, S]``.
    """

    hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise TargetBatchError(f"input_ids must be [B, S], got shape {tuple(self.input_ids.shape)}")
        batch, seq = self.input_ids.shape
        for name, ndim in (("hidden_states", 3), ("attention_mask", 2), ("loss_mask", 2)):
            value = getattr(self, name)
            if value.dim() != ndim or tuple(value.shape[:2]) != (batch, seq):
                raise TargetBatchError(
                    f"{name} must be [B, S{', ...' if ndim == 3 else ''}] with B, S = {batch}, {seq} "
                    f"(from input_ids), got shape {tuple(value.shape)}"
                )


class HFDFlashTargetModel:
    """Capture the outputs of ``target_layer_ids`` (= HF ``hidden_states[i + 1]``) from a frozen causal LM.

    Args:
        model: a Hugging Face causal LM; put in eval mode.
        target_layer_ids: non-empty distinct layer ids in ``[0, L)``; see ``default_dflash_layer_ids``.
    """

    def __init__(self, model: nn.Module, target_layer_ids: Sequence[int]) -> None:
        self.model = model.eval()
        self._layers, self._num_layers = decoder_layers_and_depth(model)
        self._target_layer_ids = validate_dflash_layer_ids(target_layer_ids, self._num_layers)

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self._target_layer_ids)

    @property
    def aux_layer_ids(self) -> list[int]:
        """``target_layer_ids`` under the name the cache writer records as ``capture.layer_ids``."""
        return self.target_layer_ids

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        """Decoder hidden size H (context features are ``len(target_layer_ids) * H`` wide)."""
        return target_hidden_size(self.model)

    @property
    def vocab_size(self) -> int:
        """Logit width V, read from the output projection."""
        return int(self.output_projection()[0].shape[0])

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, H], bias [V] or None)`` of the target's lm_head (the draft computes its logits with it)."""
        return output_projection(self.model)

    def get_input_embeddings(self) -> nn.Embedding:
        """The target's input embedding module (the DFlash draft reuses it)."""
        return self.model.get_input_embeddings()

    def generate_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> DFlashTargetBatch:
        """Run the target once and return the concatenated layer outputs, unshifted."""
        check_sequence_inputs(input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
        device = self.model.get_input_embeddings().weight.device
        input_ids, attention_mask, loss_mask = (t.to(device) for t in (input_ids, attention_mask, loss_mask))
        out = run_with_capture(
            self.model,
            self._layers,
            self._target_layer_ids,
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
        return DFlashTargetBatch(
            hidden_states=out.aux_hidden_states,
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
        )

    def forward_capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        past_key_values: Any = None,
        capture_final_hidden: bool = False,
    ) -> TargetForward:
        """Run the target once: unshifted ``logits [B, S, V]`` and the context features
        ``aux_hidden_states [B, S, n*H]``. ``past_key_values`` (a transformers ``Cache``)
        continues a sequence, as speculative verification does; the cache comes back on the result."""
        device = self.model.get_input_embeddings().weight.device
        return run_with_capture(
            self.model,
            self._layers,
            self._target_layer_ids,
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            past_key_values=past_key_values,
            capture_final_hidden=capture_final_hidden,
        )
