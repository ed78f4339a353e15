"""An fp8 cache stores ``final_hidden`` in fp8 only when the logits rebuilt from fp8 rows are within
the tolerance; otherwise in bf16 (aux hidden states stay fp8), recorded in the manifest's
``quantization`` block, instead of ``auto`` falling back to ``probs`` (Vd values a row) and
``--supervision hidden`` being refused.

The target is a tiny Llama whose lm_head is scaled by 60: its logits are large, so fp8's ~3%
per-value error in the lm_head input moves the rebuilt probabilities by ~0.09 (> 0.05), bf16's
~0.4% by ~0.007. DFlash ``--supervision hidden`` caches take the same decision (the tests at the end)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from draftcache.cache_format import (ManifestError, collate_padded, expand_dflash_raw, inspect_cache, open_cache,
                                     validate_manifest, verify_cache)
from draftcache.cache_format.manifest import FP8_QUANTIZATION
from draftcache.precompute.cli import app
from draftcache.precompute.pipeline import REBUILD_PROB_TOLERANCE
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, read_manifest_json, save_tiny_target, target_dir, write_chat_subset

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


def _precompute(model_dir, chat, out, *extra: str, dtype: str = "fp8"):
    result = CliRunner().invoke(app, ["--target-model", str(model_dir), "--input-data", str(chat), "--output-dir",
                                      str(out), "--seq-length", "64", "--dtype", dtype, "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result


def _shard_bytes(cache) -> int:
    return sum(p.stat().st_size for p in cache.glob("shard-*.safetensors"))


@pytest.fixture(scope="module")
def auto_cache(sharp, tmp_path_factory):
    model_dir, chat = sharp
    out = tmp_path_factory.mktemp("auto") / "cache"
    return out, _precompute(model_dir, chat, out)


def _assert_bf16_final_hidden_and_fp8_aux(out, result) -> None:
    """The manifest, the log and the stored rows of an fp8 cache whose final_hidden stayed bf16."""
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


def test_auto_keeps_hidden_with_bf16_final_hidden_and_fp8_aux(auto_cache):
    out, result = auto_cache
    _assert_bf16_final_hidden_and_fp8_aux(out, result)
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


# DFlash ``--supervision hidden``: the same measurement and decision (rows at q - 1 for supervised q)

DFLASH = ("--method", "dflash", "--supervision", "hidden")


@pytest.fixture(scope="module")
def dflash_caches(sharp, tmp_path_factory):
    """The sharp target's DFlash hidden caches: {"fp8": (path, result), "bf16": (path, result)}."""
    model_dir, chat = sharp
    root = tmp_path_factory.mktemp("dflash")
    return {dtype: (root / dtype, _precompute(model_dir, chat, root / dtype, *DFLASH, dtype=dtype))
            for dtype in ("fp8", "bf16")}


def test_dflash_hidden_stores_bf16_final_hidden_where_fp8_misses(dflash_caches):
    out, result = dflash_caches["fp8"]
    assert read_manifest_json(out)["kind"] == "dflash"
    _assert_bf16_final_hidden_and_fp8_aux(out, result)
    assert verify_cache(out).problems == []
    assert "float8_e4m3fn aux_hidden_states, one float32 scale per row; final_hidden bf16: the draft-vocab" \
        in inspect_cache(out)


def _dflash_rows(reader, index):
    """(sample ``index`` as the DFlash trainer's row, the slots t whose t + 1 is supervised [S] bool)."""
    row = reader[index]
    read = torch.zeros_like(row["loss_mask"], dtype=torch.bool)
    read[:-1] = row["loss_mask"][1:].bool()
    return row, read


