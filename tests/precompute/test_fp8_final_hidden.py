"""An fp8 cache stores ``final_hidden`` in fp8 only when the logits rebuilt from fp8 rows are within
the tolerance; otherwise in bf16 (aux hidden states stay fp8), recorded in the manifest's
``quantization`` block, instead of ``auto`` falling back to ``probs`` (Vd values a row) and
``--supervision hidden`` being refused.

The target is a tiny Llama whose lm_head is scaled by 60: its logits are large, so fp8's ~3%
per-value error in the lm_head input moves the rebuilt probabilities by ~0.09 (> 0.05), bf16's
~0.4% by ~0.007."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from draftcache.cache_format import (ManifestError, collate_padded, inspect_cache, open_cache, validate_manifest,
                                     verify_cache)
from draftcache.cache_format.manifest import FP8_QUANTIZATION
from draftcache.precompute.cli import app
from draftcache.precompute.pipeline import REBUILD_PROB_TOLERANCE

from .helpers import read_manifest_json, save_tiny_target, target_dir, write_chat_subset

HEAD_SCALE = 60.0


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """(a tiny Llama with a sharp lm_head, 4 chats)."""
    root = tmp_path_factory.mktemp("sharp")
    model_dir = save_tiny_target(root / "llama", "llama")
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(model_dir)
    return model_dir, write_chat_subset(root / "chat.jsonl", 4)


def _precompute(model_dir, chat, out, *extra: str):
    result = CliRunner().invoke(app, ["--target-model", str(model_dir), "--input-data", str(chat), "--output-dir",
                                      str(out), "--seq-length", "64", "--dtype", "fp8", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result


def _shard_bytes(cache) -> int:
    return sum(p.stat().st_size for p in cache.glob("shard-*.safetensors"))


@pytest.fixture(scope="module")
def auto_cache(sharp, tmp_path_factory):
    model_dir, chat = sharp
    out = tmp_path_factory.mktemp("auto") / "cache"
    return out, _precompute(model_dir, chat, out)


def test_auto_keeps_hidden_with_bf16_final_hidden_and_fp8_aux(auto_cache):
    out, result = auto_cache
    manifest = read_manifest_json(out)
    assert manifest["supervision"]["encoding"] == "hidden"
    assert manifest["supervision"]["rebuild_max_abs_prob_diff"] <= REBUILD_PROB_TOLERANCE  # the bf16 rows' measure
    quant = manifest["quantization"]
    assert list(quant["scales"]) == ["aux_hidden_states"] and quant["final_hidden_dtype"] == "bf16"
    assert "final hidden states differ from the target's by" in quant["final_hidden_why"]
    assert "above the tolerance 0.05" in quant["final_hidden_why"]
    assert "final_hidden is stored bf16, aux hidden states fp8" in result.stderr
    raw = open_cache(out).get_raw(0)
    assert raw["aux_hidden_states"].dtype == torch.float8_e4m3fn and "aux_hidden_states_scale" in raw
    assert raw["final_hidden"].dtype == torch.bfloat16 and "final_hidden_scale" not in raw
    report = verify_cache(out)
    assert report.problems == []
    assert "float8_e4m3fn aux_hidden_states, one float32 scale per row; final_hidden bf16: the draft-vocab" \
        in inspect_cache(out)


def test_verify_checks_final_hidden_against_the_recorded_layout(auto_cache, tmp_path):
    out, _ = auto_cache
    cache = tmp_path / "claims-fp8"
    shutil.copytree(out, cache)
    manifest = read_manifest_json(cache)
    manifest["quantization"] = FP8_QUANTIZATION  # a manifest claiming fp8 final_hidden over bf16 rows
    (cache / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    problems = verify_cache(cache).problems
    assert len(problems) == 1 and "tensor 'final_hidden' is torch.bfloat16 [" in problems[0]
    assert "expected torch.float8_e4m3fn" in problems[0] and "'final_hidden_scale' is missing" in problems[0]


def test_the_rebuilt_probabilities_match_the_target(sharp, auto_cache):
    model_dir, _ = sharp
    out, _ = auto_cache
    reader = open_cache(out)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    selected = torch.as_tensor(reader.selected_token_ids)
    for i in range(len(reader)):
        sample = reader[i]
        ids = reader.get_raw(i)["input_ids"].long()[None]
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0].float(), -1)[:, selected]  # [S, Vd]
        supervised = sample["loss_mask"].bool()[:-1]                             # slot t reads position t+1
        got = sample["target_probs"][:-1][supervised].float()
        want = probs[1:][supervised]
        assert float((got - want).abs().max()) <= REBUILD_PROB_TOLERANCE, i


def test_the_batch_path_reads_the_bf16_rows_like_the_sample_path(auto_cache):
    out, _ = auto_cache
    reader = open_cache(out)
    indices = list(range(len(reader)))
    raw = reader.get_raw_batch(indices)
    assert raw["final_hidden"].dtype == torch.bfloat16 and "final_hidden_scale" not in raw
    got, want = reader.expand_batch(raw), collate_padded([reader[i] for i in indices])
    assert list(got) == list(want)
    for name in want:  # the lm_head matmul over the batch may round the last float32 bit differently
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_it_is_smaller_than_the_probs_fallback(sharp, auto_cache, tmp_path):
    model_dir, chat = sharp
    out, _ = auto_cache
    probs = tmp_path / "probs"
    _precompute(model_dir, chat, probs, "--supervision", "probs")
    assert _shard_bytes(out) < 0.5 * _shard_bytes(probs)


def test_supervision_hidden_stores_bf16_final_hidden_instead_of_refusing(sharp, auto_cache, tmp_path):
    model_dir, chat = sharp
    out, _ = auto_cache
    hidden = tmp_path / "hidden"
    _precompute(model_dir, chat, hidden, "--supervision", "hidden")
    assert read_manifest_json(hidden)["quantization"] == read_manifest_json(out)["quantization"]
    assert verify_cache(hidden).problems == []


def test_resume_reuses_the_recorded_final_hidden_choice(sharp, auto_cache, tmp_path):
    model_dir, chat = sharp
    out, _ = auto_cache
    cache = tmp_path / "resumed"
    shutil.copytree(out, cache)
    result = _precompute(model_dir, chat, cache, "--resume")
    assert "resume: supervision hidden, as recorded in the cache" in result.stderr
    assert read_manifest_json(cache) == read_manifest_json(out)


def test_the_embedded_default_keeps_fp8_final_hidden(tmp_path):
    out = tmp_path / "default"
    _precompute(target_dir(), write_chat_subset(tmp_path / "chat.jsonl", 4), out)
    manifest = read_manifest_json(out)
    assert manifest["supervision"]["encoding"] == "hidden" and manifest["quantization"] == FP8_QUANTIZATION
    assert open_cache(out).get_raw(0)["final_hidden"].dtype == torch.float8_e4m3fn


def test_the_manifest_check_accepts_both_layouts_and_nothing_else(auto_cache):
    out, _ = auto_cache
    manifest = read_manifest_json(out)
    validate_manifest(manifest)                                    # final_hidden bf16
    old = copy.deepcopy(manifest)
    old["quantization"] = copy.deepcopy(FP8_QUANTIZATION)          # every hidden state fp8 (the first layout)
    validate_manifest(old)
    for broken in ({"final_hidden_why": None}, {"final_hidden_dtype": "fp16"},
                   {"scales": FP8_QUANTIZATION["scales"]}):        # bf16 recorded yet final_hidden scaled
        bad = copy.deepcopy(manifest)
        bad["quantization"].update(broken)
        with pytest.raises(ManifestError, match=r"quantization"):  # the schema or the cross-field check
            validate_manifest(bad)
