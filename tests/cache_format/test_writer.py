"""CacheWriter: deterministic bytes, the commit protocol, the manifest it keeps, error paths."""

from __future__ import annotations

import hashlib
import json
import shutil

import jsonschema
import pytest
import torch
from safetensors import safe_open

from draftcache.cache_format import (
    CacheWriter,
    SampleRecord,
    load_manifest_schema,
    open_cache,
    read_manifest,
    sha256_file,
)

from draftcache.data.vocab import DraftVocab

from .synth import AUX, DTYPES, HIDDEN, SELECTED, VOCAB, make_record, make_samples, manifest_for, write_cache

# sha256 of shard-000000.safetensors for the fixed records of _golden_records (probs, fp32).
# If this changes the on-disk bytes changed: bump FORMAT_VERSION or explain why in the commit.
GOLDEN_SHARD_SHA256 = "12174197548cf5e1afefb10957333ebfefecd73720188bfb9d35dcf1b41c67ae"  # v2 (checked: with the v1 metadata the streamed shard has the v1 bytes)


def _golden_records() -> list[SampleRecord]:
    """Three tiny records from arange, independent of any RNG."""
    vd = len(SELECTED)
    records = []
    for i, seq in enumerate((5, 3, 6)):
        mask = torch.tensor([0, 1, 1, 0, 1, 1][:seq], dtype=torch.uint8)
        m = int(mask.sum())
        probs = (torch.arange(m * vd, dtype=torch.float32).reshape(m, vd) + i) / 1024  # exact in fp32
        records.append(SampleRecord(
            input_ids=torch.arange(seq, dtype=torch.int32) + i,
            loss_mask=mask,
            aux_hidden_states=torch.arange(seq * AUX, dtype=torch.float32).reshape(seq, AUX) / 7 + i,
            target_argmax=torch.arange(m, dtype=torch.int32) * 3,
            target_probs=probs,
        ))
    return records


def _write_golden(path):
    samples = make_samples(3, weight=torch.zeros(VOCAB, HIDDEN), bias=torch.zeros(VOCAB))
    manifest = manifest_for(samples, shard_size=2)
    manifest["token_counts"] = [1] * VOCAB
    with CacheWriter(path, manifest) as writer:
        for i, record in enumerate(_golden_records()):
            writer.add(i, record)
        writer.write_side_file("target_embeddings", {"weight": torch.arange(VOCAB * HIDDEN, dtype=torch.float32)
                                                     .reshape(VOCAB, HIDDEN)})
    return path


