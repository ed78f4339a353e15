"""TTT attention: peak memory and step time of the fused (SDPA) draft attention against the eager
reference, forward + backward of ``ttt_forward`` at the same shapes, measured side by side in one run.

Each variant runs in a fresh subprocess, so neither inherits the other's allocator state:

* CPU: peak resident memory of the process during its first forward + backward, above what it
  held before (parameters and the batch). The kernel's high-water mark is reset after set-up
  (``/proc/self/clear_refs``), so ``ru_maxrss`` then reads the peak of that pass alone; where the
  reset is refused the figure is ``ru_maxrss`` minus the resident size before the pass (an upper
  bound if set-up peaked higher). The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed
  tensors leave the resident set instead of staying in glibc's heap for reuse.
* CUDA: ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` before that pass.

Step time is the median of ``--repeats`` further passes (the first one is the warm-up; CUDA is
synchronised before each clock read), as wall time and as the process's CPU time: with one
thread on a shared machine the CPU time is the steadier of the two. On CUDA the pass runs under bf16 autocast as the trainer's
does; on CPU in fp32. Both variants see the same weights and batch, and their losses are checked
to agree, so the two figures measure the same computation.

    python benchmarks/ttt_memory.py                                   # ~1 min of CPU time, one thread
    python benchmarks/ttt_memory.py --device cuda --shape llama-3.1-8b --seq-len 2048

Shapes (draft = one decoder layer of the target's width, ``--draft-vocab`` rows in lm_head):
``tiny`` (the fast test), ``small`` (the CPU default: hidden 256, 8 heads / 2 kv heads, Vd 2048, T 2048),
``llama-3.1-8b`` (hidden 4096, 32 / 8 heads, intermediate 14336, Vd 32000, T 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Draft dimensions per shape; seq_len and draft_vocab are the defaults for that shape.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512, draft_vocab=256, seq_len=64),
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                  vocab_size=8192, draft_vocab=2048, seq_len=2048),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, draft_vocab=32000, seq_len=2048),
}
VARIANTS = {"fused": "sdpa", "eager": "eager"}


def run_child(args: argparse.Namespace) -> dict:
    """One variant: build the draft and batch, warm up, then time ``--repeats`` passes."""
    import torch

    from _common import PeakMemory
    from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel
    from draftcache.trainer.eagle3.ttt import ttt_forward

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    seq = args.seq_len or shape["seq_len"]
    vd = args.draft_vocab or shape["draft_vocab"]
    hidden = shape["hidden_size"]
    config = Eagle3DraftConfig(
        hidden_size=hidden, intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"], rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        target_hidden_size=hidden, target_vocab_size=shape["vocab_size"], draft_vocab_size=vd, aux_layer_ids=[1, 2, 3],
    )
    torch.manual_seed(0)
    model = Eagle3DraftModel(config, attn_implementation=VARIANTS[args.child]).to(device)
    if args.query_chunk is not None:
        model.midlayer.self_attn.query_chunk = args.query_chunk or None
    gen = torch.Generator(device="cpu").manual_seed(1)
    b = args.batch
    # built in place, one allocation each, so set-up never peaks above what it keeps
    probs = torch.rand(b, seq, vd, generator=gen)
    probs /= probs.sum(-1, keepdim=True)
    batch = dict(
        input_ids=torch.randint(0, vd, (b, seq), generator=gen),
        attention_mask=torch.ones(b, seq, dtype=torch.long),
        loss_mask=torch.ones(b, seq, dtype=torch.long),
        aux_hidden_states=torch.randn(b, seq, 3 * hidden, generator=gen),
        target_probs=probs,
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    del probs
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step() -> float:
        with autocast:
            out = ttt_forward(model, **batch, ttt_steps=args.ttt_steps)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return float(out.loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # memory: the first pass, before any allocator cache holds its blocks
    with PeakMemory(device) as measured:
        loss = step()
    peak, method = measured.bytes, measured.method
    # time: that pass was the warm-up; median of the next ones
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"variant": args.child, "peak_bytes": peak, "step_seconds": statistics.median(times),
            "cpu_seconds": statistics.median(cpu_times), "loss": loss, "method": method, "seq_len": seq,
            "draft_vocab": vd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seq-len", type=int, default=None, help="T (default: the shape's)")
    ap.add_argument("--draft-vocab", type=int, default=None, help="Vd (default: the shape's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per variant (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--query-chunk", type=int, default=None,
                    help="fused: queries per SDPA call at steps with diagonal keys (0 = one call; default: the model's)")
    ap.add_argument("--variants", default="fused,eager", help="comma-separated subset of fused,eager")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant]
        for flag in ("shape", "seq_len", "draft_vocab", "batch", "ttt_steps", "repeats", "device", "threads",
                     "query_chunk"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        # blocks of 64 KiB and more are mmapped and unmapped when freed (no dynamic threshold), so the
        # resident size follows the live tensors instead of what glibc keeps for reuse
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{variant} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"shape {args.shape}: B={args.batch} T={first['seq_len']} Vd={first['draft_vocab']} "
          f"ttt_steps={args.ttt_steps} device={args.device} ({first['method']})")
    for r in results.values():
        print(f"{r['variant']:6s} peak {r['peak_bytes'] / 2**20:10.1f} MiB   step {r['step_seconds']:8.3f} s wall, "
              f"{r['cpu_seconds']:8.3f} s CPU (forward + backward)   loss {r['loss']:.6f}")
    if {"fused", "eager"} <= results.keys():
        fused, eager = results["fused"], results["eager"]
        tolerance = 2e-2 if args.device.startswith("cuda") else 1e-4  # bf16 autocast vs fp32
        if abs(fused["loss"] - eager["loss"]) > tolerance * max(1.0, abs(eager["loss"])):
            sys.exit(f"fused and eager losses differ: {fused['loss']} vs {eager['loss']}")
        print(f"ratio  eager/fused peak memory {eager['peak_bytes'] / max(fused['peak_bytes'], 1):.2f}x   "
              f"step time {eager['step_seconds'] / fused['step_seconds']:.2f}x wall, "
              f"{eager['cpu_seconds'] / max(fused['cpu_seconds'], 1e-9):.2f}x CPU")


if __name__ == "__main__":
    main()
