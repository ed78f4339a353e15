"""Damaged caches fail loudly, naming the shard and the problem; never silently wrong data."""

from __future__ import annotations

import json
import os

import pytest

from draftcache.cache_format import CacheCorruptError, open_cache, read_manifest

from .synth import write_cache


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "c", num_samples=6, shard_size=2)


def test_truncated_shard(cache):
    path = cache.path / "shard-000001.safetensors"
    os.truncate(path, path.stat().st_size - 1)
    reader = open_cache(cache.path)
    reader[0], reader[1]  # other shards stay readable
    with pytest.raises(CacheCorruptError, match="shard-000001.safetensors: size mismatch: .* bytes on disk, the "
                                                "manifest records"):
        reader[2]


def test_flipped_byte_is_caught_with_verify(cache):
    path = cache.path / "shard-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard-000002.safetensors: checksum mismatch"):
        open_cache(cache.path, verify=True)[5]
    assert open_cache(cache.path, verify=True)[0]["input_ids"].numel() > 0


def test_deleted_shard(cache):
    (cache.path / "shard-000000.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="shard-000000.safetensors: missing from .* although the manifest "
                                                "lists it as committed"):
        open_cache(cache.path)[1]


def test_damaged_header_or_offsets(cache):
    path = cache.path / "shard-000000.safetensors"
    data = bytearray(path.read_bytes())
    data[0:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard-000000.safetensors: invalid safetensors header length"):
        open_cache(cache.path)[0]


def test_shard_that_disagrees_with_its_manifest_entry(cache):
    manifest = read_manifest(cache.path)
    other = cache.path / "shard-000001.safetensors"
    (cache.path / "shard-000000.safetensors").write_bytes(other.read_bytes())  # a swapped file
    manifest["shards"][0]["bytes"] = other.stat().st_size
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="shard-000000.safetensors: metadata first_sample='2', expected '0'"):
        open_cache(cache.path)[0]


def test_missing_side_file(cache):
    (cache.path / "target_embeddings.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="target_embeddings.safetensors: missing"):
        open_cache(cache.path).target_embeddings()