def test_shards_are_byte_identical_across_writes_and_match_the_golden_hash(tmp_path):
    a, b = _write_golden(tmp_path / "a"), _write_golden(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == ["manifest.json", "shard-000000.safetensors", "shard-000001.safetensors",
                     "target_embeddings.safetensors"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    digest = hashlib.sha256((a / "shard-000000.safetensors").read_bytes()).hexdigest()
    assert digest == GOLDEN_SHARD_SHA256


def test_shard_layout_and_metadata(tmp_path):
    path = _write_golden(tmp_path / "c")
    with safe_open(str(path / "shard-000001.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format_version": "2", "first_sample": "2", "num_samples": "1"}
        assert sorted(f.keys()) == sorted(["input_ids", "loss_mask", "sample_offsets", "aux_hidden_states",
                                           "supervised_offsets", "target_argmax", "target_probs"])
        record = _golden_records()[2]
        assert torch.equal(f.get_tensor("input_ids"), record.input_ids)
        assert f.get_tensor("sample_offsets").tolist() == [0, 6]
        assert f.get_tensor("supervised_offsets").tolist() == [0, 4]
        assert torch.equal(f.get_tensor("target_probs"), record.target_probs)
    with safe_open(str(path / "shard-000000.safetensors"), framework="pt") as f:
        assert f.get_tensor("sample_offsets").tolist() == [0, 5, 8]
        assert f.get_tensor("supervised_offsets").tolist() == [0, 3, 5]
        assert f.get_slice("aux_hidden_states").get_shape() == [8, AUX]


def test_manifest_validates_against_the_json_schema_and_records_every_file(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=7, encoding="hidden", dtype="bf16", shard_size=3)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    jsonschema.validate(manifest, load_manifest_schema())
    assert manifest["complete"] is True and manifest["num_shards"] == 3
    assert [(s["index"], s["first_sample"], s["num_samples"]) for s in manifest["shards"]] == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    for entry in [*manifest["shards"], *manifest["files"].values()]:
        assert (cache.path / entry["file"]).stat().st_size == entry["bytes"]
        assert sha256_file(cache.path / entry["file"]) == entry["sha256"]
    assert set(manifest["files"]) == {"target_embeddings", "lm_head"}
    assert manifest["stats"]["num_tokens"] == sum(s.input_ids.numel() for s in cache.samples)
    assert manifest["stats"]["num_supervised"] == sum(int(s.loss_mask.sum()) for s in cache.samples)
    assert not [p.name for p in cache.path.iterdir() if ".tmp-" in p.name]


def test_bytes_written_counts_every_committed_file(tmp_path):
    samples = make_samples(5, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    writer = CacheWriter(tmp_path, manifest_for(samples, shard_size=2))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    for i, s in enumerate(samples):
        writer.add(i, make_record(s, "probs", vocab, torch.float32, None))
    writer.write_side_file("target_embeddings", {"weight": torch.zeros(VOCAB, HIDDEN)})
    writer.close()
    files = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    assert writer.bytes_written == sum(p.stat().st_size for p in files)


def test_records_are_added_in_order_and_must_fit_the_manifest(tmp_path):
    samples = make_samples(3, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    writer = CacheWriter(tmp_path, manifest_for(samples, shard_size=2))
    record = make_record(samples[0], "probs", vocab, torch.float32, None)
    with pytest.raises(ValueError, match="add\\(\\) got sample 1 but the next sample must be 0"):
        writer.add(1, record)
    wrong = make_record(samples[0], "hidden", vocab, torch.float32, None)
    with pytest.raises(ValueError, match="carries the 'hidden' encoding but the cache stores 'probs'"):
        writer.add(0, wrong)
    narrow = SampleRecord(**{**vars(record), "aux_hidden_states": record.aux_hidden_states[:, :5]})
    with pytest.raises(ValueError, match=f"aux_hidden_states has width 5, expected len\\(layer_ids\\) \\* hidden_size = {AUX}"):
        writer.add(0, narrow)
    writer.add(0, vars(record))  # a dict with the record's field names works too
    with pytest.raises(ValueError, match="only 1 of 3 planned samples were added"):
        writer.close(complete=True)
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(1, record)


def test_sample_record_checks_shapes():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="M = loss_mask.sum\\(\\) = 2"):
        SampleRecord(input_ids=ids, loss_mask=torch.tensor([0, 1, 1, 0]), aux_hidden_states=torch.zeros(4, 3),
                     target_argmax=torch.zeros(3, dtype=torch.int64), target_probs=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="set exactly one encoding"):
        SampleRecord(input_ids=ids, loss_mask=torch.tensor([0, 1, 1, 0]), aux_hidden_states=torch.zeros(4, 3),
                     target_argmax=torch.zeros(2, dtype=torch.int64), target_probs=torch.zeros(2, 5),
                     final_hidden=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="loss_mask must hold only 0 and 1"):
        SampleRecord(input_ids=ids, loss_mask=torch.tensor([0, 2, 1, 0]), aux_hidden_states=torch.zeros(4, 3),
                     target_argmax=torch.zeros(2, dtype=torch.int64), final_hidden=torch.zeros(2, 5))


def test_background_error_is_raised_in_the_caller(tmp_path):
    samples = make_samples(6, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    records = [make_record(s, "probs", vocab, torch.float32, None) for s in samples]
    writer = CacheWriter(tmp_path / "c", manifest_for(samples, shard_size=2), queue_depth=1)
    shutil.rmtree(tmp_path / "c")  # the disk goes away under the writer thread
    with pytest.raises(RuntimeError, match="the background shard writer failed: FileNotFoundError") as info:
        for i, record in enumerate(records):
            writer.add(i, record)
        writer.close()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    writer.abort()  # never raises
    assert not writer._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(0, records[0])


def test_resume_over_a_manifest_with_committed_shards(tmp_path):
    samples = make_samples(7, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    records = [make_record(s, "probs", vocab, torch.float32, None) for s in samples]
    with pytest.raises(KeyboardInterrupt):
        with CacheWriter(tmp_path / "c", manifest_for(samples, shard_size=2)) as writer:
            for i in range(5):
                writer.add(i, records[i])
            raise KeyboardInterrupt  # interrupted inside shard 2: samples 0..3 are committed
    old = read_manifest(tmp_path / "c")
    assert [s["index"] for s in old["shards"]] == [0, 1] and old["complete"] is False
    writer = CacheWriter(tmp_path / "c", old)
    assert writer.next_index == 4
    for i in range(4, 7):
        writer.add(i, records[i])
    writer.write_side_file("target_embeddings", {"weight": torch.zeros(VOCAB, HIDDEN)})
    writer.close()
    with CacheWriter(tmp_path / "fresh", manifest_for(samples, shard_size=2)) as fresh:
        for i, record in enumerate(records):
            fresh.add(i, record)
        fresh.write_side_file("target_embeddings", {"weight": torch.zeros(VOCAB, HIDDEN)})
    resumed = read_manifest(tmp_path / "c")
    assert resumed["complete"] and resumed == read_manifest(tmp_path / "fresh")  # same bytes, same entries
    reader = open_cache(tmp_path / "c", verify=True)
    assert len(reader) == 7


def test_set_manifest_field_refuses_fields_that_shape_the_shards(tmp_path):
    samples = make_samples(2, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    writer = CacheWriter(tmp_path, manifest_for(samples))
    writer.set_manifest_field("dataset.skipped", {"too_long": 3})
    assert read_manifest(tmp_path)["dataset"]["skipped"] == {"too_long": 3}
    with pytest.raises(ValueError, match="'dataset.shuffle_seed' shapes the shards"):
        writer.set_manifest_field("dataset.shuffle_seed", 7)
    with pytest.raises(ValueError, match="'shards' shapes the shards or is kept by the writer"):
        writer.set_manifest_field("shards", [])
    writer.abort()


def test_side_file_shapes_are_checked(tmp_path):
    samples = make_samples(2, weight=torch.randn(VOCAB, HIDDEN), bias=torch.randn(VOCAB))
    writer = CacheWriter(tmp_path, manifest_for(samples))
    with pytest.raises(ValueError, match=f"weight has shape \\(3, 4\\), expected \\[V, H\\] = \\({VOCAB}, {HIDDEN}\\)"):
        writer.write_side_file("lm_head", {"weight": torch.zeros(3, 4)})
    writer.abort()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_records_are_cast_to_the_storage_dtype(tmp_path, dtype):
    cache = write_cache(tmp_path / "c", num_samples=3, dtype=dtype)
    reader = open_cache(cache.path)
    assert reader[0]["aux_hidden_states"].dtype == DTYPES[dtype]
    assert torch.equal(reader[0]["aux_hidden_states"], cache.samples[0].aux.to(DTYPES[dtype]))
