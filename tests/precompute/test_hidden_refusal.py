"""``hidden`` stores the lm_head input and rebuilds logits at read time; a target whose final logit
transform it cannot reproduce is refused (``--supervision hidden``) or gets ``probs`` (``auto``)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from draftcache.cache_format import open_cache, read_manifest
from draftcache.data import load_conversations
from draftcache.precompute import (
    PrecomputeConfig,
    PrecomputeError,
    run_precompute,
    tokenize_conversations,
)
from draftcache.precompute.cli import app
from draftcache.targets import HFEagle3TargetModel
from draftcache.targets.loading import load_target_model, load_tokenizer

from .helpers import save_tiny_target, target_dir, write_chat_subset


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_subset(tmp_path_factory.mktemp("data") / "chat.jsonl", 4)


@pytest.mark.parametrize("family,key", [("gemma2", "final_logit_softcapping=30.0"), ("cohere", "logit_scale=0.0625")])
def test_config_logit_transform_refuses_hidden_and_auto_falls_back_to_probs(tmp_path, chat, family, key):
    model_dir = save_tiny_target(tmp_path / family, family)
    common = ["--target-model", str(model_dir), "--input-data", str(chat), "--seq-length", "64", "--quiet"]

    refused = CliRunner().invoke(app, [*common, "--output-dir", str(tmp_path / "hidden"), "--supervision", "hidden"])
    assert refused.exit_code == 1
    assert f"--supervision hidden refused for this target: its config sets {key}" in refused.stderr
    assert "Use --supervision probs (or topk)" in refused.stderr
    assert not (tmp_path / "hidden").exists()

    auto = CliRunner().invoke(app, [*common, "--output-dir", str(tmp_path / "auto")])
    assert auto.exit_code == 0, auto.stderr
    assert f"auto: probs, since the hidden encoding cannot rebuild this target's logits (its config sets {key}" \
        in auto.stderr
    assert read_manifest(tmp_path / "auto")["supervision"]["encoding"] == "probs"
    assert "encoding    probs" in auto.stdout


def test_config_logit_transform_refuses_dflash_hidden(tmp_path, chat):
    """A DFlash ``--supervision hidden`` cache is measured as EAGLE-3's: refused, with the DFlash fix."""
    model_dir = save_tiny_target(tmp_path / "gemma2", "gemma2")
    refused = CliRunner().invoke(app, ["--target-model", str(model_dir), "--input-data", str(chat), "--seq-length", "64",
                                       "--quiet", "--method", "dflash", "--supervision", "hidden", "--output-dir",
                                       str(tmp_path / "hidden")])
    assert refused.exit_code == 1
    assert "--supervision hidden refused for this target: its config sets final_logit_softcapping=30.0" \
        in refused.stderr
    assert "Drop --supervision hidden: the argmax-only DFlash cache" in refused.stderr
    assert not (tmp_path / "hidden").exists()


@pytest.fixture(scope="module")
def scaled_head_parts(chat):
    """The default target with its logits doubled after the lm_head, by no config key: only the
    numeric first-batch check can notice."""
    model = load_target_model(target_dir(), device=torch.device("cpu"))
    model.get_output_embeddings().register_forward_hook(lambda _module, _args, output: output * 2.0)
    tokenizer = load_tokenizer(target_dir())
    conversations = load_conversations(str(chat))
    return HFEagle3TargetModel(model), tokenizer, conversations


def _run(parts, out, supervision):
    target, tokenizer, conversations = parts
    cfg = PrecomputeConfig(output_dir=str(out), seq_length=64, supervision=supervision, dtype="fp32", progress=False)
    logs: list[str] = []
    samples = tokenize_conversations(cfg, tokenizer, conversations)
    run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                   model_id="scaled-head", log=logs.append)
    return "\n".join(logs)


def test_numeric_check_refuses_hidden_for_a_scaled_head(tmp_path, scaled_head_parts):
    with pytest.raises(PrecomputeError, match=r"--supervision hidden refused for this target: the draft-vocab "
                                              r"probabilities rebuilt from the stored \(fp32\) final hidden states "
                                              r"differ from the target's by [\d.e+-]+ \(max abs difference over \d+ "
                                              r"supervised rows\), above the tolerance 0.05"):
        _run(scaled_head_parts, tmp_path / "hidden", "hidden")
    assert not (tmp_path / "hidden").exists()


def test_numeric_check_makes_auto_store_probs(tmp_path, scaled_head_parts):
    log = _run(scaled_head_parts, tmp_path / "auto", "auto")
    assert "auto: probs, since the hidden encoding cannot rebuild this target's logits (the draft-vocab probabilities rebuilt" in log
    reader = open_cache(tmp_path / "auto")
    assert reader.encoding == "probs"
    # the stored distribution is the scaled target's, not the plain lm_head's
    target, _, _ = scaled_head_parts
    ids = reader.get_raw(0)["input_ids"].long()[None]
    logits = target.forward_capture(ids, torch.ones_like(ids)).logits[0]  # [S, V], already doubled
    supervised = reader[0]["loss_mask"].bool()
    torch.testing.assert_close(reader[0]["target_probs"][supervised],
                               torch.softmax(logits[1:][supervised[:-1]], -1), rtol=1e-5, atol=1e-7)
