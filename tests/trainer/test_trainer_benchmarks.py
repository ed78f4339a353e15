"""The trainer's benchmark scripts at their smallest sizes, in a subprocess, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from prewarmed import SUBPROCESS_ENV, run_python

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_python([str(BENCHMARKS / script), *args], env=SUBPROCESS_ENV, timeout=600)


def test_ttt_memory_benchmark_runs_both_variants_side_by_side():
    r = _run("ttt_memory.py", "--shape", "tiny", "--repeats", "1", "--ttt-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("shape tiny: B=1 T=64 Vd=256 ttt_steps=3 device=cpu")
    losses = [float(re.search(rf"^{v} +peak +[0-9.]+ MiB .* loss ([0-9.]+)$", line).group(1))
              for v, line in zip(("fused", "eager"), lines[1:3])]
    assert losses[0] == losses[1] or abs(losses[0] - losses[1]) < 1e-4
    assert re.match(r"^ratio  eager/fused peak memory [0-9.]+x   step time [0-9.]+x wall, [0-9.]+x CPU$", lines[3])


def test_distribution_loss_memory_benchmark_prints_old_and_new_side_by_side():
    r = _run("distribution_loss_memory.py", "--vocab", "4096", "--rows", "64", "--seq", "32", "--hidden", "32",
             "--chunk-elements", str(16 * 4096))  # 4 chunks
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("distribution term, teacher final_hidden: N=64 slots, T=32, V=4096, H=32, H_t=32, "
                               "device=cpu")
    losses = [float(re.match(rf"^{path} +peak +[0-9,]+ B = +[0-9.]+ GB +loss ([0-9.]+) +grad norm [0-9.e+-]+$",
                             line).group(1)) for path, line in zip(("old", "new"), lines[1:3])]
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0]
    assert re.match(r"^ratio old/new peak memory [0-9.]+x \(full \[N, V\] fp32 = 0.001 GB\)$", lines[3])


def test_quality_gate_fails_below_its_threshold(tmp_path):
    """Two training steps leave a draft far below any threshold: the gate reports it and exits 1."""
    r = _run("quality_gate.py", "--out", str(tmp_path / "qg"), "--max-steps", "2", "--num-samples", "16",
             "--num-prompts", "2", "--max-new-tokens", "8", "--min-tau", "4.5", "--threads", "1")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    tau = float(re.search(r"^real tau +([0-9.]+) emitted tokens per verify step", r.stdout, re.M).group(1))
    assert tau < 4.5
    assert "lossless        True" in r.stdout
    assert f"gate            FAIL: real tau {tau:.3f} < --min-tau 4.5" in r.stdout


def test_dflash_vs_eagle3_benchmark_prints_both_drafts_and_the_ratio(tmp_path):
    r = _run("dflash_vs_eagle3.py", "--out", str(tmp_path / "cmp"), "--max-steps", "2", "--num-prompts", "2",
             "--max-new-tokens", "8", "--num-anchors", "16", "--block-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("training    2 steps of <= 1024 tokens each: eagle3 ")
    for name, line in zip(("eagle3", "dflash"), lines[1:3]):
        assert re.match(rf"^{name} +K=3 tau [0-9.]+  accept/pos [0-9. ]+  spec [0-9.]+ tok/s  greedy [0-9.]+ tok/s  "
                        r"speedup [0-9.]+x  lossless yes$", line), line
    assert re.match(r"^ratio       dflash/eagle3 tau [0-9.]+x  speedup [0-9.]+x", lines[3])