def test_dflash_reader_rebuilds_the_bf16_caches_logits(sharp, dflash_caches):
    """The fp8 cache's reader path (``reader[i]`` = ``expand_dflash_raw`` then the lm_head rebuild the
    trainer runs) gives the bf16 cache's logits, and both the target's distribution within the tolerance."""
    model_dir, _ = sharp
    fp8, bf16 = (open_cache(dflash_caches[d][0]) for d in ("fp8", "bf16"))
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert len(fp8) == len(bf16) == 4
    for i in range(len(fp8)):
        (a, read), (b, _) = _dflash_rows(fp8, i), _dflash_rows(bf16, i)
        assert read.any()
        got = fp8.logits_from_final_hidden(a["final_hidden"][read])        # [m, V]
        torch.testing.assert_close(got, bf16.logits_from_final_hidden(b["final_hidden"][read]), atol=1e-5, rtol=0)
        with torch.no_grad():
            want = torch.softmax(model(a["input_ids"][None]).logits[0].float(), -1)[read]  # output at t, for t + 1
        assert float((torch.softmax(got, -1) - want).abs().max()) <= REBUILD_PROB_TOLERANCE, i
    # the trainer's batch path (get_raw_batch -> expand_dflash_raw) reads the bf16 rows like the sample path
    raw = fp8.get_raw_batch(range(len(fp8)))
    assert raw["final_hidden"].dtype == torch.bfloat16 and "final_hidden_scale" not in raw
    packed = expand_dflash_raw(raw)["final_hidden"][0]                     # [N, H]
    torch.testing.assert_close(packed, torch.cat([fp8[i]["final_hidden"] for i in range(len(fp8))]), atol=0, rtol=0)


def test_dflash_resume_reuses_the_recorded_final_hidden_choice(sharp, dflash_caches, tmp_path, monkeypatch):
    import draftcache.precompute.pipeline as pipeline

    model_dir, chat = sharp
    out, _ = dflash_caches["fp8"]
    cache = tmp_path / "resumed"
    shutil.copytree(out, cache)
    monkeypatch.setattr(pipeline, "REBUILD_PROB_TOLERANCE", -1.0)  # a new measurement would refuse hidden
    result = _precompute(model_dir, chat, cache, *DFLASH, "--resume")
    assert "resume: supervision hidden, as recorded in the cache" in result.stderr
    assert read_manifest_json(cache) == read_manifest_json(out)


def test_dflash_torchrun_ranks_use_rank_zeros_final_hidden_choice(sharp, tmp_path):
    """Two gloo ranks; rank 1's own measurement would refuse hidden (its tolerance is below any
    difference): rank 0 decides once, both ranks' shards hold bf16 final_hidden as the manifest says,
    and rank 1 runs no probe forward."""
    model_dir, chat = sharp
    out = tmp_path / "c"
    args = ["--target-model", str(model_dir), "--input-data", str(chat), "--output-dir", str(out), "--dtype", "fp8",
            *DFLASH, "--shard-size", "2", "--batch-size", "2", "--seq-length", "64", "--quiet"]
    job = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      str(Path(__file__).with_name("dist_encoding_job.py")), str(tmp_path), *args],
                     env=SUBPROCESS_ENV, timeout=120)
    assert job.returncode == 0, job.stderr[-3000:]
    manifest = read_manifest_json(out)
    assert manifest["num_shards"] == 2 and manifest["quantization"]["final_hidden_dtype"] == "bf16"
    report = verify_cache(out)
    assert report.problems == [] and len(report.checked) == 2 + 2  # both shards fit the manifest; 2 side files
    forwards = [json.loads((tmp_path / f"forwards-rank{r}.json").read_text()) for r in (0, 1)]
    assert forwards == [1, 1]  # rank 0: the probe, reused by shard 0; rank 1: shard 1


def test_dflash_on_the_embedded_default_keeps_fp8_final_hidden(tmp_path):
    out = tmp_path / "default"
    _precompute(target_dir(), write_chat_subset(tmp_path / "chat.jsonl", 4), out, *DFLASH)
    manifest = read_manifest_json(out)
    assert manifest["kind"] == "dflash" and manifest["quantization"] == FP8_QUANTIZATION
    assert 0 < manifest["supervision"]["rebuild_max_abs_prob_diff"] <= REBUILD_PROB_TOLERANCE  # measured, recorded
    assert open_cache(out).get_raw(0)["final_hidden"].dtype == torch.float8_e4m3fn
    assert verify_cache(out).problems == []
