"""What every draft family's speculative decoding shares: engine-style counters
(:class:`SpecDecodeStats`), the tokens a verify round emits (:func:`emit_round`), plain greedy
decoding as the baseline, and a CUDA-synchronised timer. The families' decoding loops live in
``trainer/eagle3/speculative.py`` (chain drafting) and ``trainer/dflash/speculative.py`` (blocks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from draftcache.targets.capture import kv_cache_kwargs

__all__ = ["SpecDecodeStats", "greedy_generate", "emit_round", "new_kv_cache", "timed"]


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
    draft_forwards: int = 0                # drafter forward calls (chain: K per round; P-EAGLE: 1)

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
    def draft_forwards_per_round(self) -> float:
        """Drafter forwards per verify round (0 where a decoding loop does not count them)."""
        return self.draft_forwards / max(1, self.num_drafts)

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's figure: ``1 + accepted / drafts`` from the raw counters (no truncation)."""
        return 1.0 + self.num_accepted_tokens / max(1, self.num_drafts)

    @property
    def acceptance_rates(self) -> list[float]:
        """``[K]`` share of rounds whose ``i``-th draft token was accepted (vLLM's per-position rate)."""
        return [a / max(1, self.num_drafts) for a in self.num_accepted_tokens_per_pos]


def new_kv_cache(model):
    """An empty HF ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Plain greedy decoding with a KV cache, one target forward per token (the baseline)."""
    cache = new_kv_cache(model)
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
