"""Manifest: schema file, validation, version checks."""

from __future__ import annotations

import copy
import filecmp
import json
from pathlib import Path

import pytest
import torch

from draftcache.cache_format import (
    FORMAT_VERSION,
    FormatVersionError,
    Manifest,
    ManifestError,
    load_manifest_schema,
    open_cache,
    read_manifest,
    validate_manifest,
)
from draftcache.cache_format.manifest import _structure_problems

from .synth import HIDDEN, VOCAB, make_samples, manifest_for, write_cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return manifest_for(make_samples(3, weight=torch.zeros(VOCAB, HIDDEN), bias=torch.zeros(VOCAB)))


def test_top_level_manifests_dir_is_the_packaged_schema():
    packaged = REPO / f"src/draftcache/cache_format/schemas/cache_manifest.v{FORMAT_VERSION}.schema.json"
    top = REPO / f"manifests/cache_manifest.v{FORMAT_VERSION}.schema.json"
    assert top.exists() and filecmp.cmp(packaged, top, shallow=False)
    assert load_manifest_schema() == json.loads(packaged.read_text())


def test_new_manifest_is_valid_and_round_trips_through_json(manifest):
    assert manifest["format_version"] == FORMAT_VERSION and manifest["complete"] is False
    assert manifest["capture"]["hf_hidden_states_index"] == [2, 4, 6]
    loaded = Manifest.from_json(Manifest(manifest).to_json())
    assert loaded.data == manifest
    assert loaded.aux_dim == 3 * HIDDEN and loaded.num_shards == 1


def _broken(manifest: dict) -> dict:
    bad = copy.deepcopy(manifest)
    del bad["tokenizer"]["fingerprint"]
    bad["seq_length"] = "long"
    bad["dtype"] = "int4"
    bad["supervision"]["encoding"] = "logits"
    bad["extra"] = 1
    bad["token_counts"][3] = -2
    return bad


PROBLEM_PATHS = ["token_counts", "tokenizer", "seq_length", "dtype", "encoding", "extra"]


def test_every_structural_problem_is_listed(manifest):
    with pytest.raises(ManifestError) as info:
        validate_manifest(_broken(manifest))
    assert len(info.value.problems) == 6
    for path, problem in zip(sorted(PROBLEM_PATHS), sorted(info.value.problems, key=_problem_topic)):
        assert path in problem or (path == "extra" and "'extra'" in problem), problem


def _problem_topic(problem: str) -> str:
    for path in PROBLEM_PATHS:
        if path in problem:
            return path
    return problem


def test_structure_problems_name_the_failing_node(manifest):
    problems = _structure_problems(_broken(manifest))
    assert "$.seq_length: must be integer" in problems
    assert "$.supervision.encoding: must be one of ['probs', 'topk', 'hidden', 'argmax']" in problems
    assert _structure_problems(manifest) == []


def test_dataset_section_accepts_descriptive_extras_but_others_do_not(manifest):
    extra = copy.deepcopy(manifest)
    extra["dataset"].update({"kind": "jsonl", "datasets_fingerprint": None})
    validate_manifest(extra)
    extra["target"]["revision"] = "main"
    with pytest.raises(ManifestError, match="revision"):
        validate_manifest(extra)


def test_cross_field_rules(manifest):
    bad = copy.deepcopy(manifest)
    bad["num_shards"] = 5
    bad["draft_vocab"]["size"] = 3
    bad["supervision"]["topk"] = 4
    bad["capture"]["hf_hidden_states_index"] = [1, 3, 5]
    bad["stats"]["num_tokens"] = 9
    with pytest.raises(ManifestError) as info:
        validate_manifest(bad)
    text = str(info.value)
    assert "num_shards is 5 but shard_boundaries describe 1 shards" in text
    assert "draft_vocab.size is 3 but selected_token_ids has 23 ids" in text
    assert "supervision.topk must be null when supervision.encoding is 'probs'; got 4" in text
    assert "capture.hf_hidden_states_index [1, 3, 5] must be layer_ids + 1 = [2, 4, 6]" in text
    assert "stats.num_tokens is 9 but the shards sum to 0" in text
    assert len(info.value.problems) == 5


def test_unknown_format_version_is_rejected_naming_the_expected_one(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=2)
    path = cache.path / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(FormatVersionError, match="cache format_version 1 is not supported: this draftcache reads "
                                                 "format_version 2"):
        open_cache(cache.path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_manifest(cache.path)
    with pytest.raises(FileNotFoundError, match="is not a draftcache cache directory"):
        read_manifest(tmp_path / "nowhere")


def test_manifest_json_keeps_long_lists_on_one_line(tmp_path):
    cache = write_cache(tmp_path / "c", num_samples=9, shard_size=4)
    lines = (cache.path / "manifest.json").read_text().splitlines()
    assert sum(1 for line in lines if '"token_counts"' in line) == 1
    assert sum(1 for line in lines if line.strip().startswith('{"file": "shard-')) == 3


def test_shard_boundaries_rules(manifest):
    """Shards are cut where ``shard_boundaries`` say, each holding 1..shard_size samples."""
    assert manifest["shard_boundaries"] == [0, 3] and manifest["num_shards"] == 1
    bad = copy.deepcopy(manifest)
    bad["shard_boundaries"] = [0, 2, 2, 3]
    bad["num_shards"] = 3
    with pytest.raises(ManifestError, match="strictly increasing with at most shard_size 4"):
        validate_manifest(bad)
    bad["shard_boundaries"] = [0, 2]
    bad["num_shards"] = 1
    with pytest.raises(ManifestError, match="must run from 0 to num_samples 3"):
        validate_manifest(bad)
