"""Write and read a DFlash draft directory that vLLM serves as is (``method: "dflash"``).

``config.json`` is :meth:`DFlashDraftConfig.to_hf_config` (+ ``torch_dtype`` and a
``draftcache`` section); ``model.safetensors`` holds the trained tensors under the names
vLLM's ``DFlashQwen3ForCausalLM.load_weights`` reads (``fc.*``, ``hidden_norm.*``,
``layers.N.*``, ``norm.*``; it prefixes ``model.``). The target's embeddings and lm_head
are NOT written: the loader marks a draft without ``embed_tokens`` / ``lm_head`` tensors as
not owning them and the proposer then shares the target's (``_maybe_share_embeddings`` /
``_maybe_share_lm_head``), which is exactly what the draft was trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from draftcache.cache_format import atomic_write_bytes
from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.model import DFlashDraftModel

__all__ = ["DFLASH_EXPORT_FORMAT", "DSPARK_EXPORT_FORMAT", "export_dflash_draft", "load_exported_dflash_draft", "is_dflash_export",
           "block_draft_method",
           "vllm_cpu_k_norm_warning"]

DFLASH_EXPORT_FORMAT = "dflash"
DSPARK_EXPORT_FORMAT = "dspark"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def export_dflash_draft(
    model: DFlashDraftModel,
    output_dir: str | os.PathLike[str],
    *,
    target_model_id: str | None = None,
    dtype: torch.dtype | None = None,
    mask_token: dict | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``output_dir`` (each atomically).

    ``mask_token`` (``MaskTokenChoice.as_dict()``: which token marks masked slots and why) is
    recorded under ``config.json``'s ``draftcache.mask_token``.

    Serve with ``speculative_config={"method": "dflash", "model": output_dir,
    "num_speculative_tokens": block_size - 1}``; a DSpark draft (``markov_rank > 0``, architecture
    ``Qwen3DSparkModel``, its ``markov_head.*`` / ``confidence_head.*`` tensors named as
    ``Qwen3DSparkForCausalLM.load_weights`` reads them) with ``{"method": "dspark", ...,
    "num_speculative_tokens": block_size}`` (vLLM's GPU runner only).
    """
    dtype = dtype or model.fc.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"export dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    config: dict[str, Any] = model.config.to_hf_config()
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    config["draftcache"] = {"format": DSPARK_EXPORT_FORMAT if model.config.is_dspark else DFLASH_EXPORT_FORMAT, "target_model": target_model_id,
                            "target_layer_convention": "decoder-layer output i = HF hidden_states[i + 1]"}
    if mask_token is not None:
        config["draftcache"]["mask_token"] = dict(mask_token)
    tensors = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous().clone()
               for name, t in model.exported_state_dict().items()}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    return out


def is_dflash_export(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory/config.json`` describes a block draft (DFlash or DSpark: both carry ``dflash_config``)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "dflash_config" in data


def block_draft_method(directory: str | os.PathLike[str]) -> str | None:
    """``"dspark"`` or ``"dflash"`` for a block-draft export in ``directory``, else None."""
    if not is_dflash_export(directory):
        return None
    data = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    return "dspark" if data.get("markov_rank") else "dflash"


def load_exported_dflash_draft(directory: str | os.PathLike[str], target: torch.nn.Module) -> DFlashDraftModel:
    """Rebuild an exported draft; ``target`` (a HF causal LM) supplies embeddings and lm_head."""
    directory = Path(directory)
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; pass a directory written by draftcache export") from exc
    model = DFlashDraftModel.from_target(DFlashDraftConfig.from_hf_config(data), target)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    expected = set(model.exported_state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the block draft of its config.json: "
                         f"missing {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors, strict=False)
    return model.to(dtype=next(iter(tensors.values())).dtype)


def vllm_cpu_k_norm_warning(directory: str | os.PathLike[str]) -> str | None:
    """A warning when the export in ``directory`` has several layers whose ``k_norm`` weights differ.

    vLLM's CPU build normalises every layer's CONTEXT keys with layer 0's ``k_norm`` (docs/DFLASH.md),
    so such a draft is served there differently than trained (GPU builds are not affected); a draft
    trained with ``--freeze-k-norm`` keeps every layer's ``k_norm`` equal and is served as trained.
    """
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    names = sorted((n for n in tensors if n.startswith("layers.") and n.endswith(".self_attn.k_norm.weight")),
                   key=lambda n: int(n.split(".")[1]))
    differ = [n for n in names[1:] if not torch.equal(tensors[n], tensors[names[0]])]
    if not differ:
        return None
    return (f"warning: this {len(names)}-layer DFlash draft has per-layer k_norm weights ({', '.join(differ)} differ "
            f"from {names[0]}); vLLM's CPU build normalises every layer's context keys with layer 0's k_norm, so it "
            "serves this draft differently than trained (GPU builds are not affected). Train with --freeze-k-norm "
            "for a draft served the same on vLLM CPU.")
