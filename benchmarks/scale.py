"""What the precompute costs at real widths and whether it stays flat as the job grows, on this CPU.

Four measurements, each part in a fresh subprocess (``--parts`` picks them):

* ``precompute``: ``run_precompute`` (auto encoding, bf16 storage) on a random-init Llama with
  Llama-3.1-8B's widths (hidden 4096, 32 / 8 KV heads, intermediate 14336, vocabulary 128,256)
  and ``--num-layers`` decoder layers (3: EAGLE-3 captures three distinct layers), built from a
  ``LlamaConfig`` on the fly, over chats of a word-level tokenizer with the same vocabulary. Prints
  the shard bytes per real token and the peak host RSS (and its rise over the RSS once the model
  is built and the data tokenized).
* ``manifest``: the commit path of ``precompute.writer`` (``append_commit`` + ``ManifestOwner.commit``)
  with synthetic shard entries after 100 / 1k / 10k / 30k committed shards (``--commit-points``),
  median over ``--commit-repeats`` commits, beside what the previous design did per commit
  (rebuild, validate and rewrite the whole manifest.json) at the same points. Flat: ratio ~ 1.
* ``tokenize``: peak host RSS over the baseline of tokenizing N chats and planning their shards
  (lengths, vocabulary counts, shard boundaries), into the on-disk ``TokenStore`` the precompute
  uses and, side by side, into the list of ``TokenizedSample`` it used before, at each N of
  ``--tokenize-sizes``; per 10^5 samples and the ratio largest / smallest N.
* ``training``: the rows of ``benchmarks/scale_training.py``'s ``measure_training_memory`` (DFlash
  loss and EAGLE-3 step peak memory) when that script is present.

Timings on a shared machine are noisy: compare the ratios, measured in the same run.

    python benchmarks/scale.py         # ~30 min on a busy 2-core box (precompute ~8, tokenize 5k/25k x 2 ~20)
    python benchmarks/scale.py --tokenize-sizes 100000,1000000     # per 10^5 at real sizes
    python benchmarks/scale.py --parts manifest,tokenize --commit-points 10,100 --commit-repeats 5 \\
        --tokenize-sizes 200,800 --no-training                     # smallest (the test's)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MB = 1e6


# ---------------------------------------------------------------------- children
def child_precompute(args: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.initialization import no_init_weights

    from _common import MODEL_SHAPES, ChatLengths, build_word_tokenizer, hwm_bytes, reset_hwm, rss_bytes, write_chats
    from draftcache.data import load_conversations
    from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations
    from draftcache.targets import HFEagle3TargetModel

    torch.set_num_threads(1)
    dims = dict(MODEL_SHAPES["llama-3.1-8b"], tie_word_embeddings=args["tie_word_embeddings"])
    config = LlamaConfig(num_hidden_layers=args["num_layers"], bos_token_id=1, eos_token_id=3, pad_token_id=0, **dims)
    with no_init_weights():  # random values below: torch's default init of 1.5e9 weights takes minutes here
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args["model_dtype"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=generator)
    model.eval()
    vocab = dims["vocab_size"]
    target = HFEagle3TargetModel(model, aux_layer_ids=[0, args["num_layers"] // 2, args["num_layers"] - 1])
    tokenizer = build_word_tokenizer(vocab)
    work = Path(args["work"])
    data = work / "chats.jsonl"
    write_chats(data, args["num_samples"], vocab_size=vocab,
                lengths=ChatLengths(args["median_tokens"], 0.5, max_tokens=args["seq_length"]))
    cfg = PrecomputeConfig(output_dir=str(work / "cache"), seq_length=args["seq_length"], batch_size=args["batch_size"],
                           dtype="bf16", supervision="auto", draft_vocab_size=32000, progress=False)
    conversations = load_conversations(str(data))
    samples = tokenize_conversations(cfg, tokenizer, conversations, store_dir=work / "tokens")
    before = rss_bytes()
    if not reset_hwm():
        raise RuntimeError("this kernel refuses to reset the peak RSS (/proc/self/clear_refs); the peaks need it")
    t0 = time.perf_counter()
    summary = run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                             model_id="random-init llama-3.1-8b widths", log=lambda _: None)
    seconds = time.perf_counter() - t0
    peak = hwm_bytes()
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    shard_bytes = sum(e["bytes"] for e in manifest["shards"])
    return {"before": before, "peak": peak, "seconds": seconds, "tokens": manifest["stats"]["num_tokens"],
            "supervised": manifest["stats"]["num_supervised"], "shard_bytes": shard_bytes,
            "encoding": manifest["supervision"]["encoding"], "num_layers": args["num_layers"],
            "side_bytes": sum(f["bytes"] for f in manifest["files"].values())}


def _synthetic_manifest(num_shards: int) -> dict:
    """A valid manifest of an 8B-width cache planned as ``num_shards`` one-sample shards."""
    from draftcache.cache_format import new_manifest

    vocab = 128256
    return new_manifest(
        target={"model_id": "bench", "fingerprint": "0" * 64, "config_fingerprint": "0" * 64,
                "architecture": "LlamaForCausalLM", "hidden_size": 4096, "vocab_size": vocab, "num_layers": 32,
                "torch_dtype": "bfloat16"},
        tokenizer={"name_or_path": "bench", "fingerprint": "0" * 64, "chat_template_fingerprint": "0" * 64},
        layer_ids=[1, 15, 28], seq_length=4096, dtype="bf16", encoding="hidden", topk=None,
        selected_token_ids=range(32000), token_counts=[1] * vocab,
        dataset={"input_data": "bench", "split": None, "shuffle_seed": None, "num_samples": None, "fingerprint": None},
        num_samples=num_shards, shard_size=1)


def _entry(k: int) -> dict:
    return {"file": f"shard-{k:06d}.safetensors", "index": k, "first_sample": k, "num_samples": 1,
            "num_tokens": 1500, "num_supervised": 900, "bytes": 130_000_000, "sha256": f"{k:064x}"}


def child_manifest(args: dict) -> dict:
    """Median seconds of one commit after ``p`` committed shards, ours and the previous design's."""
    from draftcache.cache_format import validate_manifest
    from draftcache.cache_format.checksum import atomic_write_json
    from draftcache.cache_format.manifest import shard_stats
    from draftcache.cache_format.resume import journal_path
    from draftcache.cache_format.writer import append_commit
    from draftcache.precompute.writer import ByteCount, ManifestOwner

    points, repeats = args["points"], args["repeats"]
    total = max(points) + repeats
    work = Path(args["work"])
    manifest = _synthetic_manifest(total)
    owner = ManifestOwner(work, manifest, ByteCount())
    owner.start([])
    ours, before = {}, {}
    committed = 0
    for p in points:
        # fill up to p shards without timing: the journal gets its lines in one write
        fill = [_entry(k) for k in range(committed, p)]
        with open(journal_path(work, 0), "a") as f:
            f.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in fill))
        owner.commit(fill)
        committed = p
        times = []
        for _ in range(repeats):
            e = _entry(committed)
            t0 = time.perf_counter()
            append_commit(work, 0, e)   # what the rank that wrote the shard does
            owner.commit([e])           # what rank 0 does with the round's entries
            times.append(time.perf_counter() - t0)
            committed += 1
        ours[p] = statistics.median(times)
        # the previous design, per commit: every entry re-sorted, totals summed, the whole
        # manifest validated and rewritten (atomically, fsynced)
        old = dict(manifest, shards=[_entry(k) for k in range(p)])
        times = []
        for _ in range(max(1, min(repeats, 3))):
            t0 = time.perf_counter()
            shards = {e["index"]: e for e in old["shards"]}
            old["shards"] = [shards[k] for k in sorted(shards)]
            old["stats"] = shard_stats(old["shards"])
            validate_manifest(old)
            atomic_write_json(work / "old-manifest.json", old)
            times.append(time.perf_counter() - t0)
        before[p] = statistics.median(times)
        journal_lines = committed
    return {"ours": ours, "before": before, "journal_lines": journal_lines,
            "journal_bytes": journal_path(work, 0).stat().st_size}


