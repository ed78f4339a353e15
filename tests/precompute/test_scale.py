"""What a precompute costs must not grow with the run: a shard commit is O(1) in the number of
shards, the encoding probe forward is released once used and not run when nothing needs it."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest

import draftcache.precompute.writer as writer_module
from draftcache.cache_format import verify_cache
from draftcache.cache_format.resume import read_journals
from draftcache.precompute import PrecomputeConfig, precompute_from_config
from draftcache.targets import HFEagle3TargetModel
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, read_manifest_json, target_dir, write_chat_subset


def _config(out: Path, data: Path, **changes) -> PrecomputeConfig:
    settings = dict(output_dir=str(out), target_model=target_dir(), input_data=str(data), dtype="fp32",
                    shard_size=1, batch_size=2, seq_length=64, progress=False)
    return PrecomputeConfig(**{**settings, **changes})


class _ManifestWrites:
    """Counts what rank 0 spends on ``manifest.json`` (validations, writes, bytes) during a run."""

    def __init__(self, monkeypatch):
        self.validations = self.writes = self.bytes = 0
        validate, write = writer_module.validate_manifest, writer_module.atomic_write_json

        def counting_validate(manifest):
            self.validations += 1
            return validate(manifest)

        def counting_write(path, data):
            self.writes += 1
            write(path, data)
            self.bytes += Path(path).stat().st_size

        monkeypatch.setattr(writer_module, "validate_manifest", counting_validate)
        monkeypatch.setattr(writer_module, "atomic_write_json", counting_write)


def test_manifest_cost_does_not_grow_with_the_number_of_shards(tmp_path, monkeypatch):
    """One sample per shard: a run of 4x the shards validates and writes manifest.json exactly as
    often (the journals carry the commits; the manifest is compacted at start and end)."""
    data = write_chat_subset(tmp_path / "chat.jsonl", 40)
    counts = {}
    for n in (3, 12):
        seen = _ManifestWrites(monkeypatch)
        precompute_from_config(_config(tmp_path / f"c{n}", data, num_samples=n, supervision="probs"),
                               log=lambda _: None)
        manifest = read_manifest_json(tmp_path / f"c{n}")
        assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(range(n))
        assert manifest["stats"]["num_tokens"] == sum(s["num_tokens"] for s in manifest["shards"])
        counts[n] = (seen.validations, seen.writes)
    assert counts[3] == counts[12], counts
    assert not list((tmp_path / "c12").glob("*.commits.jsonl"))  # compacted, journals gone


class _Forwards:
    """Counts the target's forwards and checks, at each, that no earlier forward's logits are
    still referenced (the probe's included: ``[B, T, V]``, gigabytes at a real vocabulary)."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls = 0
        self.alive_at_call: list[int] = []
        self.fail_at = fail_at
        self._logits: list[weakref.ref] = []
        real = HFEagle3TargetModel.forward_capture

        def counting(target, *args, **kwargs):
            self.calls += 1
            self.alive_at_call.append(sum(ref() is not None for ref in self._logits))
            if self.fail_at is not None and self.calls == self.fail_at:
                raise RuntimeError("injected failure")
            out = real(target, *args, **kwargs)
            self._logits.append(weakref.ref(out.logits))
            return out

        monkeypatch.setattr(HFEagle3TargetModel, "forward_capture", counting)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self._logits)


