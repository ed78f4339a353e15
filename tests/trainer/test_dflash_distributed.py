"""``draftcache train --method dspark|dflash`` under a real ``torchrun`` with 2 CPU processes (gloo), from a
dflash cache of the embedded default target: DDP over the draft must equal one process that
accumulates the same two micro-batches (with the same anchors) per optimizer step, and a resume
with another number of ranks is refused."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from prewarmed import SUBPROCESS_ENV, run_python



def _run(cmd):
    r = run_python(cmd, env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("dflash_ddp") / "cache"
    _run([sys.executable, "-m", "draftcache.precompute", "--method", "dflash", "--output-dir", str(out), "--dtype",
          "fp32", "--num-samples", "16", "--target-layer-ids", "2,5", "--batch-size", "4", "--quiet"])
    return out


# 16 samples packed into 200 tokens make 6 micro-batches in epochs 0 and 1: 3 optimizer steps an epoch on
# 2 ranks, or on one process with --grad-accum 2, so 4 steps cross an epoch with no rank padding its share.
def _args(cache, out, *extra):
    return ["train", "--method", "dflash", "--cached-target-path", str(cache), "--output-dir", str(out),
            "--max-steps", "4", "--block-size", "4", "--num-anchors", "16", "--batch-tokens", "200",
            "--val-fraction", "0", "--log-every", "1", "--save-every", "2", "--device", "cpu", "--quiet", *extra]


def _torchrun(n: int, args: list[str]):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "draftcache.cli", *args]


# DSpark is the DFlash block drafter plus a Markov head and a confidence head, so one 2-rank run of it
# exercises the drafter's DDP path and the heads' (a plain DFlash run would repeat the first half).
DSPARK = ["--method", "dspark", "--markov-rank", "4", "--confidence-head"]


@pytest.fixture(scope="module")
def ddp_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _run(_torchrun(2, [*_args(cache, out), *DSPARK]))
    return out, r.stdout


def test_ddp_matches_single_process_with_grad_accum(cache, ddp_run, tmp_path):
    """The same export and metrics as one process accumulating the same two micro-batches, the heads included."""
    ddp, stdout = ddp_run
    assert stdout.count("val sim tau") == 0 and stdout.count("train loss") == 1  # only rank 0 reports
    single = tmp_path / "single"
    _run([sys.executable, "-m", "draftcache.cli", *_args(cache, single, "--grad-accum", "2"), *DSPARK])
    a = load_file(str(ddp / "export" / "model.safetensors"))
    b = load_file(str(single / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("markov_head.") for k in a) and any(
        k.startswith("confidence_head.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    x = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    y = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in x] == [r["step"] for r in y] == [1, 2, 3, 4]  # rank 0 alone writes
    for p, q in zip(x, y):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-4)
        assert p["acc"] == pytest.approx(q["acc"], abs=1e-9)  # from counts summed over both ranks
        assert p["sim_tau"] == pytest.approx(q["sim_tau"], abs=1e-9)


def test_resume_with_another_world_size_is_refused(cache, ddp_run):
    """The run's recorded world size is checked before anything loads (the CLI in this process)."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    ddp, _ = ddp_run
    r = CliRunner().invoke(app, [*_args(cache, ddp, "--resume"), *DSPARK])
    assert r.exit_code == 1 and "world_size: 2 != 1" in r.stderr, r.stderr[-2000:]


def test_online_ddp_matches_single_process_with_validation(tmp_path):
    """Online, each rank runs its own copy of the embedded target on its share; the held-out split is
    split by rank too and its metric sums all-reduced (here both splits give an even number of
    micro-batches, so no rank pads its share and the two runs see the same batches)."""
    args = ["train", "--method", "dflash", "--max-steps", "2", "--block-size", "4", "--num-anchors", "16",
            "--batch-tokens", "200", "--val-fraction", "0.05", "--eval-every", "2", "--log-every", "1",
            "--device", "cpu", "--quiet"]
    _run(_torchrun(2, [*args, "--output-dir", str(tmp_path / "ddp")]))
    _run([sys.executable, "-m", "draftcache.cli", *args, "--output-dir", str(tmp_path / "single"), "--grad-accum", "2"])
    a = load_file(str(tmp_path / "ddp" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "export" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    x = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    y = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in x] == [(r["step"], r["split"]) for r in y] == [
        (1, "train"), (2, "train"), (2, "val")]
    for p, q in zip(x, y):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-4)
        assert p["acc"] == pytest.approx(q["acc"], abs=1e-9)
