"""``draftcache eval --engine vllm``'s verdict needs every check (no vLLM needed: the report alone),
and the aux-layer check reads the trained ids from the export's config."""

from __future__ import annotations

import json

import pytest

from draftcache.trainer.evaluate import EvalReport
from draftcache.trainer.speculative import SpecDecodeStats
from draftcache.trainer.vllm_eval import VLLMEvalReport, VLLMLoadCheck, trained_aux_layer_ids


def _stats(accepted: int) -> SpecDecodeStats:
    return SpecDecodeStats(draft_tokens=2, num_drafts=4, num_draft_tokens=8, num_accepted_tokens=accepted,
                           num_accepted_tokens_per_pos=[accepted, 0])


def _report(*, engine_accepted=3, ours_mismatches=0, plain_mismatches=0, ours_lossless=True,
            problems=()) -> VLLMEvalReport:
    ours = EvalReport(num_prompts=2, draft_tokens=2, tau=1.5, acceptance_rates=[0.5, 0.0], tokens=6,
                      greedy_tokens_per_s=1.0, spec_tokens_per_s=1.0, mismatches=0 if ours_lossless else 1,
                      stats=_stats(3), outputs=[[1], [2]])
    check = VLLMLoadCheck(compared=["lm_head.weight"], problems=list(problems), aux_layers=(2, 3, 4))
    return VLLMEvalReport(ours=ours, engine=_stats(engine_accepted), load_check=check,
                          plain_mismatches=plain_mismatches, ours_mismatches=ours_mismatches)


def test_every_check_passing_is_ok():
    report = _report()
    assert report.ok and report.counters_equal
    assert "verdict            ok" in report.format()


@pytest.mark.parametrize("broken, failure", [
    ({"engine_accepted": 2}, "acceptance counters differ"),
    ({"ours_mismatches": 1}, "1 vLLM outputs differ from ours"),
    ({"plain_mismatches": 1}, "1 vLLM outputs differ from vLLM plain greedy"),
    ({"ours_lossless": False}, "our eval is not lossless"),
    ({"problems": ["vLLM feeds the drafter target layers [1, 2, 3]"]}, "load check"),
])
def test_any_failed_check_fails_the_verdict(broken, failure):
    report = _report(**broken)
    assert not report.ok
    assert report.failures() == [next(f for f in report.failures() if failure in f)]
    assert "verdict            FAILED: " in report.format() and failure in report.format()


def test_trained_aux_layer_ids_are_the_recorded_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eagle_aux_hidden_state_layer_ids": [2, 15, 27],
                                                      "draftcache": {"aux_layer_ids": [1, 14, 26]}}))
    assert trained_aux_layer_ids(tmp_path) == [1, 14, 26]
    (tmp_path / "config.json").write_text(json.dumps({"eagle_aux_hidden_state_layer_ids": [2, 15, 27]}))
    with pytest.raises(ValueError, match="records no trained aux layer ids"):
        trained_aux_layer_ids(tmp_path)