def child_tokenize(args: dict) -> dict:
    """Peak RSS rise of tokenizing ``n`` chats and planning their shards, into a store or a list."""
    import torch

    from _common import build_word_tokenizer, hwm_bytes, reset_hwm, rss_bytes
    from draftcache.cache_format import SampleBytes, plan_shard_boundaries
    from draftcache.data import load_conversations, sample_lengths, share_token_counts
    from draftcache.precompute import PrecomputeConfig, tokenize_conversations

    torch.set_num_threads(1)
    vocab = 128256
    tokenizer = build_word_tokenizer(vocab)
    cfg = PrecomputeConfig(output_dir=str(Path(args["work"]) / "unused"), seq_length=args["seq_length"],
                           num_samples=args["n"], progress=False)
    conversations = load_conversations(args["data"], num_samples=args["n"], lazy=True)
    store = Path(args["work"]) / "tokens" if args["mode"] == "store" else None
    before = rss_bytes()
    if not reset_hwm():
        raise RuntimeError("this kernel refuses to reset the peak RSS (/proc/self/clear_refs); the peaks need it")
    t0 = time.perf_counter()
    samples = tokenize_conversations(cfg, tokenizer, conversations, store_dir=store)
    counts = share_token_counts(samples, vocab, 0, 1)  # [V]
    sizes = SampleBytes({"dtype": "bf16", "target": {"hidden_size": 4096}, "capture": {"layer_ids": [1, 15, 28]},
                         "supervision": {"encoding": "hidden", "topk": None}, "draft_vocab": {"size": 32000}})
    bounds = plan_shard_boundaries((sizes(*n) for n in sample_lengths(samples)), 1 << 30, 1000 * 2**20)
    seconds = time.perf_counter() - t0
    peak = hwm_bytes()
    return {"n": len(samples), "before": before, "peak": peak, "seconds": seconds, "shards": len(bounds) - 1,
            "tokens": int(sum(n for n, _ in sample_lengths(samples))), "counted": int(counts.sum())}


