"""The ``draftcache`` inspection commands through the real CLI in subprocesses: stdout and exit codes."""

from __future__ import annotations

import subprocess

import pytest
from prewarmed import SUBPROCESS_ENV, run_python



def _run(*args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", *args], env=SUBPROCESS_ENV, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cache"
    r = _run("draftcache.precompute", "--output-dir", str(out), "--num-samples", "12", "--shard-size", "4",
             "--seq-length", "256", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_inspect_stats_show(cache):
    r = _run("draftcache.cli", "inspect", str(cache))
    assert r.returncode == 0 and "format       v2 eagle3, complete" in r.stdout
    assert sum(line.startswith("shard-0000") for line in r.stdout.splitlines()) == 3
    r = _run("draftcache.cli", "stats", str(cache))
    assert r.returncode == 0 and "samples" in r.stdout and "supervised" in r.stdout
    r = _run("draftcache.cli", "show", str(cache), "0")
    assert r.returncode == 0 and "[[" in r.stdout  # supervised spans are marked
    r = _run("draftcache.cli", "show", str(cache), "99")
    assert r.returncode == 1 and "99" in r.stderr and "Traceback" not in r.stderr


def test_verify_exit_code_names_the_damaged_shard(cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    assert _run("draftcache.cli", "verify", str(copy)).returncode == 0
    shard = copy / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = _run("draftcache.cli", "verify", str(copy))
    assert r.returncode == 1 and "shard-000001.safetensors" in r.stdout + r.stderr


def test_missing_cache_is_a_clear_error(tmp_path):
    r = _run("draftcache.cli", "inspect", str(tmp_path / "nope"))
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr
