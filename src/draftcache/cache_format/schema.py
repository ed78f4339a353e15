"""Names and constants of the cache format (``FORMAT_VERSION``): file names, tensor names, dtypes, encodings.

Everything that writes or reads a cache takes these names from here, so the layout is
declared once. The layout itself is described in this package's ``README.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "KINDS",
    "KIND_SHIFT",
    "LM_HEAD_ENCODINGS",
    "MANIFEST_FILE",
    "LOCK_FILE",
    "ENCODINGS",
    "STORAGE_DTYPES",
    "SIDE_FILES",
    "shard_filename",
    "shard_metadata",
    "side_filename",
    "storage_dtype",
    "encoding_tensors",
    "expected_shard_tensors",
    "load_manifest_schema",
]

FORMAT_VERSION = 2  # 2: shard_boundaries / max_shard_bytes, draft_vocab.special_token_ids, supervision.rebuild_max_abs_prob_diff
KIND = "eagle3"  # the default kind
# Cache kinds and how their per-position data is aligned: eagle3 rows are shifted by the reader
# (slot t reads position t+1's target); dflash is never shifted (the block mask aligns).
KIND_SHIFT: dict[str, str] = {"eagle3": "left_by_one", "dflash": "none"}
KINDS = tuple(KIND_SHIFT)
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"

# Supervision encodings and the target-side tensors each stores per supervised row.
ENCODINGS: dict[str, tuple[str, ...]] = {
    "probs": ("target_probs",),  # [M, Vd] storage dtype
    "topk": ("topk_probs", "topk_ids"),  # [M, k] storage dtype, [M, k] int32
    "hidden": ("final_hidden",),  # [M, H] storage dtype
    # dflash only: target_argmax [M] alone, the target's greedy token FOR each supervised position
    # (argmax of the logits one position earlier), which is what greedy verification accepts
    "argmax": (),
}

# Encodings whose caches store the target's lm_head (side file ``lm_head``): hidden rebuilds logits
# from it; argmax (dflash) needs it because the draft computes its logits with the target's lm_head.
LM_HEAD_ENCODINGS = ("hidden", "argmax")

STORAGE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Side files written once per cache: name -> tensors they hold.
SIDE_FILES: dict[str, tuple[str, ...]] = {
    "target_embeddings": ("weight",),  # [V, H]
    "lm_head": ("weight", "bias"),  # [V, H], optional [V]; LM_HEAD_ENCODINGS only
}

# Tensors every shard holds, in file order (the encoding's tensors follow).
SHARD_TENSORS = ("input_ids", "loss_mask", "sample_offsets", "aux_hidden_states", "supervised_offsets", "target_argmax")


def shard_filename(index: int) -> str:
    """``shard-000042.safetensors`` for shard index 42."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0; got {index}")
    return f"shard-{index:06d}.safetensors"


def side_filename(name: str) -> str:
    """``target_embeddings.safetensors`` for side file ``target_embeddings``."""
    return f"{name}.safetensors"


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest ``dtype`` string (``bf16`` | ``fp16`` | ``fp32``)."""
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown storage dtype {name!r}; expected one of {sorted(STORAGE_DTYPES)}") from None


def encoding_tensors(encoding: str) -> tuple[str, ...]:
    """The names of the target-side tensors of ``encoding``."""
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unknown supervision encoding {encoding!r}; expected one of {sorted(ENCODINGS)}") from None


def expected_shard_tensors(manifest: Mapping[str, Any], entry: Mapping[str, Any]
                           ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` that the shard of manifest ``entry`` must hold."""
    n, tokens, rows = entry["num_samples"], entry["num_tokens"], entry["num_supervised"]
    dtype = storage_dtype(manifest["dtype"])
    encoding = manifest["supervision"]["encoding"]
    hidden = manifest["target"]["hidden_size"]
    width = {"probs": manifest["draft_vocab"]["size"], "topk": manifest["supervision"]["topk"], "hidden": hidden,
             "argmax": 0}
    expected = {
        "input_ids": (torch.int32, (tokens,)),
        "loss_mask": (torch.uint8, (tokens,)),
        "sample_offsets": (torch.int64, (n + 1,)),
        "aux_hidden_states": (dtype, (tokens, len(manifest["capture"]["layer_ids"]) * hidden)),
        "supervised_offsets": (torch.int64, (n + 1,)),
        "target_argmax": (torch.int32, (rows,)),
    }
    for name in encoding_tensors(encoding):
        expected[name] = (torch.int32 if name == "topk_ids" else dtype, (rows, width[encoding]))
    return expected


def shard_metadata(first_sample: int, num_samples: int) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a shard."""
    return {"format_version": str(FORMAT_VERSION), "first_sample": str(first_sample), "num_samples": str(num_samples)}


def load_manifest_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json`` (``schemas/cache_manifest.v<FORMAT_VERSION>.schema.json``)."""
    name = f"cache_manifest.v{FORMAT_VERSION}.schema.json"
    try:
        text = resources.files(__package__).joinpath("schemas", name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"the packaged manifest schema draftcache/cache_format/schemas/{name} is missing: the "
                                "package was built without it (package-data must include "
                                "'cache_format/schemas/*.json'); reinstall draftcache") from None
    return json.loads(text)
