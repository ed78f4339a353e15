"""Shard contents depend only on the global sample order (never on the forward batch size), hold
no padding, and the manifest validates against the JSON Schema with everything it must record."""

from __future__ import annotations

import hashlib
import re

import jsonschema
import pytest
import torch

import draftcache
from draftcache.cache_format import load_manifest_schema, open_cache, validate_manifest
from draftcache.data import ChatTokenizer, load_conversations, tokenize_all
from draftcache.precompute import PrecomputeConfig, precompute_from_config
from draftcache.targets.loading import load_tokenizer

from .helpers import default_dims, read_manifest_json, target_dir, write_chat_subset

NUM_SAMPLES = 20
SHARD_SIZE = 8
SEQ_LENGTH = 128
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_subset(tmp_path_factory.mktemp("data") / "chat.jsonl", NUM_SAMPLES)


def _run(out, chat, batch_size, encoding):
    flags = {"supervision": "probs", "draft_vocab_size": 200} if encoding == "probs" else {}
    cfg = PrecomputeConfig(output_dir=str(out), target_model=target_dir(), input_data=str(chat), dtype="fp32",
                           seq_length=SEQ_LENGTH, shard_size=SHARD_SIZE, batch_size=batch_size, progress=False, **flags)
    return precompute_from_config(cfg, log=lambda _: None)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, chat):
    root = tmp_path_factory.mktemp("layout")
    return {(encoding, bs): _run(root / f"{encoding}-bs{bs}", chat, bs, encoding)
            for encoding in ("hidden", "probs") for bs in (1, 4)}