CHILDREN = {"precompute": child_precompute, "manifest": child_manifest, "tokenize": child_tokenize}


def _child(kind: str, **args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} measurement failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- parent
def _row(name: str, value: float, unit: str, note: str = "") -> str:
    return f"{name:<58s} {value:>12.4g} {unit:<10s} {note}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="precompute,manifest,tokenize,training")
    ap.add_argument("--num-layers", type=int, default=3, help="decoder layers of the 8B-width target (>= 3: EAGLE-3 "
                                                               "captures three distinct layers)")
    ap.add_argument("--untied", action="store_true", help="separate lm_head as in Llama-3.1-8B (2.1 GB more host RAM; "
                                                          "the default ties it to the embeddings, bytes/token unchanged)")
    ap.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the target's weights (bf16 as served; float32 forwards ~8x faster on a CPU without bf16 "
                         "units but needs twice the RAM)")
    ap.add_argument("--num-samples", type=int, default=4, help="precompute chats")
    ap.add_argument("--median-tokens", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--commit-points", default="100,1000,10000,30000")
    ap.add_argument("--commit-repeats", type=int, default=50)
    ap.add_argument("--tokenize-sizes", default="5000,25000")
    ap.add_argument("--tokenize-median-tokens", type=int, default=128)
    ap.add_argument("--tokenize-modes", default="store,list", help="store: the TokenStore the precompute uses; list: "
                                                                      "the list of TokenizedSample it kept before")
    ap.add_argument("--no-training", action="store_true", help="skip benchmarks/scale_training.py's rows")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    parts = set(args.parts.split(","))
    rows: list[str] = []

    def emit(text: str) -> None:
        rows.append(text)
        print(text, flush=True)

    if "precompute" in parts:
        with tempfile.TemporaryDirectory(prefix="draftcache-scale-") as work:
            r = _child("precompute", work=work, num_layers=args.num_layers, tie_word_embeddings=not args.untied,
                       model_dtype=args.model_dtype,
                       num_samples=args.num_samples, median_tokens=args.median_tokens, seq_length=args.seq_length,
                       batch_size=args.batch_size)
        tying = "untied" if args.untied else "tied"
        shape = (f"8B widths, {r['num_layers']} layers, {args.model_dtype}, {tying} lm_head, "
                 f"{args.num_samples} chats, {r['tokens']} tokens")
        emit(_row("precompute shard bytes per token", r["shard_bytes"] / r["tokens"], "B/token",
                  f"encoding {r['encoding']} bf16, {r['supervised'] / r['tokens']:.0%} supervised; {shape}"))
        emit(_row("precompute peak host RSS", r["peak"] / 1e9, "GB",
                  f"rise over model+data {(r['peak'] - r['before']) / 1e9:.3f} GB; {r['seconds']:.0f} s"))
    if "manifest" in parts:
        points = [int(x) for x in args.commit_points.split(",")]
        with tempfile.TemporaryDirectory(prefix="draftcache-scale-") as work:
            r = _child("manifest", work=work, points=points, repeats=args.commit_repeats)
        ours = {int(k): v for k, v in r["ours"].items()}
        before = {int(k): v for k, v in r["before"].items()}
        for p in points:
            emit(_row(f"manifest commit after {p} shards, ours", ours[p] * 1e3, "ms",
                      f"previous design {before[p] * 1e3:.4g} ms"))
        first, last = points[0], points[-1]
        emit(_row(f"RATIO commit time {last} / {first} shards, ours", ours[last] / ours[first], "x",
                  f"previous design {before[last] / before[first]:.4g} x; goal ~1 (flat)"))
    if "tokenize" in parts:
        sizes = [int(x) for x in args.tokenize_sizes.split(",")]
        from _common import ChatLengths, write_chats

        with tempfile.TemporaryDirectory(prefix="draftcache-scale-") as work:
            data = Path(work) / "chats.jsonl"
            write_chats(data, max(sizes), vocab_size=128256,
                        lengths=ChatLengths(args.tokenize_median_tokens, 0.8, max_tokens=args.seq_length * 4))
            modes = args.tokenize_modes.split(",")
            rises: dict[str, dict[int, float]] = {mode: {} for mode in modes}
            for n in sizes:
                for mode in modes:
                    sub = Path(work) / f"{mode}-{n}"
                    sub.mkdir()
                    r = _child("tokenize", work=str(sub), data=str(data), n=n, mode=mode,
                               seq_length=args.seq_length * 4)
                    rises[mode][n] = r["peak"] - r["before"]
                    emit(_row(f"tokenize+plan peak RSS rise, {mode}, N={n}", rises[mode][n] / MB, "MB",
                              f"{r['tokens']} tokens, {r['shards']} shards planned; {r['seconds']:.0f} s"))
        lo, hi = sizes[0], sizes[-1]
        for mode in modes:
            growth = (rises[mode][hi] - rises[mode][lo]) / (hi - lo) * 1e5
            emit(_row(f"tokenize+plan RSS growth per 10^5 samples, {mode}", growth / MB, "MB",
                      f"slope between N={lo} and N={hi}"))
        for mode in modes:
            emit(_row(f"RATIO tokenize+plan RSS rise N={hi} / N={lo}, {mode}", rises[mode][hi] / max(rises[mode][lo], 1),
                      "x", f"data x{hi / lo:g}; goal for the store ~1 (flat)"))
    if "training" in parts and not args.no_training:
        try:
            from scale_training import measure_training_memory
        except ImportError as exc:
            emit(f"training memory: benchmarks/scale_training.py is not available ({exc}); no DFlash / EAGLE-3 rows")
        else:
            for row in measure_training_memory():
                emit(row.format() if hasattr(row, "format") and callable(row.format) else str(row))
    elif "training" in parts:
        emit("training memory: skipped (--no-training)")


if __name__ == "__main__":
    main()
