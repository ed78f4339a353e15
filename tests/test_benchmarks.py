"""Every precompute / cache benchmark script at its smallest size, in a subprocess, so none can
rot (the trainer's are in tests/trainer/test_trainer_benchmarks.py). Each test checks the
script's result lines, not its numbers."""

from __future__ import annotations

import re
from pathlib import Path
from prewarmed import SUBPROCESS_ENV, run_python


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TINY = ["--seq-length", "64", "--median-tokens", "32"]


def _run(script: str, *args: str) -> str:
    r = run_python([str(BENCHMARKS / script), *args], env=SUBPROCESS_ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_precompute_memory_prints_the_curve_for_each_shard_size(tmp_path):
    out = _run("precompute_memory.py", "--num-samples", "4", "--shard-sizes", "2,4", "--batch-size", "2",
               "--vocab-size", "512", "--draft-vocab-size", "64", "--seq-length", "64", "--median-tokens", "32")
    rows = re.findall(r"^ +(\d+) +([0-9.]+) +([0-9.-]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [2, 4], out


def test_disk_usage_compares_the_encodings_asked_with_a_bf16_target():
    out = _run("disk_usage.py", "--shape", "1024-32k", "--vocab-size", "512", "--intermediate-size", "64",
               "--draft-vocab-sizes", "64", "--topk", "4", "--num-samples", "2", "--no-embedded",
               "--encodings", "topk,hidden", "--target-dtype", "bf16", *TINY)
    assert re.findall(r"ours (\w+)(?: k=\d+)? (\w+), Vd=64", out) == [("topk", "bf16"), ("topk", "fp8"), ("hidden", "bf16"),
                                                             ("hidden", "fp8")], out
    assert re.search(r"ours hidden bf16, Vd=64 +bytes_per_token=[0-9.]+", out), out
    assert re.search(r"ours hidden fp8, Vd=64 +bytes_per_token=[0-9.]+ .*fp8_over_bf16=0\.[0-9]+", out), out
    assert re.search(r"target forwards run +batches=1 +peak_rss_GB=[0-9.]+", out), out


def test_reader_throughput_runs_every_path():
    out = _run("reader_throughput.py", "--encodings", "hidden", "--num-samples", "4", "--hidden-size", "64",
               "--vocab-size", "512", "--draft-vocab-size", "64", "--shard-size", "2", "--batch-tokens", "128",
               "--batch-size", "2", "--loader-threads", "1", "--workers", "0", "--dense-batches", "1",
               "--repeats", "1", "--window-mb", "0.02", *TINY)  # a window of ~20 kB: the cache is several
    for depth in (1, 8):  # the default comparison: one request at a time vs IO_DEPTH in flight
        for plan in ("global", "window"):  # the global shuffle and the trainers' window-block shuffle
            assert re.search(rf"loader \(1 threads, io depth {depth}, {plan} plan\) +GB_per_s=[0-9.e-]+ .*ratio=[0-9.e-]+",
                             out), out
    for plan in ("global", "window"):
        assert re.search(rf"^  {plan} plan +windows=[0-9]+ +runs_per_window=[0-9.]+ +MB_per_run=[0-9.e-]+", out,
                         re.M), out


def test_precompute_scaling_writes_the_same_cache_with_two_ranks():
    out = _run("precompute_scaling.py", "--num-samples", "8", "--seq-length", "64", "--shard-size", "2",
               "--batch-size", "2", "--nproc", "2")
    assert re.search(r"2 vs 1 process +throughput_ratio=[0-9.]+ +e2e_ratio=[0-9.]+ +identical_cache=True", out), out


def test_scale_prints_flat_ratios_for_commits_and_tokenization():
    out = _run("scale.py", "--parts", "manifest,tokenize,training", "--commit-points", "10,100", "--commit-repeats",
               "3", "--tokenize-sizes", "100,200", "--tokenize-modes", "store", "--no-training")
    assert re.search(r"^manifest commit after 100 shards, ours +[0-9.e+-]+ ms +previous design [0-9.e+-]+ ms", out,
                     re.M), out
    assert re.search(r"^RATIO commit time 100 / 10 shards, ours +[0-9.e+-]+ x +previous design [0-9.e+-]+ x", out,
                     re.M), out
    assert re.search(r"^RATIO tokenize\+plan RSS rise N=200 / N=100, store +[0-9.e+-]+ x", out, re.M), out
    assert "training memory: skipped (--no-training)" in out
