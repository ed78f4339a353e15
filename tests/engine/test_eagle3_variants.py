"""EAGLE-3.1, a two-layer EAGLE-3 draft and P-EAGLE, served by a real vLLM (issue 18).

SmolLM2-135M-Instruct and the chats of ``data/chats.json`` plus the target's own greedy replies to
their prompts (as in ``test_eagle3_chain.py``); one cache written by ``precompute-eagle3`` (``hidden``
supervision: SmolLM2's width is below the draft vocabulary); three drafts trained briefly from it
through the real CLI (6 steps of 512 tokens from the target's ``lm_head`` rows, ``--init-lm-head``,
so that acceptance is far from zero on a shared CPU box):

* EAGLE-3.1: ``--fc-norm --norm-output`` (exported as ``eagle3``);
* two decoder layers, with attention biases: ``--draft-layers 2 --attention-bias`` (``speculators``);
* P-EAGLE: ``--method peagle`` (both formats; vLLM serves the ``eagle3`` one with
  ``"parallel_drafting": true`` and reads the ``speculators`` one's ``peagle`` type).

For each: vLLM's load check passes (every drafter parameter, ``mask_hidden`` included, equals the
export; every variant setting reads as our draft computes it), vLLM's speculative output equals
its plain greedy output and ours, and vLLM's acceptance counters equal ``draftcache eval``'s.
"""

from __future__ import annotations

import sys

import pytest

from .helpers import run_cli, serve_beside_ours, smollm2_reply_data

K = 3
MAX_NEW_TOKENS = 16
REPLY_TOKENS = 32
TRAIN = {  # name -> (train flags, export format)
    "eagle31": (["--fc-norm", "--norm-output"], "eagle3"),
    "two_layer": (["--draft-layers", "2", "--attention-bias"], "speculators"),
    "peagle": (["--method", "peagle"], "eagle3"),
    "peagle_speculators": (None, "speculators"),  # the peagle run, exported in the other format
}


@pytest.fixture(scope="module")
def variants(smollm2_dir, engine_env, tmp_path_factory):
    """Plain vLLM outputs, one cache, three drafts trained from it and exported."""
    from draftcache.trainer.evaluate import EvalPrompts

    root = tmp_path_factory.mktemp("variants")
    target = str(smollm2_dir)
    replies = smollm2_reply_data(target, root, reply_tokens=REPLY_TOKENS, max_new_tokens=MAX_NEW_TOKENS,
                                 draft_tokens=K)
    prompts, reference, data, max_len = replies.prompts, replies.reference, replies.data_dir, replies.max_len

    py = sys.executable
    cache = root / "cache"
    run_cli([py, "-m", "draftcache.precompute", "--output-dir", str(cache), "--target-model", target, "--input-data",
          str(data), "--draft-vocab-size", "2048", "--seq-length", "256", "--device", "cpu", "--quiet"],
         engine_env, "precompute-eagle3")
    exports = {}
    for name, (flags, fmt) in TRAIN.items():
        run = root / ("peagle" if name == "peagle_speculators" else name)
        if flags is not None:
            run_cli([py, "-m", "draftcache.cli", "train", "--cached-target-path", str(cache), "--output-dir", str(run),
                  "--max-steps", "6", "--ttt-steps", str(K), "--lr", "3e-3", "--warmup-steps", "2", "--val-fraction",
                  "0", "--batch-tokens", "512", "--init-lm-head", "--device", "cpu", "--quiet", *flags], engine_env,
                 f"train {name}")
        exports[name] = root / f"export-{name}"
        run_cli([py, "-m", "draftcache.cli", "export", str(run), "--output", str(exports[name]), "--format", fmt],
             engine_env, f"export {name}")
    eval_prompts = EvalPrompts(ids=prompts.ids[::4], tokenizer=prompts.tokenizer, skipped=prompts.skipped)
    return {"target": target, "eval_prompts": eval_prompts, "reference": reference[::4], "exports": exports,
            "max_len": max_len}


@pytest.fixture(scope="module", params=list(TRAIN))
def served(request, variants):
    """One draft served by vLLM (K draft tokens) next to our own eval of it."""
    name = request.param
    return serve_beside_ours(name, variants["target"], variants["exports"][name], variants["eval_prompts"],
                             draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS, max_len=variants["max_len"])


_LAYER = ["hidden_norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
          "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
_BASE = ["draft_id_to_target_id", "lm_head.weight", "model.fc.weight", "model.norm.weight",
         *(f"model.layers.0.{p}" for p in _LAYER)]
EXPECTED = {  # name -> (parameters compared, variant settings vLLM reads)
    "eagle31": (_BASE + [f"model.fc_norm.{i}.weight" for i in range(3)],
                {"fc_norm": True, "norm_output": True}),
    "two_layer": (_BASE + [f"model.layers.1.{p}" for p in _LAYER if p != "hidden_norm.weight"]
                  + [f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("qkv_proj", "o_proj")],
                  {"attention_bias": True, "num_hidden_layers": 2}),
    "peagle": (_BASE + ["mask_hidden"], {"parallel_drafting": True}),
    "peagle_speculators": (_BASE + ["mask_hidden"], {"parallel_drafting": True}),
}


def test_load_check_passes_with_every_variant_setting(served, variants):
    from draftcache.trainer.eagle3.export import read_export_config

    check = served["check"]
    assert check.ok, check.format()
    assert check.shared == ["model.embed_tokens.weight"]
    names, settings = EXPECTED[served["name"]]
    assert sorted(check.compared) == sorted(names)
    expected = {"norm_before_fc": False, "fc_norm": False, "norm_output": False, "norm_before_residual": False,
                "use_aux_hidden_state": True, "attention_bias": False, "num_hidden_layers": 1,
                "parallel_drafting": False, **settings}
    if expected["parallel_drafting"]:
        expected["mask_token_id"] = read_export_config(variants["exports"][served["name"]]).mask_token_id
    assert check.flags == expected


def test_outputs_equal_plain_greedy(served, variants):
    assert served["outputs"] == variants["reference"]
    assert served["ours"].mismatches == 0
    assert served["ours"].outputs == variants["reference"]


def test_acceptance_counts_equal_ours(served):
    engine, ours = served["counters"], served["ours"].stats
    assert (engine.num_drafts, engine.num_draft_tokens, engine.num_accepted_tokens,
            engine.num_accepted_tokens_per_pos) == (ours.num_drafts, ours.num_draft_tokens, ours.num_accepted_tokens,
                                                    ours.num_accepted_tokens_per_pos)
    assert engine.num_accepted_tokens > 0
    # P-EAGLE: one drafter forward per round; chains: K
    per_round = 1 if served["name"].startswith("peagle") else K
    assert ours.draft_forwards == per_round * ours.num_drafts
