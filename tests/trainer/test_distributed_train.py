"""``draftcache train`` under a real ``torchrun`` with 2 CPU processes (gloo): DDP over the draft
must equal one process that accumulates the same two micro-batches per optimizer step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from prewarmed import run_python

from .pipeline_fixtures import build_tiny_target_dir, precompute_cache, write_chats


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    target = build_tiny_target_dir(root / "target")
    return precompute_cache(target, write_chats(root / "chats.jsonl", 16), root / "cache")


def _args(cache, out, *extra):
    return ["train", "--cached-target-path", str(cache), "--output-dir", str(out), "--max-steps", "4",
            "--ttt-steps", "2", "--batch-tokens", "0", "--batch-size", "2", "--val-fraction", "0",
            "--log-every", "1", "--save-every", "2", "--device", "cpu", "--quiet", *extra]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_python(cmd, env=env, timeout=300, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _torchrun(n: int, args: list[str]):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "draftcache.cli", *args]


@pytest.fixture(scope="module")
def ddp_run(cache, tmp_path_factory):
    """An uninterrupted 2-rank run: the reference of both tests below."""
    out = tmp_path_factory.mktemp("ddp_run") / "ddp"
    _run(_torchrun(2, _args(cache, out)))
    return out


def test_ddp_matches_single_process_on_the_same_global_batch(cache, ddp_run, tmp_path):
    _run([sys.executable, "-m", "draftcache.cli", *_args(cache, tmp_path / "single", "--grad-accum", "2")])
    a = load_file(str(ddp_run / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ddp = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3, 4]
    for x, y in zip(ddp, single):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["acc"] == pytest.approx(y["acc"], abs=1e-9)  # from summed counts on both ranks


def test_ddp_run_resumes_after_a_rank_is_killed(cache, ddp_run, tmp_path):
    """Kill the whole job (as a failed rank does) after its first checkpoint; resume with 2 ranks."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_torchrun(2, _args(cache, out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    import signal
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not (out / "step-0000002").is_dir():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "latest").is_file()
    _run(_torchrun(2, _args(cache, out, "--resume")))
    a = load_file(str(out / "export" / "model.safetensors"))
    b = load_file(str(ddp_run / "export" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