@pytest.mark.parametrize("encoding", ["hidden", "probs"])
def test_batch_size_does_not_change_the_shards(caches, encoding):
    """Length bucketing regroups samples but every sample lands in the same place with the same
    integers; floats agree to fp32 rounding only: SDPA over a right-padded row accumulates over
    more keys than over the row alone (same-length batches are bit-identical, so is eager attention)."""
    one, four = caches[(encoding, 1)], caches[(encoding, 4)]
    assert four.padding_fraction > 0 and one.padding_fraction == 0  # the batches of 4 really were padded
    m1, m4 = read_manifest_json(one.output_dir), read_manifest_json(four.output_dir)
    for manifest in (m1, m4):
        for entry in manifest["shards"]:
            del entry["sha256"]
    assert m1 == m4  # same shard table (sizes, ranges, counts), vocabulary and side files
    a, b = open_cache(one.output_dir), open_cache(four.output_dir)
    floats = {"aux_hidden_states", "final_hidden", "target_probs"}
    for i in range(len(a)):
        raw1, raw4 = a.get_raw(i), b.get_raw(i)
        assert raw1.keys() == raw4.keys()
        for name in raw1:
            if name in floats:
                torch.testing.assert_close(raw1[name], raw4[name], rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(raw1[name], raw4[name]), name  # ids, masks, full-vocab argmax


def test_no_padding_on_disk(caches, chat):
    summary = caches[("hidden", 4)]
    manifest = read_manifest_json(summary.output_dir)
    conversations = load_conversations(str(chat))
    samples = tokenize_all(conversations, ChatTokenizer(load_tokenizer(target_dir()), SEQ_LENGTH),
                           conversations.skipped)
    lengths = [len(s.input_ids) for s in samples]
    assert sum(e["num_tokens"] for e in manifest["shards"]) == manifest["stats"]["num_tokens"] == sum(lengths)
    assert sum(e["num_supervised"] for e in manifest["shards"]) == sum(s.num_supervised for s in samples)
    assert open_cache(summary.output_dir).sample_lengths().tolist() == lengths
    assert summary.num_tokens == sum(lengths) and summary.num_samples == len(samples)


def test_manifest_validates_and_records_everything(caches, chat, reference_target):
    summary = caches[("hidden", 1)]
    manifest = read_manifest_json(summary.output_dir)
    validate_manifest(manifest)
    jsonschema.validate(manifest, load_manifest_schema())

    assert manifest["format_version"] == 2
    assert manifest["tool"] == {"name": "draftcache", "version": draftcache.__version__}
    assert manifest["kind"] == "eagle3" and manifest["complete"] is True
    target = manifest["target"]
    assert target["model_id"] == target_dir()
    assert SHA256.match(target["fingerprint"]) and SHA256.match(target["config_fingerprint"])
    assert (target["architecture"], target["hidden_size"], target["vocab_size"], target["num_layers"]) == \
        ("LlamaForCausalLM", *default_dims())
    assert target["config"]["num_hidden_layers"] == target["num_layers"]
    tokenizer = load_tokenizer(target_dir())
    assert manifest["tokenizer"]["name_or_path"] == target_dir()
    assert SHA256.match(manifest["tokenizer"]["fingerprint"])
    assert manifest["tokenizer"]["chat_template_fingerprint"] == \
        hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    layers = target["num_layers"]
    ids = [1, layers // 2 - 1, layers - 4]  # the EAGLE-3 default
    assert manifest["capture"] == {"layer_ids": ids, "convention": "decoder_layer_output",
                                   "hf_hidden_states_index": [i + 1 for i in ids], "shift": "left_by_one"}
    assert (manifest["seq_length"], manifest["dtype"]) == (SEQ_LENGTH, "fp32")
    supervision = manifest["supervision"]
    assert (supervision["encoding"], supervision["topk"]) == ("hidden", None)
    assert 0 <= supervision["rebuild_max_abs_prob_diff"] < 1e-5  # fp32 storage: the rebuild is exact up to matmul order
    vocab = target["vocab_size"]
    specials = sorted({i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                   tokenizer.unk_token_id) if i is not None})
    assert manifest["draft_vocab"]["selected_token_ids"] == list(range(vocab))
    assert sorted(manifest["draft_vocab"]["special_token_ids"]) == specials
    assert len(manifest["token_counts"]) == vocab
    assert sum(manifest["token_counts"]) == manifest["stats"]["num_supervised"]

    dataset = manifest["dataset"]
    assert dataset["input_data"] == str(chat)
    assert (dataset["split"], dataset["shuffle_seed"], dataset["num_samples"], dataset["skipped"]) == \
        (None, 42, None, {})
    assert dataset["fingerprint"] == load_conversations(str(chat)).fingerprint and SHA256.match(dataset["fingerprint"])

    assert (manifest["num_samples"], manifest["shard_size"], manifest["num_shards"]) == (NUM_SAMPLES, SHARD_SIZE, 3)
    assert manifest["max_shard_bytes"] == 1000 * 10**6  # the default --max-shard-mb, far above these shards
    assert manifest["shard_boundaries"] == [0, SHARD_SIZE, 2 * SHARD_SIZE, NUM_SAMPLES]
    out = summary.output_dir
    for name, entry in manifest["files"].items():
        data = open(f"{out}/{entry['file']}", "rb").read()
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), name
    assert set(manifest["files"]) == {"target_embeddings", "lm_head"}
    first = 0
    for index, entry in enumerate(manifest["shards"]):
        data = open(f"{out}/{entry['file']}", "rb").read()
        assert entry["file"] == f"shard-{index:06d}.safetensors" and entry["index"] == index
        assert entry["first_sample"] == first and entry["num_samples"] == min(SHARD_SIZE, NUM_SAMPLES - first)
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        first += entry["num_samples"]
    assert first == NUM_SAMPLES
    assert summary.cache_bytes == sum(e["bytes"] for e in manifest["shards"]) + \
        sum(e["bytes"] for e in manifest["files"].values())
    weight = open_cache(out).target_embeddings()  # [V, H] in the storage dtype
    assert weight.dtype == torch.float32
    assert torch.equal(weight, reference_target.get_input_embeddings().weight)
