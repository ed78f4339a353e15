"""Peak host memory (RSS) of the precompute against the shard size: this checkout's code, and
optionally another checkout's ``src`` side by side (``--base-src``), each point in a fresh process.

Chats have equal lengths by default (``--sigma 0``): with mixed lengths, a bigger shard's
length-bucketed first batch packs the longest samples together, whose forward working set is
larger whatever the writer holds. The target is a small random-init Llama whose records are large (``probs`` over a draft
vocabulary of ``--draft-vocab-size`` in fp32: 4 * Vd bytes per supervised token), so the records
dominate memory and the effect of the shard size shows. Each point reports the peak RSS of the
process during ``run_precompute`` minus its RSS just before (model built, data tokenised), and the
cache's bytes per shard for scale.

    git worktree add --detach /tmp/base <old commit>
    python benchmarks/precompute_memory.py --base-src /tmp/base/src          # ~1 min on 2 CPU cores
    python benchmarks/precompute_memory.py --num-samples 8 --shard-sizes 2,8  # smallest (the test's)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
THIS_SRC = HERE.parent / "src"

# Runs in the child process, with PYTHONPATH = the src under test. Prints one JSON line.
_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, {bench!r})
from _common import ChatLengths, build_llama, build_word_tokenizer, write_chats
import draftcache
from draftcache.data import load_conversations
from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations

args = json.loads({args!r})
torch.set_num_threads(1)
torch.manual_seed(0)
vocab = args["vocab_size"]
model = build_llama("1024-32k", num_layers=3, vocab_size=vocab, intermediate_size=256)
tokenizer = build_word_tokenizer(vocab)
from draftcache.targets import HFEagle3TargetModel
target = HFEagle3TargetModel(model, aux_layer_ids=[0, 1, 2])
work = Path(tempfile.mkdtemp(prefix="draftcache-mem-"))
data = work / "chats.jsonl"
write_chats(data, args["num_samples"], vocab_size=vocab, lengths=ChatLengths(args["median_tokens"], args["sigma"],
            max_tokens=args["seq_length"]))
conversations = load_conversations(str(data))
fields = dict(output_dir=str(work / "cache"), seq_length=args["seq_length"], draft_vocab_size=args["draft_vocab_size"],
              batch_size=args["batch_size"], shard_size=args["shard_size"], dtype="fp32", supervision="probs",
              aux_layer_ids=(0, 1, 2), progress=False)
if "max_shard_mb" in PrecomputeConfig.__dataclass_fields__:
    fields["max_shard_mb"] = None  # the shard size alone decides, as in the old code
cfg = PrecomputeConfig(**fields)
samples = tokenize_conversations(cfg, tokenizer, conversations)
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kb()
import threading, time
peak = [before]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.002)
watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
summary = run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                         model_id="bench", log=lambda _: None)
stop.set(); watcher.join()
peak[0] = max(peak[0], rss_kb())
manifest = json.loads((work / "cache" / "manifest.json").read_text())
shard_bytes = max(e["bytes"] for e in manifest["shards"])
print(json.dumps({{"src": draftcache.__file__, "peak_extra_mb": (peak[0] - before) / 1024,
                  "max_shard_mb": shard_bytes / 1e6, "cache_mb": summary.cache_bytes / 1e6,
                  "num_shards": len(manifest["shards"])}}))
import shutil; shutil.rmtree(work, ignore_errors=True)
"""


def measure(src: Path, args: argparse.Namespace, shard_size: int) -> dict:
    child_args = json.dumps({"vocab_size": args.vocab_size, "num_samples": args.num_samples,
                             "median_tokens": args.median_tokens, "sigma": args.sigma, "seq_length": args.seq_length,
                             "draft_vocab_size": args.draft_vocab_size, "batch_size": args.batch_size,
                             "shard_size": shard_size})
    code = _CHILD.format(bench=str(HERE), args=child_args)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as cwd:  # not the repository root: its src must not shadow --base-src
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd,
                                timeout=args.timeout)
    if result.returncode != 0:
        raise SystemExit(f"the precompute with {src} at shard size {shard_size} failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if not out["src"].startswith(str(src)):
        raise SystemExit(f"expected draftcache from {src}, the child imported {out['src']}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-src", type=Path, default=None, help="the src/ of another checkout to compare with")
    parser.add_argument("--shard-sizes", default="8,16,32,64", help="comma-separated samples per shard")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--median-tokens", type=float, default=384)
    parser.add_argument("--sigma", type=float, default=0.0,
                        help="log-normal sigma of chat lengths; 0: equal lengths, so every batch has the same "
                             "working set and only what is held across batches differs between shard sizes")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.shard_sizes.split(",")]
    sources = [("new", THIS_SRC)] + ([("base", args.base_src.resolve())] if args.base_src else [])
    print(f"precompute peak RSS above the pre-run RSS, {args.num_samples} samples (median {args.median_tokens:g} "
          f"tokens), probs over {args.draft_vocab_size} draft tokens in fp32, batch {args.batch_size}")
    header = f"{'shard_size':>10s} {'shard_MB':>9s}" + "".join(f" {name + '_peak_MB':>14s}" for name, _ in sources)
    if args.base_src:
        header += f" {'base/new':>9s}"
    print(header, flush=True)
    for size in sizes:  # one row at a time: each point is a fresh process, minutes on a busy machine
        got = {name: measure(src, args, size) for name, src in sources}
        text = f"{size:>10d} {got['new']['max_shard_mb']:>9.1f}" + "".join(
            f" {got[name]['peak_extra_mb']:>14.1f}" for name, _ in sources)
        if args.base_src:
            text += f" {got['base']['peak_extra_mb'] / max(got['new']['peak_extra_mb'], 1e-9):>9.2f}"
        print(text, flush=True)


if __name__ == "__main__":
    main()
