"""``scripts/gpu_check.sh --dry-run``: every step of the GPU check but the GPU itself, on CPU at the
smallest sizes, so the script cannot rot between the rare runs on a GPU machine.

Its steps are also the smallest-size runs of ``benchmarks/precompute_overhead.py`` and
``benchmarks/scale_training.py``'s CLI, so their result lines are checked here rather than by a
second run of each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_on_cpu():
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    summary = out[out.index("=== summary (dry run, CPU"):]
    for name in ("cuda-tests", "precompute-overhead", "training-memory", "dspark-vllm"):
        assert re.search(rf"^ok +{name} \(\d+s\)$", summary, re.M), summary
    assert re.search(r"^skipped vllm-runner \(.+\)$", summary, re.M), summary
    assert re.search(r"^RATIO run_precompute / bare forward ratio=[0-9.]+", summary, re.M), summary
    assert re.search(r"^eagle3 TTT step peak, T=16 +[0-9.]+ GB", summary, re.M), summary
    assert re.search(r"^dspark ours: K 8, tau [0-9.]+, .* lossless yes$", summary, re.M), summary
    # precompute_overhead.py: the data it ran on and the bare forward it divides by
    assert re.search(r"^data +samples=4 .* shards=2 +full_shards=2 ", out, re.M), out
    assert re.search(r"^bare HF forward +seconds=[0-9.e-]+ +tokens_per_s=", summary, re.M), summary
    # scale_training.py: the unchunked and the chunked DFlash loss are the same loss
    losses = [float(m) for m in re.findall(r"^dflash loss\+backward peak, (?:old|new), A=8 +[0-9.]+ GB +[^;]*, "
                                           r"fp32;.* loss ([0-9.]+)$", summary, re.M)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4, summary
    assert re.search(r"^dflash old/new peak ratio, A=8 +[0-9.]+ x +S=48 Bk=4 V=256 ", summary, re.M), summary
    # the CUDA-only tests were found and collected (their files skip without a GPU)
    assert re.search(r"^([1-9]\d*) tests? collected", out, re.M), out


def test_without_a_gpu_the_real_run_refuses_and_points_at_the_dry_run():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "torch sees no CUDA device here; run with --dry-run" in r.stderr, r.stderr
