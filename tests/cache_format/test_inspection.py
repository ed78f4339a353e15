"""inspect / verify / stats / show on real synthetic caches."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from draftcache.cache_format import FORMAT_VERSION, CacheWriter, read_manifest
from draftcache.cache_format.inspection import cache_stats, inspect_cache, show_sample, verify_cache
from draftcache.data.vocab import DraftVocab

from .synth import HIDDEN, SELECTED, VOCAB, make_record, make_samples, manifest_for, write_cache


def test_inspect_summarises_the_manifest(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=5, shard_size=2, encoding="topk", topk=3, dtype="bf16")
    text = inspect_cache(cache.path)
    manifest = read_manifest(cache.path)
    assert f"format       v{FORMAT_VERSION} eagle3, complete" in text
    assert f"supervision  topk (k=3), dtype bf16, draft vocab {len(SELECTED)}" in text
    assert "samples      5 committed of 5 planned, seq_length 24" in text
    assert "shards       3 of 3 (shard_size 2)" in text
    assert f"tokens       {manifest['stats']['num_tokens']} ({manifest['stats']['num_supervised']} supervised)" in text
    assert sum(line.startswith("shard-00000") for line in text.splitlines()) == 3


def test_verify_passes_a_sound_cache_and_names_damage(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=5, shard_size=2)
    report = verify_cache(cache.path)
    assert report.ok and len(report.checked) == 4 and report.notes == [], report.format()
    path = cache.path / "shard-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    (cache.path / "shard-000003.safetensors.tmp-99").write_bytes(b"x")
    report = verify_cache(cache.path)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith("shard-000001.safetensors: checksum mismatch")
    assert report.notes == ["stale temporary shard-000003.safetensors.tmp-99 (removed by the next --resume)"]
    assert "PROBLEM shard-000001.safetensors: checksum mismatch" in report.format()


def test_verify_finds_nan_and_bad_probabilities(tmp_path):
    samples = make_samples(3, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    records = [make_record(s, "probs", vocab, torch.float32, None) for s in samples]
    records[0].aux_hidden_states[1, 2] = float("nan")
    records[2].target_probs[0] *= 2
    with CacheWriter(tmp_path / "c", manifest_for(samples, shard_size=2)) as writer:
        for i, record in enumerate(records):
            writer.add(i, record)
        writer.write_side_file("target_embeddings", {"weight": torch.zeros(VOCAB, HIDDEN)})
    report = verify_cache(tmp_path / "c")
    assert report.problems[0] == "shard-000000.safetensors: aux_hidden_states contains NaN or Inf"
    assert report.problems[1].startswith("shard-000001.safetensors: target_probs rows do not sum to 1 (off by up to 1")
    assert len(report.problems) == 2


def test_verify_notes_an_incomplete_cache(tmp_path):
    samples = make_samples(5, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    writer = CacheWriter(tmp_path / "c", manifest_for(samples, shard_size=2))
    for i in range(2):
        writer.add(i, make_record(samples[i], "probs", vocab, torch.float32, None))
    writer.close(complete=False)
    report = verify_cache(tmp_path / "c")
    assert report.ok
    assert report.notes == ["incomplete: 2 of 3 shards are not committed (first missing: 1); resume the precompute "
                            "with --resume"]


def test_stats(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=6, shard_size=4)
    text = cache_stats(cache.path)
    tokens = sum(s.input_ids.numel() for s in cache.samples)
    supervised = sum(int(s.loss_mask.sum()) for s in cache.samples)
    in_draft = sum(int(cache.vocab.t2d[s.logits[s.loss_mask.bool()].argmax(-1)].sum()) for s in cache.samples)
    assert "samples            6" in text
    assert f"tokens             {tokens} (mean {tokens / 6:.1f}," in text
    assert f"supervised         {supervised} ({supervised / tokens:.1%} of tokens)" in text
    assert f"cover {in_draft / supervised:.1%} of the target's argmax" in text


def test_show_decodes_with_the_recorded_tokenizer(tmp_path):
    words = {f"w{i}": i for i in range(VOCAB)}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")))
    fast.pre_tokenizer = WhitespaceSplit()
    fast.save_pretrained(tmp_path / "tok")
    cache = write_cache(tmp_path / "c", num_samples=3)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["tokenizer"]["name_or_path"] = str(tmp_path / "tok")
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    sample = cache.samples[1]
    text = show_sample(cache.path, 1)
    header, body = text.split("\n", 1)
    assert header == f"sample 1: {sample.input_ids.numel()} tokens, {int(sample.loss_mask.sum())} supervised (in [[...]])"
    ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
    assert body.count("[[") == sum(1 for t in range(len(ids)) if mask[t] and (t == 0 or not mask[t - 1]))
    assert body.replace("[[", " ").replace("]]", " ").split() == [f"w{i}" for i in ids]
    manifest["tokenizer"]["name_or_path"] = str(tmp_path / "absent")
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    assert "not available locally" in show_sample(cache.path, 0)
