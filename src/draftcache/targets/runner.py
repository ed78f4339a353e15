"""Engine-agnostic EAGLE-3 target: the supervision contract on top of a pluggable runner.

A :class:`TargetRunner` is the narrow surface an inference engine implements (an SGLang or vLLM
adapter lives in its own module and imports its engine lazily; nothing here imports one).
:class:`RunnerEagle3TargetModel` turns a runner's unshifted outputs into the same shifted
:class:`Eagle3TargetBatch` as :class:`HFEagle3TargetModel`, through the same function.
:class:`HFTargetRunner` is a real runner backed by a Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .batch import Eagle3TargetBatch, TargetBatchError, check_sequence_inputs, shifted_eagle3_batch
from .capture import run_with_capture
from .layer_ids import default_eagle3_aux_layer_ids, validate_eagle3_aux_layer_ids
from .layout import decoder_layers_and_depth, num_hidden_layers

__all__ = ["TargetRunner", "RunnerEagle3TargetModel", "HFTargetRunner", "RunnerError"]


class RunnerError(RuntimeError):
    """A runner was used out of order (closed, no aux layers set) or returned mis-shaped outputs."""


@runtime_checkable
class TargetRunner(Protocol):
    """What an inference engine must offer to serve as an EAGLE-3 target.

    Attributes:
        model: an object exposing ``.config`` (a HF-style config) and ``.parameters()``.
    """

    model: Any

    def set_aux_layers(self, ids: Sequence[int]) -> None:
        """Capture the outputs of these three decoder layers (HF ``hidden_states[i + 1]`` convention)."""
        ...

    def forward_eagle3(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run once; return UNSHIFTED ``(logits [B, S, V], aux_hidden_states [B, S, 3H])``."""
        ...

    def input_embedding_weight(self) -> torch.Tensor:
        """The target's input embedding weight ``[V, H]``."""
        ...


@dataclass(frozen=True)
class _EmbeddingWeight:
    """Stand-in for an ``nn.Embedding`` where only ``.weight [V, H]`` is read (draft initialisation)."""

    weight: torch.Tensor


class HFTargetRunner:
    """A :class:`TargetRunner` that runs a Hugging Face causal LM in-process with forward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self._layers, self._num_layers = decoder_layers_and_depth(model)
        self._aux_layer_ids: list[int] | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RunnerError("HFTargetRunner is closed; build a new runner")

    def set_aux_layers(self, ids: Sequence[int]) -> None:
        self._check_open()
        self._aux_layer_ids = validate_eagle3_aux_layer_ids(ids, self._num_layers)

    def forward_eagle3(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_open()
        if self._aux_layer_ids is None:
            raise RunnerError("call set_aux_layers(ids) before forward_eagle3")
        device = self.model.get_input_embeddings().weight.device
        out = run_with_capture(
            self.model,
            self._layers,
            self._aux_layer_ids,
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
        )
        return out.logits, out.aux_hidden_states

    def input_embedding_weight(self) -> torch.Tensor:
        self._check_open()
        return self.model.get_input_embeddings().weight

    def close(self) -> None:
        """Drop this runner's references to the model so its memory can be freed."""
        self.model = None
        self._layers = []
        self._closed = True


class RunnerEagle3TargetModel:
    """EAGLE-3 target backend over any :class:`TargetRunner`; batches match ``HFEagle3TargetModel`` exactly.

    Args:
        runner: a loaded runner.
        aux_layer_ids: three layers to capture; default ``[1, L//2 - 1, L - 4]`` with L from
            ``runner.model.config``. Validated before the runner is told.
    """

    def __init__(self, runner: TargetRunner, aux_layer_ids: Sequence[int] | None = None) -> None:
        if not isinstance(runner, TargetRunner):
            raise TypeError(
                f"{type(runner).__name__} does not implement TargetRunner (needs model, set_aux_layers, "
                "forward_eagle3, input_embedding_weight)"
            )
        self.runner = runner
        self._num_layers = num_hidden_layers(runner.model.config)
        ids = default_eagle3_aux_layer_ids(self._num_layers) if aux_layer_ids is None else aux_layer_ids
        self._aux_layer_ids = validate_eagle3_aux_layer_ids(ids, self._num_layers)
        runner.set_aux_layers(list(self._aux_layer_ids))

    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self._aux_layer_ids)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def get_input_embeddings(self) -> _EmbeddingWeight:
        """An object exposing ``.weight [V, H]``, the target's input embeddings."""
        return _EmbeddingWeight(self.runner.input_embedding_weight())

    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Eagle3TargetBatch:
        """Run the runner and return the shifted EAGLE-3 batch (same semantics as ``HFEagle3TargetModel``).

        Rows are assumed right-padded (``loss_mask`` zeros the pad). Packing is not supported:
        the runner's forward takes no position ids or block mask.
        """
        given = [
            n
            for n, v in (("position_ids", position_ids), ("seq_lens", seq_lens), ("doc_remaining", doc_remaining))
            if v is not None
        ]
        if given:
            raise ValueError(
                f"RunnerEagle3TargetModel does not support packed rows (got {', '.join(given)}); "
                "use HFEagle3TargetModel for packing or pass unpacked, right-padded rows"
            )
        check_sequence_inputs(input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
        logits, aux = self.runner.forward_eagle3(input_ids, attention_mask)
        batch, seq = input_ids.shape
        for name, value in (("logits", logits), ("aux_hidden_states", aux)):
            if value.dim() != 3 or tuple(value.shape[:2]) != (batch, seq):
                raise TargetBatchError(
                    f"{type(self.runner).__name__}.forward_eagle3 returned {name} of shape "
                    f"{tuple(value.shape)}; expected [B, S, ...] with B, S = {batch}, {seq}"
                )
        device = logits.device
        return shifted_eagle3_batch(
            logits=logits,
            aux_hidden_states=aux,
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            loss_mask=loss_mask.to(device),
        )

    def close(self) -> None:
        """Release the runner (its ``close()`` when it has one)."""
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()
