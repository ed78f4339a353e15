"""P-EAGLE (parallel drafting) pieces that are not the model or the loss: the mask token.

The ``K - 1`` mask slots of a P-EAGLE round read ``mask_token_id`` through the draft's (frozen,
target-copied) embedding. A zero embedding row would make every mask slot's token input zero
(HF models keep the ``padding_idx`` row at zero), so the default is a token the training data never
contains whose target embedding row is non-zero, and never a special token (bos/eos/pad/unk).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["choose_mask_token_id"]


def choose_mask_token_id(embeddings: torch.Tensor, used_ids: Iterable[int], special_ids: Iterable[int] = ()) -> int:
    """The highest token id whose row of ``embeddings [V, H]`` is non-zero, that is not in
    ``special_ids`` and, when such an id exists, never occurs in ``used_ids`` (the training tokens).

    Raises ``ValueError`` when every row is zero or special (pass ``--mask-token-id``)."""
    nonzero = embeddings.detach().float().abs().sum(-1) > 0  # [V]
    allowed = nonzero.clone()
    specials = [int(i) for i in special_ids if 0 <= int(i) < allowed.numel()]
    allowed[specials] = False
    unused = allowed.clone()
    used = torch.as_tensor(sorted({int(i) for i in used_ids}), dtype=torch.long)
    if used.numel():
        unused[used[(used >= 0) & (used < unused.numel())]] = False
    for candidates in (unused, allowed):
        ids = candidates.nonzero().flatten()
        if ids.numel():
            return int(ids[-1])
    raise ValueError("no token has a non-zero, non-special target embedding row to serve as the P-EAGLE mask token; "
                     "pass --mask-token-id")
