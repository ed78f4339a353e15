"""Where shards begin: a function of the global sample order and each sample's size only.

A shard holds at most ``shard_size`` samples and, with a byte cap, at most ``max_shard_bytes``
bytes of tensor data (a sample larger than the cap alone gets a shard of its own). The bytes a
sample adds to a shard are known before the target runs, from its token count ``S`` and its
supervised count ``M``:

    S * (4 + 1 + F * d)                 input_ids int32, loss_mask uint8, aux_hidden_states [S, F]
    + M * (4 + row bytes)               target_argmax int32, the encoding's row (see ``row_bytes``)
    + 16                                its entries in sample_offsets and supervised_offsets (int64)

so every rank of a distributed run, and a resumed run, computes the same boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from draftcache.cache_format.schema import quantized_tensors, storage_dtype, supervision_dtype

__all__ = ["SampleBytes", "plan_shard_boundaries"]


class SampleBytes:
    """Bytes one sample adds to a shard of a cache described by ``manifest`` (sections ``dtype``,
    ``capture``, ``target``, ``supervision``, ``draft_vocab``)."""

    def __init__(self, manifest: Mapping[str, Any]):
        item = storage_dtype(manifest["dtype"]).itemsize
        prob_item = supervision_dtype(manifest["dtype"]).itemsize
        quantized = quantized_tensors(manifest)
        scale = 4 if quantized else 0                                   # fp8: a float32 scale per row
        hidden = int(manifest["target"]["hidden_size"])
        layers = len(manifest["capture"]["layer_ids"])
        aux = layers * hidden
        encoding = manifest["supervision"]["encoding"]
        if encoding == "probs":
            row = int(manifest["draft_vocab"]["size"]) * prob_item     # target_probs [Vd]
        elif encoding == "topk":
            row = int(manifest["supervision"]["topk"]) * (prob_item + 4)  # topk_probs [k] + topk_ids [k] int32
        elif encoding == "hidden":
            fp8 = "final_hidden" in quantized                           # else bf16 rows in an fp8 cache
            row = hidden * item + scale if fp8 else hidden * prob_item  # final_hidden [H] (+ its scale)
        else:
            row = 0                                                     # argmax: target_argmax only
        self.per_token = 4 + 1 + aux * item + layers * scale
        self.per_supervised = 4 + row
        self.per_sample = 16

    def __call__(self, num_tokens: int, num_supervised: int) -> int:
        return num_tokens * self.per_token + num_supervised * self.per_supervised + self.per_sample


def plan_shard_boundaries(sizes: Iterable[int], shard_size: int, max_shard_bytes: int | None = None) -> list[int]:
    """``[num_shards + 1]`` first global sample of each shard, then the number of samples.

    ``sizes[i]`` is the bytes sample ``i`` adds (``SampleBytes``); any iterable, read once (a
    generator keeps planning a million samples from holding a million sizes). Greedy in global order: a shard
    closes when it holds ``shard_size`` samples or the next sample would take it past
    ``max_shard_bytes`` (the 16 bytes of the two leading offsets included).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1 or None; got {max_shard_bytes}")
    boundaries = [0]
    count, used, n = 0, 16, 0
    for i, size in enumerate(sizes):
        full = count == shard_size or (max_shard_bytes is not None and count and used + size > max_shard_bytes)
        if full:
            boundaries.append(i)
            count, used = 0, 16
        count += 1
        used += size
        n = i + 1
    if n:
        boundaries.append(n)
    return boundaries
