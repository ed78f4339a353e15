"""The EAGLE-3 supervision contract: shift, and the target distribution over a draft vocabulary.

Every path that produces training targets (the online trainer, ``precompute-eagle3``
and the cache reader) calls these functions, so cached and online supervision
cannot drift apart.
"""

from __future__ import annotations

import torch

__all__ = ["shift_left_with_zero", "compute_target_distribution"]


def shift_left_with_zero(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shift ``tensor`` left by one along ``dim`` and zero-fill the freed tail slot.

    ``[B, S, ...] -> [B, S, ...]`` with ``out[:, t] = tensor[:, t + 1]`` and ``out[:, S-1] = 0``.
    Applied to logits, input_ids and loss_mask (never to aux hidden states or the attention mask),
    so that slot ``t`` carries the feature of position ``t``, the next token ``x_{t+1}`` and the
    target's distribution at position ``t + 1``.
    """
    head = tensor.narrow(dim, 1, tensor.size(dim) - 1)
    tail = torch.zeros_like(tensor.narrow(dim, 0, 1))
    return torch.cat([head, tail], dim=dim)


def compute_target_distribution(
    logits: torch.Tensor,
    loss_mask: torch.Tensor,
    selected_token_ids: torch.Tensor,
    t2d: torch.Tensor,
    *,
    target_argmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (already shifted) target logits onto the draft vocabulary.

    Args:
        logits: ``[..., V]`` full-vocab target logits, or ``[..., Vd]`` when ``target_argmax``
            is given and the logits were computed for the draft vocabulary only.
        loss_mask: ``[...]`` 0/1 mask of supervised slots (already shifted).
        selected_token_ids: ``[Vd]`` int64 target ids of the draft vocabulary.
        t2d: ``[V]`` bool, True where a target id is in the draft vocabulary.
        target_argmax: ``[...]`` full-vocab argmax when ``logits`` is draft-vocab only
            (the cache stores it exactly so ``hidden``/``topk`` caches can rebuild the mask).

    Returns:
        ``target_probs [..., Vd]`` float32: softmax over the draft-vocab logits (renormalised
        over the draft vocabulary, not full-vocab probabilities restricted), and
        ``position_mask [..., 1]`` bool: the target's argmax lies in the draft vocabulary AND
        the slot is supervised.
    """
    if target_argmax is None:
        target_argmax = logits.argmax(dim=-1)
        draft_logits = logits.index_select(-1, selected_token_ids.to(logits.device))
    else:
        draft_logits = logits
    in_draft = t2d.to(target_argmax.device)[target_argmax]
    position_mask = (in_draft & loss_mask.bool()).unsqueeze(-1)
    target_probs = torch.softmax(draft_logits.float(), dim=-1)
    return target_probs, position_mask
