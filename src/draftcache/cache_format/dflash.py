"""DFlash caches (``kind: "dflash"``): turn stored rows into the DFlash trainer's packed row.

A DFlash cache stores, per sample, the concatenated outputs of the chosen target layers at
every position (``aux_hidden_states [S, F]``, UNSHIFTED: the block mask aligns), ``input_ids``,
``loss_mask`` and, per supervised position ``q`` (``loss_mask[q] == 1``), ``target_argmax``: the
target's greedy token FOR ``q``, i.e. the argmax of its logits at ``q - 1`` (the data token at
``q = 0``, which no block ever predicts). That is exactly what the DFlash loss labels slot
``k`` of a block anchored at ``p`` with (position ``p + k``, counted only if supervised), and
what greedy verification accepts. With ``supervision.encoding == "hidden"`` (``precompute-eagle3
--method dflash --supervision hidden``) each supervised row also holds ``final_hidden [M, H]``, the
target's lm_head input at ``q - 1``, aligned as ``target_argmax``: the target's distribution for
``q`` is ``softmax(lm_head(final_hidden))``, rebuilt at read time with the cache's ``lm_head`` side
file (``CacheReader.logits_from_final_hidden``), ``H`` values per row instead of ``V``.
"""

from __future__ import annotations

import torch

from draftcache.cache_format.fp8 import stored_rows_on

__all__ = ["expand_dflash_raw"]


def expand_dflash_raw(raw: dict[str, torch.Tensor], device: torch.device | str | None = None
                      ) -> dict[str, torch.Tensor]:
    """A raw batch of a dflash cache (``get_raw_batch`` / ``collate_raw``; only its concatenated
    fields and ``sample_offsets`` are used) as ONE packed row of its ``n`` samples, ``N`` tokens:

        input_ids          [1, N]     int64          the samples' tokens, concatenated
        loss_mask          [1, N]     int64          stored loss_mask (unshifted)
        aux_hidden_states  [1, N, F]  storage dtype  target layer outputs (unshifted); an fp8 cache's are
                                                     dequantized to bf16 on ``device``, after the copy
        target_argmax      [1, N]     int64          slot t = the target's greedy token for t + 1 where
                                                     t + 1 is supervised and in the same sample, else 0
        seq_lens           [1, n]     int64          sample lengths (document boundaries)
        final_hidden       [1, N, H]  float32        ``hidden`` caches only: slot t = the target's lm_head input
                                                     at t, where t + 1 is supervised and in the same sample, else 0

    This is the batch ``draftcache train --method dflash`` builds online from a co-located target
    (where slot t holds the argmax at every t; the loss reads only the supervised ones).
    """
    device = torch.device(device) if device is not None else raw["input_ids"].device
    offsets = raw["sample_offsets"].cpu()                       # [n+1]
    lengths = offsets[1:] - offsets[:-1]                        # [n]
    ids = raw["input_ids"].to(device).long()                    # [N]
    mask = raw["loss_mask"].to(device).long()                   # [N]
    rows = raw["target_argmax"].to(device).long()               # [M]
    total = ids.numel()
    starts = torch.repeat_interleave(offsets[:-1], lengths).to(device)      # [N] start of each token's sample
    local = torch.arange(total, device=device) - starts                     # [N] position inside the sample
    supervised = mask.bool()
    slot = torch.arange(total, device=device)[supervised] - 1              # [M] t = q - 1
    keep = local[supervised] >= 1                                          # q = 0 predicts nothing
    argmax = torch.zeros(total, dtype=torch.int64, device=device)
    argmax[slot[keep]] = rows[keep]
    extra = {}
    if "final_hidden" in raw:
        hidden = stored_rows_on(raw, "final_hidden", device, torch.float32).float()   # [M, H]
        rows_h = torch.zeros(total, hidden.shape[1], dtype=torch.float32, device=device)
        rows_h[slot[keep]] = hidden[keep]
        extra["final_hidden"] = rows_h[None]
    return {
        **extra,
        "input_ids": ids[None],
        "loss_mask": mask[None],
        "aux_hidden_states": stored_rows_on(raw, "aux_hidden_states", device)[None],
        "target_argmax": argmax[None],
        "seq_lens": lengths.to(device)[None],
    }
