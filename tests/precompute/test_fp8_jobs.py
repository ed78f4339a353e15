"""fp8 caches keep the precompute's torchrun and resume guarantees: 2 gloo ranks (real ``torchrun``)
write the one-process fp8 cache byte for byte; a run SIGKILLed after its second shard commit and
resumed equals an uninterrupted run byte for byte; resuming it with another ``--dtype`` is
refused naming the flag, changing nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from draftcache.cache_format import verify_cache
from draftcache.precompute.cli import app
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, file_digests, read_manifest_json, target_dir, write_chat_subset

CRASH_JOB = Path(__file__).with_name("crash_job.py")
TIMEOUT = 120


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--target-model", target_dir(), "--input-data", str(data), "--output-dir", str(out), "--dtype", "fp8",
            "--shard-size", "2", "--batch-size", "2", "--seq-length", "64", "--num-samples", "10", "--quiet", *extra]


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """The uninterrupted one-process fp8 cache (in-process, one thread like the subprocesses) and a
    run killed after its second committed shard (left as the kill left it)."""
    root = tmp_path_factory.mktemp("fp8")
    data = write_chat_subset(root / "chat.jsonl", 14)
    reference = CliRunner().invoke(app, _args(root / "single", data))
    assert reference.exit_code == 0, reference.output
    killed = run_python([str(CRASH_JOB), "2", "--", *_args(root / "killed", data)], env=SUBPROCESS_ENV,
                        timeout=TIMEOUT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    return {"root": root, "data": data, "single": root / "single", "killed": root / "killed"}


def test_the_reference_is_an_fp8_cache_that_verifies(fp8):
    manifest = read_manifest_json(fp8["single"])
    assert manifest["dtype"] == "fp8" and manifest["complete"] is True and manifest["num_shards"] >= 4
    report = verify_cache(fp8["single"])
    assert report.problems == [] and len(report.checked) == manifest["num_shards"] + len(manifest["files"])


def test_two_torchrun_ranks_write_the_one_process_fp8_cache(fp8, tmp_path):
    out = tmp_path / "two"
    job = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                      "draftcache.precompute", *_args(out, fp8["data"])], env=SUBPROCESS_ENV, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr[-3000:]
    assert (out / "manifest.json").read_bytes() == (fp8["single"] / "manifest.json").read_bytes()
    assert file_digests(out) == file_digests(fp8["single"])  # every shard (fp8 values and scales) and side file


def test_a_killed_fp8_run_resumes_to_the_uninterrupted_cache(fp8, tmp_path):
    cache = tmp_path / "killed"
    shutil.copytree(fp8["killed"], cache)
    partial = read_manifest_json(cache)
    assert partial["complete"] is False and partial["shards"] == []  # the two commits are in the journal only
    assert len((cache / "rank-0.commits.jsonl").read_text().splitlines()) == 2
    with pytest.warns(UserWarning, match="removing stale lock .* left by process"):  # the killed run's
        resumed = CliRunner().invoke(app, _args(cache, fp8["data"], "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at sample 4" in resumed.stdout
    assert file_digests(cache) == file_digests(fp8["single"])
    assert read_manifest_json(cache) == read_manifest_json(fp8["single"])


def test_resuming_an_fp8_cache_with_another_dtype_is_refused_naming_the_flag(fp8, tmp_path):
    cache = tmp_path / "killed"
    shutil.copytree(fp8["killed"], cache)
    assert (cache / ".lock").exists()  # the killed process's, stale
    before = {name: digest for name, digest in file_digests(cache).items() if name != ".lock"}
    with pytest.warns(UserWarning, match="removing stale lock .* left by process"):
        refused = CliRunner().invoke(app, [*_args(cache, fp8["data"], "--resume"), "--dtype", "bf16"])
    assert refused.exit_code == 1
    assert "--resume refused" in refused.stderr
    assert 'dtype: "fp8" != "bf16"  [--dtype]' in refused.stderr
    assert file_digests(cache) == before  # nothing written; the stale lock removed and ours released
