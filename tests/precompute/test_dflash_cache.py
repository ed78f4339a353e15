"""``precompute-eagle3 --method dflash`` through the shared cache machinery: two ``torchrun``
ranks (gloo, CPU) write the one-process cache byte for byte, and ``--resume`` rewrites a lost
shard to the same bytes. (The cache's contents are checked against the online target in
tests/trainer/test_dflash_cache.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, file_digests, read_manifest_json, target_dir, write_chat_subset


def _args(out: Path, data: Path, *extra: str, layers: str = "2,5") -> list[str]:
    return ["--method", "dflash", "--target-model", target_dir(), "--input-data", str(data), "--output-dir", str(out),
            "--dtype", "fp32", "--shard-size", "4", "--batch-size", "2", "--seq-length", "96", "--num-samples", "24",
            "--target-layer-ids", layers, "--quiet", *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return run_python(cmd, env=SUBPROCESS_ENV, timeout=180)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash_precompute")
    data = write_chat_subset(root / "chats.jsonl", 30)
    r = _run([sys.executable, "-m", "draftcache.precompute", *_args(root / "one", data)])
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "one", data


def test_two_ranks_write_the_one_process_dflash_cache(one_process, tmp_path):
    one, data = one_process
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "draftcache.precompute", *_args(tmp_path / "two", data)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_digests(one) == file_digests(tmp_path / "two")
    manifest = read_manifest_json(one)
    assert manifest["kind"] == "dflash" and manifest["num_shards"] == 6 and manifest["complete"]


def test_resume_rewrites_a_lost_dflash_shard(one_process, tmp_path):
    one, data = one_process
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    (copy / "shard-000003.safetensors").unlink()
    r = _run([sys.executable, "-m", "draftcache.precompute", *_args(copy, data, "--resume")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_digests(one) == file_digests(copy)
    r = _run([sys.executable, "-m", "draftcache.precompute", *_args(copy, data, "--resume", layers="2,6")])
    assert r.returncode == 1 and "capture.layer_ids: [2, 5] != [2, 6]  [--target-layer-ids]" in r.stderr, r.stderr
