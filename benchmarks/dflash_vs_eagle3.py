"""DFlash vs EAGLE-3 on one target, same data, same training budget, same prompts.

Both drafts are trained online from the co-located target for ``--max-steps`` optimizer steps of
one packed micro-batch of at most ``--batch-tokens`` tokens (the same samples budget), then both
run real greedy speculative decoding with ``draftcache eval``'s code on the same prompts, each
timed against plain greedy in the same process. Prints one line per draft (real tau, per-position
acceptance, tok/s, speed-up) and the DFlash/EAGLE-3 ratios.

    python benchmarks/dflash_vs_eagle3.py                                   # embedded default
    python benchmarks/dflash_vs_eagle3.py --target-model ~/.cache/draftcache/SmolLM2-135M-Instruct \\
        --input-data train.jsonl --eval-data prompts.jsonl --max-steps 100 --block-size 8 \\
        --num-anchors 64 --draft-vocab-size 8192                           # SmolLM2 (tens of CPU minutes)

EAGLE-3 drafts ``--block-size - 1`` tokens per round, as many as the DFlash block proposes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/draftcache-dflash-vs-eagle3")
    ap.add_argument("--target-model", default=None, help="HF dir (default: the embedded target)")
    ap.add_argument("--input-data", default=None, help="training chats (default: the embedded chats)")
    ap.add_argument("--eval-data", default=None, help="prompts (default: the embedded held-out chats)")
    ap.add_argument("--max-steps", type=int, default=150)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--block-size", type=int, default=8, help="DFlash block; EAGLE-3 drafts block_size - 1 tokens")
    ap.add_argument("--draft-layers", type=int, default=1, help="DFlash draft layers (EAGLE-3 has one)")
    ap.add_argument("--num-anchors", type=int, default=512)
    ap.add_argument("--draft-vocab-size", type=int, default=None, help="EAGLE-3 draft vocabulary (default: full)")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from draftcache.trainer.eagle3.config import TrainConfig
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash
    from draftcache.trainer.evaluate import evaluate_draft
    from draftcache.trainer.eagle3.train import train

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    quiet = lambda _msg: None  # noqa: E731
    eagle = train(TrainConfig(output_dir=str(out / "eagle3"), target_model=args.target_model,
                              input_data=args.input_data, seq_length=args.seq_length, max_steps=args.max_steps,
                              batch_tokens=args.batch_tokens, lr=args.lr, val_fraction=0.0,
                              draft_vocab_size=args.draft_vocab_size, progress=False), log=quiet)
    dflash = train_dflash(DFlashTrainConfig(output_dir=str(out / "dflash"), target_model=args.target_model,
                                            input_data=args.input_data, seq_length=args.seq_length,
                                            max_steps=args.max_steps, batch_tokens=args.batch_tokens, lr=args.lr,
                                            val_fraction=0.0, block_size=args.block_size,
                                            num_draft_layers=args.draft_layers, num_anchors=args.num_anchors,
                                            progress=False), log=quiet)
    print(f"training    {args.max_steps} steps of <= {args.batch_tokens} tokens each: "
          f"eagle3 {eagle.wall_seconds:.1f} s, dflash {dflash.wall_seconds:.1f} s")
    k = args.block_size - 1
    reports = {}
    for name, export_dir in (("eagle3", eagle.export_dir), ("dflash", dflash.export_dir)):
        report = evaluate_draft(draft_dir=export_dir, target_model=args.target_model, input_data=args.eval_data,
                                num_prompts=args.num_prompts, draft_tokens=k, max_new_tokens=args.max_new_tokens,
                                device="cpu", method=name)
        reports[name] = report
        rates = " ".join(f"{r:.2f}" for r in report.acceptance_rates)
        print(f"{name:<11} K={k} tau {report.tau:.3f}  accept/pos {rates}  spec {report.spec_tokens_per_s:.1f} tok/s  "
              f"greedy {report.greedy_tokens_per_s:.1f} tok/s  speedup {report.speedup:.2f}x  "
              f"lossless {'yes' if report.mismatches == 0 else 'NO'}")
    e, d = reports["eagle3"], reports["dflash"]
    print(f"ratio       dflash/eagle3 tau {d.tau / e.tau:.2f}x  speedup {d.speedup / e.speedup:.2f}x "
          f"({args.num_prompts} prompts x {args.max_new_tokens} new tokens, same steps and token budget)")
    return 0 if e.mismatches == 0 and d.mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
