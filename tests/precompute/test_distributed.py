"""``torchrun`` precompute (2 gloo ranks on the CPU, real subprocesses): the cache equals a
one-process cache byte for byte; every sample lands exactly once; a job whose rank is SIGKILLed
fails and ``--resume`` completes it with 1 or 2 ranks; a strict-mode bad record (read by rank 0,
which tokenizes for all) fails every rank fast with a message naming the rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from draftcache.precompute.cli import app
from draftcache.precompute.planning import plan_shards
from draftcache.precompute.writer import assign_shards
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, file_digests, read_manifest_json, target_dir, write_chat_subset

NUM_SAMPLES = 64
SHARD_SIZE = 4
JOB_TIMEOUT = 120  # seconds; a hung job fails the test instead of the suite


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--target-model", target_dir(), "--input-data", str(data), "--output-dir", str(out),
            "--dtype", "fp32", "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--seq-length", "96",
            "--num-samples", str(NUM_SAMPLES), "--quiet", *extra]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "draftcache.precompute", *args]


def _run_job(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return run_python(_torchrun(nproc, *args), env=SUBPROCESS_ENV,
                          timeout=JOB_TIMEOUT)


def _journal_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob("rank-*.commits.jsonl"))


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of ``rank``'s worker among the torchrun agent's children (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{agent}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The one-process reference (in-process, one thread like the subprocesses), a fresh 2-rank
    cache, and a 2-rank job whose rank 1 was SIGKILLed after the first shard was journaled."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_chat_subset(root / "chat.jsonl", NUM_SAMPLES + 10)
    reference = CliRunner().invoke(app, _args(root / "single", data))
    assert reference.exit_code == 0, reference.output

    fresh = _run_job(2, *_args(root / "two", data))
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    killed = root / "killed"
    job = subprocess.Popen(_torchrun(2, *_args(killed, data)), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        victim = None
        while time.monotonic() < deadline and job.poll() is None:
            if killed.is_dir() and _journal_lines(killed) >= 1:
                victim = _worker_pid(job.pid, rank=1)
                if victim is not None:
                    break
            time.sleep(0.02)
        assert victim is not None, f"the job ended (rc {job.returncode}) before a rank could be killed mid-way"
        killed_at = time.monotonic()
        shards_at_kill = _journal_lines(killed)
        signal_ok = True
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            signal_ok = False
        _, stderr = job.communicate(timeout=JOB_TIMEOUT)
        teardown_s = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert signal_ok, "rank 1 ended before it could be killed"
    return {"root": root, "data": data, "single": root / "single", "two": root / "two", "killed": killed,
            "job_rc": job.returncode, "job_stderr": stderr, "teardown_s": teardown_s,
            "shards_at_kill": shards_at_kill}


def test_two_ranks_write_the_one_process_cache(caches):
    single, two = caches["single"], caches["two"]
    assert (two / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    assert file_digests(two) == file_digests(single)  # every shard and side file; no journal left behind
    manifest = read_manifest_json(two)
    assert manifest["complete"] is True
    assert len(manifest["shards"]) == -(-manifest["num_samples"] // SHARD_SIZE) >= 8


def test_every_sample_lands_once_in_global_order(caches):
    """The union of the 2-rank shards is the dataset: per-shard counts and every sample's tokens
    equal the one-process cache's (which reads the file in order)."""
    single, two = caches["single"], caches["two"]
    manifest = read_manifest_json(two)
    total = manifest["num_samples"]  # usable conversations (the subset has a few too long for --seq-length)
    assert total == read_manifest_json(single)["num_samples"] > NUM_SAMPLES // 2
    covered = []
    for entry in manifest["shards"]:
        assert entry["num_samples"] == min(SHARD_SIZE, total - entry["first_sample"])
        covered += range(entry["first_sample"], entry["first_sample"] + entry["num_samples"])
        mine, ref = load_file(two / entry["file"]), load_file(single / entry["file"])
        assert torch.equal(mine["sample_offsets"], ref["sample_offsets"])
        assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert covered == list(range(total))


def test_shards_are_dealt_round_robin_without_gaps():
    plans = plan_shards([0, 4, 8, 12, 16, 20, 23])  # 6 shards, the last one short
    per_rank = [[p.index for p in assign_shards(plans, r, 4) if p is not None] for r in range(4)]
    assert per_rank == [[0, 4], [1, 5], [2], [3]]
    assert sorted(i for shards in per_rank for i in shards) == [p.index for p in plans]


