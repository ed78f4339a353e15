"""Lossless block speculative decoding (greedy) with a DFlash draft.

One round, with ``x_0..x_m`` committed, the target's KV cache covering ``x_0..x_{m-1}`` and the
target features of ``x_0..x_{m-1}`` kept as the draft's context:

1. the draft fills the block ``[x_m, mask x K]`` at positions ``m..m+K`` in ONE forward
   (``K = block_size - 1``), its slot ``k`` proposing ``d_k`` for position ``m + k``;
2. the target verifies ``[x_m, d_1..d_K]`` in one forward and predicts ``p_0..p_K``;
3. the longest prefix with ``d_i == p_{i-1}`` is accepted plus the bonus token ``p_a``; the
   target cache is cropped to ``x_m, d_1..d_a`` and their features join the context.

A DSpark draft (``markov_rank > 0``) differs in step 1 only, as vLLM's ``DSparkSpeculator`` does
it: ALL ``K = block_size`` slots propose (slot ``k`` the token for ``m + k + 1``), left to right,
each slot's logits plus the Markov bias of the token chosen at the slot before (the anchor ``x_m``
for slot 0).

Every committed token is the target's own greedy choice, so the output equals plain greedy
decoding. Counters are :class:`SpecDecodeStats` (vLLM's names), so τ and per-position
acceptance compare directly with EAGLE-3's and with vLLM's.
"""

from __future__ import annotations

import torch

from draftcache.targets import HFDFlashTargetModel
from draftcache.trainer.dflash.model import DFlashBlocks, DFlashDraftModel
from draftcache.trainer.speculative import SpecDecodeStats, emit_round, new_kv_cache

__all__ = ["dflash_propose", "dflash_speculative_generate"]


@torch.no_grad()
def dflash_propose(draft: DFlashDraftModel, context: torch.Tensor, anchor_token: int) -> list[int]:
    """``K`` greedy draft tokens for the block anchored right after ``context [1, m, n*H_t]``
    (DSpark: sampled slot by slot with the Markov step)."""
    config = draft.config
    m = context.shape[1]
    device = context.device
    ids = torch.full((1, 1, config.block_size), config.mask_token_id, dtype=torch.long, device=device)
    ids[0, 0, 0] = anchor_token
    blocks = DFlashBlocks(
        input_ids=ids,
        position_ids=(m + torch.arange(config.block_size, device=device)).view(1, 1, -1),
        context_mask=torch.ones(1, 1, m, dtype=torch.bool, device=device),
        anchor_valid=torch.ones(1, 1, dtype=torch.bool, device=device),
    )
    hidden = draft(context, torch.arange(m, device=device).view(1, -1), blocks)[0, 0]  # [Bk, H]
    if not config.is_dspark:
        return draft.compute_logits(hidden[1:]).argmax(-1).tolist()
    base = draft.compute_logits(hidden)  # [Bk, V], one projection; the Markov bias is added slot by slot
    prev = torch.tensor([anchor_token], device=device)
    proposal = []
    for k in range(config.block_size):
        token = (base[k] + draft.markov_head.bias(draft.markov_head.embed(prev))[0]).argmax(-1)
        proposal.append(int(token))
        prev = token.view(1)
    return proposal


@torch.no_grad()
def dflash_speculative_generate(
    target: HFDFlashTargetModel,
    draft: DFlashDraftModel,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    stats: SpecDecodeStats | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy block speculative decoding of ``prompt_ids [n]``; returns the new tokens (<= max_new_tokens)."""
    K = draft.config.draft_tokens
    stats = stats if stats is not None else SpecDecodeStats(draft_tokens=K)
    if stats.draft_tokens != K:
        raise ValueError(f"stats count {stats.draft_tokens} draft tokens per round, the draft proposes {K}")
    device = prompt_ids.device
    cache = new_kv_cache(target.model)
    fwd = target.forward_capture(prompt_ids.view(1, -1), past_key_values=cache)
    cache = fwd.past_key_values
    context = fwd.aux_hidden_states  # [1, n, n_layers*H_t], features of the committed tokens
    last = int(fwd.logits[0, -1].argmax())
    out = [last]
    while len(out) < max_new_tokens and last != eos_token_id:
        proposal = dflash_propose(draft, context, last)
        fwd = target.forward_capture(torch.tensor([[last] + proposal], device=device), past_key_values=cache)
        cache = fwd.past_key_values
        preds = fwd.logits[0].argmax(-1).tolist()  # p_0..p_K
        accepted = 0
        while accepted < K and proposal[accepted] == preds[accepted]:
            accepted += 1
        stats.observe_round(accepted)
        if accepted < K:
            cache.crop(-(K - accepted))  # keep x_m, d_1..d_a
        context = torch.cat([context, fwd.aux_hidden_states[:, : accepted + 1]], dim=1)
        new = proposal[:accepted] + [preds[accepted]]
        out.extend(emit_round(new, eos_token_id))
        last = out[-1]
    out = out[:max_new_tokens]
    stats.emitted_tokens += len(out) - 1  # out[0] came from the prompt's forward, not from a round
    return out
