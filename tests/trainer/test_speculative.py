"""Chain speculative decoding is lossless: its output equals plain greedy decoding of the target,
whatever the draft proposes; acceptance bookkeeping is exact for drafts of known quality."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from draftcache.targets import HFEagle3TargetModel
from draftcache.trainer.eagle3.model import Eagle3DecodeCache, Eagle3DraftConfig, Eagle3DraftModel, Eagle3Output
from draftcache.trainer.eagle3.speculative import speculative_generate
from draftcache.trainer.speculative import SpecDecodeStats, greedy_generate

V = 96


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=512)
    return HFEagle3TargetModel(AutoModelForCausalLM.from_config(cfg).eval())


class OracleDraft(nn.Module):
    """A draft that knows the target's greedy continuation ``sequence`` and proposes it, except that
    every ``wrong_at``-th proposal of a round (1-based) is replaced by a wrong token."""

    def __init__(self, sequence: list[int], hidden: int, wrong_at: int | None = None):
        super().__init__()
        self.sequence, self.wrong_at = sequence, wrong_at
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.selected_token_ids = torch.arange(V)
        self.config = SimpleNamespace(parallel_drafting=False)  # the only config field decoding reads
        self._round_pos = 0
        self._length_after_last_call = -1

    def combine_hidden_states(self, aux):
        return self.fc(aux)

    def decode(self, input_ids, hidden_states, cache: Eagle3DecodeCache) -> Eagle3Output:
        n = input_ids.shape[1]
        # a context call follows a crop of the previous round's drafted entries (K >= 2)
        context = cache.length != self._length_after_last_call
        cache.append(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))
        self._length_after_last_call = cache.length
        last = cache.length - 1  # entry at slot t predicts token t + 2
        self._round_pos = 1 if context else self._round_pos + 1
        nxt = self.sequence[last + 2] if last + 2 < len(self.sequence) else 0
        if self.wrong_at is not None and self._round_pos == self.wrong_at:
            nxt = (nxt + 1) % V
        logits = torch.full((1, n, V), -1e4)
        logits[0, -1, nxt] = 0.0
        return Eagle3Output(logits=logits, hidden_states=torch.zeros(1, n, self.fc.out_features))


def _prompt(seed: int, n: int = 9) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_random_draft_is_lossless(target, K):
    torch.manual_seed(1)
    cfg = Eagle3DraftConfig.from_target_config(target.model.config, draft_vocab_size=V,
                                               aux_layer_ids=target.aux_layer_ids)
    draft = Eagle3DraftModel(cfg).eval()
    for seed in range(3):
        prompt = _prompt(seed)
        ref = greedy_generate(target.model, prompt, 30)
        stats = SpecDecodeStats(draft_tokens=K)
        assert speculative_generate(target, draft, prompt, max_new_tokens=30, draft_tokens=K, stats=stats) == ref
        assert stats.num_drafts >= 1 and stats.emitted_tokens == 29  # the first token is the prompt forward's
        assert stats.num_draft_tokens == K * stats.num_drafts
        assert stats.num_accepted_tokens == sum(stats.num_accepted_tokens_per_pos)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_perfect_draft_commits_k_plus_one_per_verify_step(target, K):
    """39 tokens after the prompt's first, in rounds of K + 1: the last round is cut at max_new_tokens.
    tau counts what was emitted; the raw counters count every accepted draft token, as vLLM does."""
    prompt = _prompt(7)
    ref = greedy_generate(target.model, prompt, 60)  # the oracle knows beyond the 40 we ask for
    draft = OracleDraft(prompt.tolist() + ref, target.hidden_size)
    stats = SpecDecodeStats(draft_tokens=K)
    assert speculative_generate(target, draft, prompt, max_new_tokens=40, draft_tokens=K, stats=stats) == ref[:40]
    rounds = -(-39 // (K + 1))
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (rounds, K * rounds, K * rounds)
    assert stats.num_accepted_tokens_per_pos == [rounds] * K
    assert stats.emitted_tokens == 39
    assert stats.tau == pytest.approx(39 / rounds)
    assert stats.mean_acceptance_length == pytest.approx(K + 1)
    assert stats.acceptance_rates == [1.0] * K


def test_tau_counts_only_tokens_emitted_before_eos(target):
    """A perfect draft keeps proposing past EOS; the output stops at EOS and so does tau."""
    K = 3
    prompt = _prompt(11)
    ref = greedy_generate(target.model, prompt, 60)
    cut = next(j for j in range(9, 60) if ref[j] not in ref[:j])  # an EOS first seen at output index cut
    assert cut % (K + 1) != 0  # the last round is cut short
    eos = ref[cut]
    expected = greedy_generate(target.model, prompt, 60, eos_token_id=eos)
    assert expected == ref[: cut + 1]
    draft = OracleDraft(prompt.tolist() + ref, target.hidden_size)
    stats = SpecDecodeStats(draft_tokens=K)
    out = speculative_generate(target, draft, prompt, max_new_tokens=60, draft_tokens=K, stats=stats, eos_token_id=eos)
    assert out == expected
    rounds = -(-cut // (K + 1))
    assert stats.num_drafts == rounds and stats.num_accepted_tokens == K * rounds
    assert stats.emitted_tokens == cut
    assert stats.tau == pytest.approx(cut / rounds)
    assert stats.tau < stats.mean_acceptance_length == pytest.approx(K + 1)


def test_draft_wrong_at_second_proposal_accepts_exactly_one(target):
    K = 4
    prompt = _prompt(11)
    ref = greedy_generate(target.model, prompt, 40)
    draft = OracleDraft(prompt.tolist() + ref, target.hidden_size, wrong_at=2)
    stats = SpecDecodeStats(draft_tokens=K)
    assert speculative_generate(target, draft, prompt, max_new_tokens=31, draft_tokens=K, stats=stats) == ref[:31]
    assert stats.num_drafts == 15 and stats.num_accepted_tokens_per_pos == [15, 0, 0, 0]
    assert stats.tau == pytest.approx(2.0) and stats.mean_acceptance_length == pytest.approx(2.0)
    assert stats.acceptance_rates == [1.0, 0.0, 0.0, 0.0]
