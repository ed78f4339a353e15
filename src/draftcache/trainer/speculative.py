"""Chain speculative decoding (greedy) with an EAGLE-3 draft, to measure real acceptance length.

One round, with ``x_0..x_m`` committed and the target's KV cache covering ``x_0..x_{m-1}``:

1. the draft proposes ``d_1..d_K``: its cache holds one entry per committed slot ``t`` (hidden
   ``fc(aux_t)``, token ``x_{t+1}``); each drafted token is one more entry whose hidden is the
   previous entry's pre-norm output (what TTT trains);
2. the target verifies ``[x_m, d_1..d_K]`` in one forward and predicts ``p_0..p_K``;
3. the longest prefix with ``d_i == p_{i-1}`` is accepted plus the bonus token ``p_a``; both
   caches are cropped to what was accepted, and the verify forward's aux states become the
   draft's new context entries.

Every committed token is the target's own greedy choice, so the output equals plain greedy
decoding. ``tau`` = tokens emitted per verify forward (accepted + bonus, cut at EOS and at
``max_new_tokens``); the raw engine-style counters are kept beside it (:class:`SpecDecodeStats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from draftcache.target import HFEagle3TargetModel
from draftcache.target.capture import kv_cache_kwargs
from draftcache.trainer.model import Eagle3DecodeCache, Eagle3DraftModel

__all__ = ["SpecDecodeStats", "speculative_generate", "greedy_generate", "emit_round"]


@dataclass
class SpecDecodeStats:
    """Counters over one or more generations, of two kinds.

    What the user gets: ``emitted_tokens`` counts the tokens the verify rounds added to the returned
    outputs, after truncation at EOS and ``max_new_tokens`` (the first token, from the prompt's
    forward, is not a round's), and ``tau = emitted_tokens / num_drafts``.

    What an engine counts, per verify round before any truncation, named and counted as vLLM's
    ``SpecDecodingStats`` does, so the two can be compared directly: ``num_drafts`` (rounds),
    ``num_draft_tokens`` (``K`` per round), ``num_accepted_tokens`` and ``num_accepted_tokens_per_pos``
    (``[K]``: rounds whose ``i``-th draft token was accepted). vLLM logs
    ``mean_acceptance_length = 1 + num_accepted_tokens / num_drafts`` and per-position rates
    ``num_accepted_tokens_per_pos[i] / num_drafts``. It exceeds ``tau`` by what truncation dropped.
    """

    draft_tokens: int                      # K
    num_drafts: int = 0                    # verify rounds (= target verify forwards)
    num_draft_tokens: int = 0              # draft tokens proposed
    num_accepted_tokens: int = 0           # of those, accepted (bonus tokens not included)
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [K]
    emitted_tokens: int = 0                # tokens the rounds added to the outputs, after truncation

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.draft_tokens

    def observe_round(self, accepted: int) -> None:
        """Count one verify round that accepted ``accepted`` of its ``K`` draft tokens."""
        self.num_drafts += 1
        self.num_draft_tokens += self.draft_tokens
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.num_accepted_tokens_per_pos[i] += 1

    @property
    def tau(self) -> float:
        """Emitted tokens per verify round (accepted + bonus, as far as the output kept them)."""
        return self.emitted_tokens / max(1, self.num_drafts)

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's figure: ``1 + accepted / drafts`` from the raw counters (no truncation)."""
        return 1.0 + self.num_accepted_tokens / max(1, self.num_drafts)

    @property
    def acceptance_rates(self) -> list[float]:
        """``[K]`` share of rounds whose ``i``-th draft token was accepted (vLLM's per-position rate)."""
        return [a / max(1, self.num_drafts) for a in self.num_accepted_tokens_per_pos]


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Plain greedy decoding with a KV cache, one target forward per token (the baseline)."""
    cache = _new_cache(model)
    ids = prompt_ids.view(1, -1)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model(input_ids=ids, use_cache=True, **kv_cache_kwargs(model, cache)).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        ids = torch.tensor([[token]], device=prompt_ids.device)
    return out


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
    t_cache = _new_cache(target.model)
    prompt = prompt_ids.view(1, -1)
    fwd = target.forward_capture(prompt, None, past_key_values=t_cache)
    t_cache = fwd.past_key_values
    last = int(fwd.logits[0, -1].argmax())
    out = [last]
    # draft context: slot t reads aux_t and token x_{t+1}
    ctx_tokens = torch.cat([prompt[0, 1:], torch.tensor([last], device=device)]).view(1, -1)
    d_cache = Eagle3DecodeCache()
    step = draft.decode(ctx_tokens, draft.fc(fwd.aux_hidden_states.to(draft.fc.weight.dtype)), d_cache)
    while len(out) < max_new_tokens and last != eos_token_id:
        context_len = d_cache.length
        proposal: list[int] = []
        for k in range(K):
            token = int(selected[step.logits[0, -1].argmax()])
            proposal.append(token)
            if k + 1 < K:
                step = draft.decode(torch.tensor([[token]], device=device), step.hidden_states[:, -1:], d_cache)
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
        step = draft.decode(torch.tensor([new], device=device), draft.fc(aux.to(draft.fc.weight.dtype)), d_cache)
        out.extend(emit_round(new, eos_token_id))
        last = out[-1]
    out = out[:max_new_tokens]
    stats.emitted_tokens += len(out) - 1  # out[0] came from the prompt's forward, not from a round
    return out


def emit_round(new: list[int], eos_token_id: int | None) -> list[int]:
    """The tokens a verify round emits: its accepted draft tokens plus the bonus token, cut after
    the first EOS (what follows an EOS is never emitted, so it never counts toward tau)."""
    if eos_token_id is not None and eos_token_id in new:
        return new[: new.index(eos_token_id) + 1]
    return new


def timed(fn, *args, **kwargs):
    """``(result, seconds)``, synchronising CUDA around the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0
