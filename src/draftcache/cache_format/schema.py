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

from draftcache.cache_format.fp8 import FP8_DTYPE, QUANTIZED_TENSORS, SCALE_DTYPE, scale_name

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "KINDS",
    "KIND_SHIFT",
    "KIND_ENCODINGS",
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
    "supervision_dtype",
    "read_dtype",
    "is_quantized",
    "quantized_tensors",
    "shard_tensor_specs",
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

# Encodings each kind may use: a dflash cache stores the argmax, and with ``hidden`` also the final
# hidden state of the position before each supervised one (its distribution, via the lm_head side file)
KIND_ENCODINGS: dict[str, tuple[str, ...]] = {"eagle3": ("probs", "topk", "hidden"), "dflash": ("argmax", "hidden")}

# Encodings whose caches store the target's lm_head (side file ``lm_head``): hidden rebuilds logits
# from it; argmax (dflash) needs it because the draft computes its logits with the target's lm_head.
LM_HEAD_ENCODINGS = ("hidden", "argmax")

# fp8: aux_hidden_states / final_hidden as float8_e4m3fn with a float32 scale per row (fp8.py; a
# final_hidden whose fp8 rebuild misses the tolerance stays bf16, see quantized_tensors); probability rows (probs / topk) stay bf16, a probability of 1e-3 has no fp8 headroom to spare
STORAGE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                          "fp8": FP8_DTYPE}

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


def is_quantized(name: str) -> bool:
    """Whether manifest ``dtype`` ``name`` stores hidden states as fp8 values + per-row scales."""
    return storage_dtype(name) == FP8_DTYPE


def quantized_tensors(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensors a cache stores as fp8 + per-row scale: the keys of ``quantization.scales`` of an
    fp8 ``manifest`` (``aux_hidden_states`` always; ``final_hidden`` unless its fp8 rebuild missed
    the tolerance and it is stored bf16), () for other dtypes. A manifest being planned, without
    its ``quantization`` block yet, counts as quantizing all of ``QUANTIZED_TENSORS``."""
    if not is_quantized(manifest["dtype"]):
        return ()
    if "quantization" not in manifest:
        return QUANTIZED_TENSORS
    return tuple(name for name in QUANTIZED_TENSORS if name in manifest["quantization"]["scales"])


def supervision_dtype(name: str) -> torch.dtype:
    """The dtype of ``target_probs`` / ``topk_probs`` rows (and eagle3 ``target_embeddings``) of a
    cache whose manifest ``dtype`` is ``name``: the storage dtype, bf16 for ``fp8``."""
    return torch.bfloat16 if is_quantized(name) else storage_dtype(name)


def read_dtype(name: str) -> torch.dtype:
    """The dtype a reader hands ``aux_hidden_states`` out in: the storage dtype, bf16 (dequantized
    on the training device) for ``fp8``."""
    return torch.bfloat16 if is_quantized(name) else storage_dtype(name)


def encoding_tensors(encoding: str) -> tuple[str, ...]:
    """The names of the target-side tensors of ``encoding``."""
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unknown supervision encoding {encoding!r}; expected one of {sorted(ENCODINGS)}") from None


def shard_tensor_specs(manifest: Mapping[str, Any], num_samples: int, num_tokens: int, num_supervised: int
                       ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``[(name, dtype, shape)]`` of every tensor of a shard of ``manifest``'s cache with these
    counts: the shard tensors, the encoding's, then (``fp8``) the scales of the quantized ones
    (``quantized_tensors``; an fp8 cache's other float rows are bf16)."""
    n, tokens, rows = num_samples, num_tokens, num_supervised
    quantized = quantized_tensors(manifest)
    dtype = storage_dtype(manifest["dtype"])
    encoding = manifest["supervision"]["encoding"]
    hidden = manifest["target"]["hidden_size"]
    layers = len(manifest["capture"]["layer_ids"])
    width = {"probs": manifest["draft_vocab"]["size"], "topk": manifest["supervision"]["topk"], "hidden": hidden,
             "argmax": 0}
    specs = [
        ("input_ids", torch.int32, (tokens,)),
        ("loss_mask", torch.uint8, (tokens,)),
        ("sample_offsets", torch.int64, (n + 1,)),
        ("aux_hidden_states", dtype, (tokens, layers * hidden)),
        ("supervised_offsets", torch.int64, (n + 1,)),
        ("target_argmax", torch.int32, (rows,)),
    ]
    for name in encoding_tensors(encoding):
        row_dtype = torch.int32 if name == "topk_ids" else dtype if name in quantized else \
            supervision_dtype(manifest["dtype"])
        specs.append((name, row_dtype, (rows, width[encoding])))
    shapes = {name: shape for name, _, shape in specs}
    groups = {"aux_hidden_states": layers, "final_hidden": 1}
    specs += [(scale_name(name), SCALE_DTYPE, (shapes[name][0], groups[name])) for name in quantized if name in shapes]
    return specs


def expected_shard_tensors(manifest: Mapping[str, Any], entry: Mapping[str, Any]
                           ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` that the shard of manifest ``entry`` must hold."""
    specs = shard_tensor_specs(manifest, entry["num_samples"], entry["num_tokens"], entry["num_supervised"])
    return {name: (dtype, shape) for name, dtype, shape in specs}


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
