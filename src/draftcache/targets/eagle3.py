"""``HFEagle3TargetModel``: EAGLE-3 supervision from a frozen, co-located HF causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .batch import Eagle3TargetBatch, check_sequence_inputs, shifted_eagle3_batch
from .capture import TargetForward, run_with_capture
from .layer_ids import default_eagle3_aux_layer_ids, validate_eagle3_aux_layer_ids
from .layout import decoder_layers_and_depth, output_projection, target_hidden_size
from .packing import packed_attention_mask, packed_position_ids, validate_seq_lens

__all__ = ["HFEagle3TargetModel"]


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


class HFEagle3TargetModel:
    """Capture three decoder layers' outputs (= HF ``hidden_states[i + 1]``) and the logits of a causal LM.

    Args:
        model: a Hugging Face causal LM (or image-text-to-text model run on text). It is put in
            eval mode; its parameters are not modified.
        aux_layer_ids: the three layers to capture (low, mid, high); default ``[1, L//2 - 1, L - 4]``.
            Validated before anything is registered on the model.
    """

    def __init__(self, model: nn.Module, aux_layer_ids: Sequence[int] | None = None) -> None:
        self.model = model.eval()
        self._layers, self._num_layers = decoder_layers_and_depth(model)
        ids = default_eagle3_aux_layer_ids(self._num_layers) if aux_layer_ids is None else aux_layer_ids
        self._aux_layer_ids = validate_eagle3_aux_layer_ids(ids, self._num_layers)

    @property
    def aux_layer_ids(self) -> list[int]:
        """The captured decoder layers, in concatenation order (HF ``hidden_states[i + 1]`` convention)."""
        return list(self._aux_layer_ids)

    @property
    def num_layers(self) -> int:
        """Decoder depth L from the (text) config."""
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        """Decoder hidden size H (aux features are ``3H`` wide): ``hidden_size`` of the text config."""
        return target_hidden_size(self.model)

    @property
    def vocab_size(self) -> int:
        """Logit width V, read from the output projection (may exceed the tokenizer's vocabulary)."""
        return int(self.output_projection()[0].shape[0])

    def get_input_embeddings(self) -> nn.Embedding:
        """The target's input embedding module (``weight [V, H]``), to initialise the draft's."""
        return self.model.get_input_embeddings()

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, H], bias [V] or None)`` of the target's lm_head."""
        return output_projection(self.model)

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def forward_capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        capture_final_hidden: bool = False,
        past_key_values: Any = None,
    ) -> TargetForward:
        """Run the target once; return UNSHIFTED ``logits [B,S,V]``, ``aux [B,S,3H]``, ``final_hidden [B,S,H]``.

        ``final_hidden`` (the lm_head input) is captured only with ``capture_final_hidden``, else None.

        With ``seq_lens [B, max_docs]`` the rows are packed documents: the target runs with a
        block-causal ``[B, 1, S, S]`` mask and per-document position ids (derived from
        ``seq_lens`` when ``position_ids`` is None), so each document's outputs equal running it
        alone; ``attention_mask`` is then not used for the forward.

        ``past_key_values`` (a transformers ``Cache``) continues a sequence incrementally, as
        speculative decoding's verify step does; the updated cache comes back on the result.
        """
        check_sequence_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        device = self._device()
        input_ids, attention_mask, position_ids = (_to(t, device) for t in (input_ids, attention_mask, position_ids))
        model_mask: torch.Tensor | dict[str, torch.Tensor] = attention_mask
        if seq_lens is not None:
            batch, seq = input_ids.shape
            seq_lens = seq_lens.to(device)
            validate_seq_lens(seq_lens, seq, batch)
            if position_ids is None:
                position_ids = packed_position_ids(seq_lens, seq)
            dtype = self.model.get_input_embeddings().weight.dtype
            model_mask = packed_attention_mask(self.model.config, seq_lens, seq, dtype)
        return run_with_capture(
            self.model,
            self._layers,
            self._aux_layer_ids,
            input_ids=input_ids,
            attention_mask=model_mask,
            position_ids=position_ids,
            capture_final_hidden=capture_final_hidden,
            past_key_values=past_key_values,
        )

    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Eagle3TargetBatch:
        """Run the target and return the shifted EAGLE-3 batch (logits encoding).

        ``logits``, ``input_ids`` and ``loss_mask`` are shifted left by one with a zero tail;
        ``aux_hidden_states`` and ``attention_mask`` stay position-aligned. Packing fields are
        passed through unshifted; with ``seq_lens`` and no ``position_ids`` the batch carries the
        derived per-document position ids.
        """
        check_sequence_inputs(
            input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            position_ids=position_ids,
            doc_remaining=doc_remaining,
        )
        device = self._device()
        if seq_lens is not None and position_ids is None:
            validate_seq_lens(seq_lens, input_ids.size(1), input_ids.size(0))
            position_ids = packed_position_ids(seq_lens.to(device), input_ids.size(1))
        out = self.forward_capture(input_ids, attention_mask, position_ids=position_ids, seq_lens=seq_lens)
        return shifted_eagle3_batch(
            logits=out.logits,
            aux_hidden_states=out.aux_hidden_states,
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            loss_mask=loss_mask.to(device),
            position_ids=_to(position_ids, device),
            seq_lens=_to(seq_lens, device),
            doc_remaining=_to(doc_remaining, device),
        )
