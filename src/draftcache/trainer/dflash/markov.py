"""DSpark's heads on top of the DFlash block drafter (vLLM 0.32's ``qwen3_dspark.py``).

A DSpark draft is the DFlash backbone (``model.py``) plus:

- ``markov_head``: ``markov_w1`` ``Embedding(V, r)`` and ``markov_w2`` ``[V, r]`` (no bias). The
  logits of block slot ``k`` are ``lm_head(h_k) + markov_w2(markov_w1[prev_k])`` where ``prev_k`` is
  the token proposed at the slot before (the anchor for slot 0). Serving samples the slots left to
  right (``dspark/speculator.py``, ``_sample_sequential``); training teacher-forces ``prev_k`` with
  the target's own tokens, which is what ``prev_k`` is on every path that verification accepts.
- ``confidence_head`` (optional): ``proj`` ``Linear(H + r -> 1)`` with a bias, in float32, over
  ``[h_k ; markov_w1[prev_k]]``; ``sigmoid`` of it estimates that slot ``k``'s token is accepted
  (vLLM's ``enable_confidence_head`` with ``confidence_head_with_markov``).

Parameter names are the exported ones; vLLM's ``Qwen3DSparkForCausalLM.load_weights`` prefixes
``model.``. ``markov_w2`` starts at zero, so an untrained head leaves the DFlash logits unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DSparkConfidenceHead", "MarkovHead"]


class MarkovHead(nn.Module):
    """Low-rank transition bias: ``prev [...] -> markov_w2(markov_w1[prev]) [..., V]``."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)  # weight [V, r], as vLLM's ParallelLMHead
        nn.init.normal_(self.markov_w1.weight, std=0.02)
        nn.init.zeros_(self.markov_w2.weight)

    def embed(self, prev: torch.Tensor) -> torch.Tensor:
        """``prev [...]`` int64 token ids -> ``[..., r]``."""
        return self.markov_w1(prev)

    def bias(self, embed: torch.Tensor) -> torch.Tensor:
        """``[..., r] -> [..., V]`` added to the slot's logits."""
        return self.markov_w2(embed)


class DSparkConfidenceHead(nn.Module):
    """``[h ; markov embedding] [..., H + r] -> [...]`` acceptance logit (float32, as vLLM computes it)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1, bias=True)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, markov_embed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, markov_embed], dim=-1).float()
        return nn.functional.linear(x, self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)