def _batches(manifest: dict, batch_size: int, shards) -> int:
    bounds = manifest["shard_boundaries"]
    return sum(-(-(bounds[k + 1] - bounds[k]) // batch_size) for k in shards)


def test_the_probe_forward_is_reused_then_released(tmp_path, monkeypatch):
    """auto on the embedded target measures the hidden rebuild with one probe forward (shard 0's
    first batch): it is not run twice, and it is gone before the next forward and after the run."""
    data = write_chat_subset(tmp_path / "chat.jsonl", 12)
    forwards = _Forwards(monkeypatch)
    logs: list[str] = []
    precompute_from_config(_config(tmp_path / "c", data, num_samples=8, shard_size=4), log=logs.append)
    manifest = read_manifest_json(tmp_path / "c")
    assert manifest["supervision"]["encoding"] == "hidden" and any(line.startswith("auto: hidden") for line in logs)
    assert forwards.calls == _batches(manifest, 2, range(manifest["num_shards"]))  # the probe counted once
    assert forwards.alive_at_call == [0] * forwards.calls
    assert forwards.alive() == 0


def test_resume_reuses_the_recorded_encoding_without_a_probe(tmp_path, monkeypatch):
    """A run stopped after its first shards is resumed: the recorded ``hidden`` choice is reused
    (a re-measurement would now pick ``probs``, the tolerance being negative, and the resume would be
    refused), and no probe forward runs: only the missing shards' batches are forwarded."""
    import draftcache.precompute.pipeline as pipeline

    data = write_chat_subset(tmp_path / "chat.jsonl", 12)
    out = tmp_path / "c"
    forwards = _Forwards(monkeypatch, fail_at=4)  # probe + shard 0's 2nd batch + shard 1's 2 batches, then fail
    with pytest.raises(RuntimeError, match="injected failure"):
        precompute_from_config(_config(out, data, num_samples=10, shard_size=4), log=lambda _: None)
    committed = [e["index"] for e in read_journals(out)]
    assert committed == [0]
    assert "1 more shard(s) are recorded in the commit journals" in "\n".join(verify_cache(out).notes)
    monkeypatch.setattr(pipeline, "REBUILD_PROB_TOLERANCE", -1.0)  # any measurement now refuses hidden
    forwards = _Forwards(monkeypatch)
    logs: list[str] = []
    precompute_from_config(_config(out, data, num_samples=10, shard_size=4, resume=True), log=logs.append)
    manifest = read_manifest_json(out)
    assert manifest["complete"] and manifest["supervision"]["encoding"] == "hidden"
    assert "resume: supervision hidden, as recorded in the cache (not measured again)" in logs
    assert forwards.calls == _batches(manifest, 2, range(1, manifest["num_shards"]))
    assert forwards.alive() == 0


def test_torchrun_ranks_use_rank_zeros_encoding_and_only_rank_zero_probes(tmp_path):
    """Two gloo ranks whose own measurements would disagree (rank 1's tolerance is below any
    difference): rank 0 measures once, both write ``hidden`` shards that the manifest describes,
    and rank 1 runs no probe forward (exactly its shards' batches)."""
    data = write_chat_subset(tmp_path / "chat.jsonl", 12)
    out = tmp_path / "c"
    args = ["--target-model", target_dir(), "--input-data", str(data), "--output-dir", str(out), "--dtype", "fp32",
            "--shard-size", "2", "--batch-size", "2", "--seq-length", "64", "--num-samples", "8", "--quiet"]
    job = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      str(Path(__file__).with_name("dist_encoding_job.py")), str(tmp_path), *args],
                     env=SUBPROCESS_ENV, timeout=120)
    assert job.returncode == 0, job.stderr[-3000:]
    manifest = read_manifest_json(out)
    assert manifest["supervision"]["encoding"] == "hidden" and manifest["num_shards"] == 4
    report = verify_cache(out)
    assert report.problems == [] and len(report.checked) == 4 + 2  # every shard fits the manifest; 2 side files
    forwards = [json.loads((tmp_path / f"forwards-rank{r}.json").read_text()) for r in (0, 1)]
    assert forwards == [2, 2]  # rank 0: probe (reused by shard 0) + shard 2; rank 1: shards 1 and 3


def test_no_tokenized_sample_is_kept_per_conversation(tmp_path, monkeypatch):
    """The tokenized data lives in a token store on disk: at every target forward the process holds
    at most one batch of ``TokenizedSample``s, not one per conversation (two int64 tensors per
    token: 24 GB per rank for 10^6 conversations of 1.5k tokens), and the store is removed after."""
    import gc
    import tempfile

    from draftcache.data import TokenizedSample

    alive: list[int] = []
    stores: set[str] = set()
    real = HFEagle3TargetModel.forward_capture

    def counting(target, *args, **kwargs):
        alive.append(sum(isinstance(o, TokenizedSample) for o in gc.get_objects()))
        stores.update(p.name for p in (tmp_path / "tmp").glob("draftcache-tokens-*"))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(HFEagle3TargetModel, "forward_capture", counting)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = write_chat_subset(tmp_path / "chat.jsonl", 16)
    precompute_from_config(_config(tmp_path / "c", data, num_samples=12, shard_size=4, supervision="probs"),
                           log=lambda _: None)
    assert len(alive) == 6 and max(alive) <= 2, alive  # batch_size 2
    assert len(stores) == 1 and not list((tmp_path / "tmp").glob("draftcache-tokens-*"))
