"""Chain speculative decoding (greedy) with an EAGLE-3 draft, to measure real acceptance length.

One round, with ``x_0..x_m`` committed and the target's KV cache covering ``x_0..x_{m-1}``:

1. the draft proposes ``d_1..d_K``: its cache holds one entry per committed slot ``t`` (hidden
   ``fc(aux_t)``, token ``x_{t+1}``); each drafted token is one more entry whose hidden is the
   previous entry's pre-norm output (what TTT trains);
2. the target verifies ``[x_m, d_1..d_K]`` in one forward and predicts ``p_0..p_K``;
3. the longest prefix with ``d_i == p_{i-1}`` is accepted plus the bonus token ``p_a``; both
   caches are cropped to what was accepted, and the verify forward's aux states become the
   draft's new context entries.

P-EAGLE drafts (``draft.config.parallel_drafting``) replace step 1's chain by one forward, as
vLLM's parallel drafting does: the new context entries (the last one holds the bonus token with
the target's feature) are followed by ``K - 1`` mask slots (``mask_token_id``,
``mask_hidden_state()``) at the next positions, attending causally; the ``K`` draft tokens are the
argmaxes of the last context entry and the mask slots. The mask slots are then dropped from the
draft cache (vLLM overwrites their KV slots with the next round's context entries).
``stats.draft_forwards`` counts drafter forwards: ``K`` per round for chains, 1 for P-EAGLE.

Every committed token is the target's own greedy choice, so the output equals plain greedy
decoding. ``tau`` = tokens emitted per verify forward (accepted + bonus, cut at EOS and at
``max_new_tokens``); the raw engine-style counters are kept beside it (:class:`SpecDecodeStats`).
"""

from __future__ import annotations

import torch

from draftcache.targets import HFEagle3TargetModel
from draftcache.trainer.eagle3.model import Eagle3DecodeCache, Eagle3DraftModel
from draftcache.trainer.speculative import SpecDecodeStats, emit_round, new_kv_cache

__all__ = ["speculative_generate"]


@torch.no_grad()
def speculative_generate(
    target: HFEagle3TargetModel,
    draft: Eagle3DraftModel,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    draft_tokens: int,
    stats: SpecDecodeStats | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy speculative decoding of ``prompt_ids [n]``; returns the new tokens (<= max_new_tokens)."""
    K = draft_tokens
    stats = stats if stats is not None else SpecDecodeStats(draft_tokens=K)
    device = prompt_ids.device
    selected = draft.selected_token_ids
    t_cache = new_kv_cache(target.model)
    prompt = prompt_ids.view(1, -1)
    fwd = target.forward_capture(prompt, None, past_key_values=t_cache)
    t_cache = fwd.past_key_values
    last = int(fwd.logits[0, -1].argmax())
    out = [last]
    # draft context: slot t reads aux_t and token x_{t+1}
    ctx_tokens = torch.cat([prompt[0, 1:], torch.tensor([last], device=device)]).view(1, -1)
    d_cache = Eagle3DecodeCache()
    parallel = draft.config.parallel_drafting
    if parallel:
        mask_ids = torch.full((1, K - 1), draft.config.mask_token_id, device=device)
        mask_hidden = draft.mask_hidden_state().view(1, 1, -1).expand(1, K - 1, -1)

    def extend(tokens: torch.Tensor, aux: torch.Tensor):
        """Append context entries (and, for P-EAGLE, the round's mask slots) in one forward."""
        hidden = draft.combine_hidden_states(aux)
        if parallel and K > 1:
            tokens, hidden = torch.cat([tokens, mask_ids], dim=1), torch.cat([hidden, mask_hidden.to(hidden.dtype)], dim=1)
        stats.draft_forwards += 1
        return draft.decode(tokens, hidden, d_cache)

    step = extend(ctx_tokens, fwd.aux_hidden_states)
    while len(out) < max_new_tokens and last != eos_token_id:
        if parallel:
            context_len = d_cache.length - (K - 1)
            proposal = selected[step.logits[0, -K:].argmax(-1)].tolist()
        else:
            context_len = d_cache.length
            proposal = []
            for k in range(K):
                token = int(selected[step.logits[0, -1].argmax()])
                proposal.append(token)
                if k + 1 < K:
                    step = draft.decode(torch.tensor([[token]], device=device), step.hidden_states[:, -1:], d_cache)
                    stats.draft_forwards += 1
        verify_ids = torch.tensor([[last] + proposal], device=device)
        fwd = target.forward_capture(verify_ids, None, past_key_values=t_cache)
        t_cache = fwd.past_key_values
        preds = fwd.logits[0].argmax(-1).tolist()  # p_0..p_K
        accepted = 0
        while accepted < K and proposal[accepted] == preds[accepted]:
            accepted += 1
        new = proposal[:accepted] + [preds[accepted]]
        stats.observe_round(accepted)
        # target cache now covers x_0..x_m, d_1..d_K; keep x_m and the accepted d_1..d_a
        if accepted < K:
            t_cache.crop(-(K - accepted))  # negative = drop that many from the end (transformers 4.x and 5.x)
        d_cache.crop(context_len)
        aux = fwd.aux_hidden_states[:, : accepted + 1]  # features of x_m, d_1..d_a
        if len(out) + len(new) < max_new_tokens and eos_token_id not in new:  # another round follows
            step = extend(torch.tensor([new], device=device), aux)
        out.extend(emit_round(new, eos_token_id))
        last = out[-1]
    out = out[:max_new_tokens]
    stats.emitted_tokens += len(out) - 1  # out[0] came from the prompt's forward, not from a round
    return out
