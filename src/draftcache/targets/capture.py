"""Run a frozen HF causal LM once and capture chosen decoder-layer outputs with forward hooks.

The hooks live only for the duration of one forward and are removed in a ``finally`` block, so
a forward that raises leaves the model without stray hooks.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["TargetForward", "CaptureError", "run_with_capture", "kv_cache_kwargs", "returned_kv_cache"]


def kv_cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the keyword this model's ``forward`` takes its KV cache by:
    ``cache`` (transformers 5.25 and later, which deprecate ``past_key_values``) or
    ``past_key_values`` (earlier releases, such as the one the vLLM environment pins)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_kv_cache(outputs: Any) -> Any:
    """The KV cache a forward returned (``outputs.cache``, or ``outputs.past_key_values`` before
    transformers 5.25); None when it returned none."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


class CaptureError(RuntimeError):
    """A forward finished without firing a hook we registered (the layer was never run)."""


@dataclass
class TargetForward:
    """Unshifted, position-aligned outputs of one target forward.

    Attributes:
        logits: ``[B, S, V]`` full-vocab logits; ``logits[:, t]`` predicts ``x_{t+1}``.
        aux_hidden_states: ``[B, S, n*H]`` outputs of the captured decoder layers concatenated on
            the feature dim in the requested layer order (``n = 3`` for EAGLE-3).
        final_hidden: ``[B, S, H]`` input of the output projection (after the final norm), when
            requested, else None; ``final_hidden @ W.T (+ b) == logits``.
    """

    logits: torch.Tensor
    aux_hidden_states: torch.Tensor
    final_hidden: torch.Tensor | None = None
    past_key_values: Any = None  # the model's KV cache, when the forward was run with one


def _layer_output(output: Any) -> torch.Tensor:
    # transformers 5.x decoder layers return a tensor; 4.x (and many custom layers) a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


def run_with_capture(
    model: nn.Module,
    layers: Sequence[nn.Module],
    layer_ids: Sequence[int],
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,
    position_ids: torch.Tensor | None = None,
    capture_final_hidden: bool = False,
    past_key_values: Any = None,
) -> TargetForward:
    """Run ``model`` once under ``torch.no_grad`` and capture ``layers[i]``'s output for ``i in layer_ids``.

    ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be saved for
    backward, and the trainer feeds the captured states into trainable layers.
    """
    captured: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []
    handles = []

    def make_hook(layer_id: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[layer_id] = _layer_output(output)

        return hook

    def final_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        final.append(args[0] if args else kwargs["input"])

    try:
        for layer_id in layer_ids:
            handles.append(layers[layer_id].register_forward_hook(make_hook(layer_id)))
        if capture_final_hidden:
            head = model.get_output_embeddings()
            if head is None:
                raise CaptureError(
                    f"{type(model).__name__}.get_output_embeddings() is None; cannot capture final_hidden"
                )
            handles.append(head.register_forward_pre_hook(final_hook, with_kwargs=True))
        with torch.no_grad():
            # only a decoding caller (speculative verify) passes a cache; plain capture keeps the
            # model's call signature minimal so custom layouts without cache support still work
            cache_kwargs = kv_cache_kwargs(model, past_key_values) if past_key_values is not None else {}
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=past_key_values is not None,
                **cache_kwargs,
            )
    finally:
        for handle in handles:
            handle.remove()

    missing = [i for i in layer_ids if i not in captured]
    if missing:
        raise CaptureError(
            f"decoder layers {missing} did not run during the forward of {type(model).__name__}; "
            "check that the model's forward iterates over all of its layers"
        )
    if capture_final_hidden and len(final) != 1:
        raise CaptureError(f"the output projection ran {len(final)} times in one forward; expected exactly once")
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    # a target split over devices (device_map) runs its layers where they live: gather the
    # captured states on the device of the logits
    aux = torch.cat([captured[i].to(logits.device) for i in layer_ids], dim=-1)  # [B, S, n*H]
    return TargetForward(
        logits=logits,
        aux_hidden_states=aux,
        final_hidden=final[0].to(logits.device) if capture_final_hidden else None,
        past_key_values=returned_kv_cache(outputs) if past_key_values is not None else None,
    )
