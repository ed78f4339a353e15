"""Resume helpers: stale temporaries, shard verification, committed prefix, config diff."""

from __future__ import annotations

import copy
import os

import torch

from draftcache.cache_format import (
    RESUME_KEY_FIELDS,
    atomic_write_bytes,
    atomic_write_json,
    committed_prefix,
    diff_manifest_config,
    read_manifest,
    remove_stale_temporaries,
    sha256_file,
    verify_shard,
)

from .synth import HIDDEN, VOCAB, make_samples, manifest_for, write_cache


def test_remove_stale_temporaries_keeps_committed_files(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=5, shard_size=2)
    stale = ["shard-000002.safetensors.tmp-4242", "manifest.json.tmp-17"]
    for name in stale:
        (cache.path / name).write_bytes(b"partial")
    (cache.path / "notes.tmp-draft").write_text("not ours")  # no pid suffix: left alone
    before = {p.name for p in cache.path.iterdir()}
    assert remove_stale_temporaries(cache.path) == sorted(stale)
    assert {p.name for p in cache.path.iterdir()} == before - set(stale)
    assert remove_stale_temporaries(cache.path) == []


def test_verify_shard_names_the_problem(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=5, shard_size=2)
    entries = read_manifest(cache.path)["shards"]
    assert all(verify_shard(cache.path, e) == [] for e in entries)
    first, second, third = (cache.path / e["file"] for e in entries)
    with open(first, "r+b") as f:  # same size, one byte flipped
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(second, second.stat().st_size - 10)
    third.unlink()
    problems = [verify_shard(cache.path, e) for e in entries]
    assert problems[0] == [f"shard-000000.safetensors: checksum mismatch: sha256 {sha256_file(first)} on disk, "
                           f"manifest records {entries[0]['sha256']}"]
    assert problems[1] == [f"shard-000001.safetensors: size mismatch: {entries[1]['bytes'] - 10} bytes on disk, "
                           f"manifest records {entries[1]['bytes']} (truncated or overwritten)"]
    assert problems[2] == ["shard-000002.safetensors: missing (the manifest lists it as committed)"]
    assert verify_shard(cache.path, entries[0], checksum=False) == []


def test_committed_prefix_stops_at_the_first_gap():
    def entry(index, n):
        return {"index": index, "num_samples": n}

    assert committed_prefix({"shards": []}) == 0
    assert committed_prefix({"shards": [entry(0, 4), entry(1, 4), entry(2, 1)]}) == 9
    assert committed_prefix({"shards": [entry(0, 4), entry(2, 4)]}) == 4
    assert committed_prefix({"shards": [entry(1, 4)]}) == 0


def test_diff_manifest_config_names_every_differing_field():
    old = manifest_for(make_samples(3, weight=torch.zeros(VOCAB, HIDDEN), bias=torch.zeros(VOCAB)))
    new = copy.deepcopy(old)
    assert diff_manifest_config(old, new, RESUME_KEY_FIELDS) == []
    new["dataset"]["shuffle_seed"] = 7
    new["dtype"] = "bf16"
    new["target"]["fingerprint"] = "0" * 8
    new["draft_vocab"]["selected_token_ids"][4] += 1
    del new["tokenizer"]["chat_template_fingerprint"]
    new["stats"]["num_tokens"] = 99  # not a key field
    old_ids = old["draft_vocab"]["selected_token_ids"]
    assert diff_manifest_config(old, new, RESUME_KEY_FIELDS) == [
        f"target.fingerprint: \"{'f' * 64}\" != \"00000000\"",
        f"tokenizer.chat_template_fingerprint: \"{'x' * 64}\" != <missing>",
        'dtype: "fp32" != "bf16"',
        f"draft_vocab.selected_token_ids: [{old_ids[0]}, {old_ids[1]}, {old_ids[2]}, ... (23 items)] != "
        f"[{old_ids[0]}, {old_ids[1]}, {old_ids[2]}, ... (23 items)] (first difference at index 4: {old_ids[4]} != "
        f"{old_ids[4] + 1})",
        "dataset.shuffle_seed: 42 != 7",
    ]
    assert diff_manifest_config(old, new, ["dataset.split", "num_samples"]) == []


def test_resume_key_fields_cover_what_shapes_the_shards():
    for field in ("target.fingerprint", "target.config_fingerprint", "tokenizer.fingerprint",
                  "tokenizer.chat_template_fingerprint", "capture.layer_ids", "seq_length", "dtype",
                  "supervision.encoding", "supervision.topk", "draft_vocab.selected_token_ids", "dataset.input_data",
                  "dataset.split", "dataset.shuffle_seed", "dataset.num_samples", "dataset.fingerprint", "shard_size",
                  "num_samples", "format_version", "kind"):
        assert field in RESUME_KEY_FIELDS


def test_atomic_writes_leave_no_temporary(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_write_json(tmp_path / "m.json", {"x": [1, 2, 3], "y": {"z": None}})
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "m.json").read_text() == '{\n  "x": [1,2,3],\n  "y": {\n    "z": null\n  }\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "m.json"]
    atomic_write_bytes(tmp_path / "a.bin", b"new")  # replaces
    assert (tmp_path / "a.bin").read_bytes() == b"new"
