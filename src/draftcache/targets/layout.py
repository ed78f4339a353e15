"""Where a Hugging Face causal LM keeps its decoder layers, and how deep it is.

Shared by the EAGLE-3 and DFlash capture wrappers so that both hook the same modules.
Nothing here imports transformers: it only walks attributes of an ``nn.Module``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "target_hidden_size",
    "output_projection",
    "find_decoder_layers",
    "decoder_layers_and_depth",
    "text_config",
    "num_hidden_layers",
    "TargetLayoutError",
]

# Attribute paths tried in order. Multimodal models in transformers 5.x keep the text decoder
# under ``model.language_model`` (e.g. Llava, Gemma3, Qwen2-VL); GPT-2 style models under
# ``transformer.h``. Vision towers also have ``.layers`` (``model.vision_tower.encoder.layers``),
# which is why we look only at these exact paths instead of searching by name.
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),
    ("model", "language_model", "layers"),
    ("language_model", "layers"),
    ("layers",),
    ("transformer", "h"),
)


class TargetLayoutError(ValueError):
    """The model's decoder layers or depth could not be located."""


def _get_path(module: Any, path: tuple[str, ...]) -> Any | None:
    for name in path:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _as_layer_list(container: nn.Module, where: str) -> list[nn.Module]:
    if isinstance(container, nn.ModuleList):
        return list(container)
    if isinstance(container, nn.ModuleDict):
        # Custom implementations key layers by str(i); insertion order is not trusted.
        keys = list(container.keys())
        if not all(key.isdigit() for key in keys) or sorted(int(k) for k in keys) != list(range(len(keys))):
            raise TargetLayoutError(
                f"decoder layers at '{where}' are a ModuleDict with keys {keys[:8]}"
                f"{'...' if len(keys) > 8 else ''}; expected the keys '0'..'{len(keys) - 1}'"
            )
        return [container[str(i)] for i in range(len(keys))]
    raise TargetLayoutError(
        f"'{where}' is a {type(container).__name__}, expected an nn.ModuleList or an nn.ModuleDict keyed by str(i)"
    )


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Return the decoder layers of ``model`` as a plain list indexed by layer id.

    Tries ``model.model.layers``, ``model.model.language_model.layers``,
    ``model.language_model.layers``, ``model.layers`` and ``model.transformer.h``, in that order.
    A ``ModuleDict`` keyed by ``str(i)`` is returned ordered by ``int(key)``.
    """
    for path in _LAYER_PATHS:
        container = _get_path(model, path)
        if container is not None:
            return _as_layer_list(container, ".".join(path))
    tried = ", ".join(".".join(p) for p in _LAYER_PATHS)
    raise TargetLayoutError(
        f"could not find the decoder layers of {type(model).__name__}: tried {tried}. "
        "Pass a causal LM with one of these layouts."
    )


def text_config(config: Any) -> Any:
    """The language-model part of ``config``: ``config.text_config`` when present, else ``config``."""
    sub = getattr(config, "text_config", None)
    return config if sub is None else sub


def num_hidden_layers(config: Any) -> int:
    """Decoder depth L from ``config.text_config.num_hidden_layers`` or ``config.num_hidden_layers``."""
    depth = getattr(text_config(config), "num_hidden_layers", None)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
        raise TargetLayoutError(
            f"{type(config).__name__} has num_hidden_layers={depth!r}; expected a positive int "
            "(on config.text_config for multimodal models, else on config)"
        )
    return depth


def decoder_layers_and_depth(model: nn.Module) -> tuple[list[nn.Module], int]:
    """``(find_decoder_layers(model), L)`` with L from the config; raise if the model holds fewer than L layers."""
    layers = find_decoder_layers(model)
    depth = num_hidden_layers(model.config)
    if len(layers) < depth:
        raise TargetLayoutError(f"config says {depth} decoder layers but the model holds {len(layers)}")
    return layers, depth


def target_hidden_size(model: nn.Module) -> int:
    """Decoder hidden size H: ``hidden_size`` of the text config, else the input embedding width."""
    size = getattr(text_config(model.config), "hidden_size", None)
    return int(size) if size is not None else int(model.get_input_embeddings().weight.shape[1])


def output_projection(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of a causal LM's lm_head."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise TargetLayoutError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight, getattr(head, "bias", None)