def test_killed_rank_fails_the_job_fast_and_leaves_journaled_shards(caches):
    assert caches["job_rc"] != 0
    stderr = caches["job_stderr"]
    # torchrun names the killed rank and its signal; rank 0 says why it stopped instead of hanging
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\n\s+exitcode\s+: -9", stderr), stderr[-3000:]
    if "rank 0 stopped" in stderr:  # it was in a collective when rank 1 died (otherwise torchrun stopped it first)
        assert "another rank stopped answering" in stderr
    assert caches["teardown_s"] < 60, f"the job took {caches['teardown_s']:.0f} s to end after a rank was killed"
    killed = caches["killed"]
    assert (killed / "manifest.json").is_file()
    assert read_manifest_json(killed)["complete"] is False
    assert _journal_lines(killed) >= caches["shards_at_kill"] >= 1


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_completes_a_killed_job_with_any_number_of_ranks(caches, nproc, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(caches["killed"], crashed)
    args = _args(crashed, caches["data"], "--resume")
    if nproc == 1:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    else:
        result = _run_job(2, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    assert file_digests(crashed) == file_digests(caches["single"])


def test_strict_bad_record_fails_every_rank_naming_it(tmp_path):
    data = write_chat_subset(tmp_path / "chat.jsonl", 12)
    lines = data.read_text().splitlines()
    lines[2] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    result = _run_job(2, *_args(tmp_path / "cache", data, "--strict"))
    assert result.returncode != 0
    assert time.monotonic() - t0 < 60
    # rank 0 alone reads and tokenizes the data (once, into a token store): both ranks stop naming it
    assert result.stderr.count("error: rank 0 failed: loading and tokenising the data") == 2, result.stderr[-3000:]
    assert f"{data}:3: bad record (invalid_json)" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_manifest_is_written_by_rank_zero_only(caches):
    """No journal or lock survives a completed job, and the manifest lists shards in index order."""
    two = caches["two"]
    names = sorted(p.name for p in two.iterdir())
    assert not [n for n in names if n.endswith(".commits.jsonl") or n == ".lock"]
    indices = [e["index"] for e in json.loads((two / "manifest.json").read_text())["shards"]]
    assert indices == sorted(indices)


def test_resume_verification_is_split_between_ranks_and_finds_damage_on_each(caches, tmp_path):
    """Two ranks resume a complete cache with two damaged shards: candidate shard k is hashed by
    rank k % 2 (in a step on the long-timeout group), rank 0 reports both, and the rewritten
    cache equals the one-process cache."""
    cache = tmp_path / "cache"
    shutil.copytree(caches["two"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False  # an interrupted run's manifest, every shard still listed
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for index in (2, 5):  # verified by rank 0 and rank 1
        shard = cache / f"shard-{index:06d}.safetensors"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    result = _run_job(2, *_args(cache, caches["data"], "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    for index in (2, 5):
        assert f"resume: shard-{index:06d}.safetensors: checksum mismatch" in result.stdout + result.stderr
    assert file_digests(cache) == file_digests(caches["single"])


def test_byte_capped_shards_are_the_same_for_one_and_two_ranks(caches, tmp_path):
    """--max-shard-mb cuts shards by bytes (from the sample lengths, known before the forward), so
    the cache is still the same whoever computes it, and every shard respects the cap."""
    cap_mb = 0.05
    capped = [*_args(tmp_path / "one", caches["data"]), "--max-shard-mb", str(cap_mb)]
    one = CliRunner().invoke(app, capped)
    assert one.exit_code == 0, one.output
    two = _run_job(2, *_args(tmp_path / "two", caches["data"]), "--max-shard-mb", str(cap_mb))
    assert two.returncode == 0, two.stderr[-3000:]
    assert file_digests(tmp_path / "one") == file_digests(tmp_path / "two")
    manifest = read_manifest_json(tmp_path / "one")
    assert manifest["max_shard_bytes"] == int(cap_mb * 1e6)
    assert manifest["num_shards"] > -(-NUM_SAMPLES // SHARD_SIZE)  # the byte cap cut more shards than --shard-size
    for entry in manifest["shards"]:
        header = 8 + int.from_bytes((tmp_path / "one" / entry["file"]).read_bytes()[:8], "little")
        assert entry["bytes"] - header <= cap_mb * 1e6 or entry["num_samples"] == 1, entry
