"""Draft quality on the embedded default: precompute -> train from the cache -> real speculative decoding.

Prints the training time, the trainer's simulated acceptance length and the real acceptance length
tau (accepted + bonus tokens per target verify forward, greedy chain drafting with K tokens), and
checks that speculative decoding reproduced plain greedy decoding exactly.

    python benchmarks/quality_gate.py --out /tmp/qg --draft-tokens 4

Training uses ``draftcache train``'s defaults (those the README's main job uses) unless overridden.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from draftcache.trainer.config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/draftcache-quality")
    defaults = TrainConfig(output_dir="")
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--ttt-steps", type=int, default=defaults.ttt_steps)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from draftcache.precompute.config import PrecomputeConfig
    from draftcache.precompute.main import precompute_from_config
    from draftcache.trainer.evaluate import evaluate_draft
    from draftcache.trainer.loop import train

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    precompute_from_config(PrecomputeConfig(output_dir=str(out / "cache"), progress=False), log=lambda *_: None)
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train(TrainConfig(output_dir=str(out / "draft"), cached_target_path=str(out / "cache"),
                               epochs=args.epochs, ttt_steps=args.ttt_steps, lr=args.lr,
                               batch_tokens=args.batch_tokens, progress=False))
    t_train = time.perf_counter() - t0
    report = evaluate_draft(draft_dir=result.export_dir, num_prompts=args.num_prompts,
                            draft_tokens=args.draft_tokens, max_new_tokens=args.max_new_tokens)
    print(f"precompute      {t_pre:.1f} s")
    print(f"train           {t_train:.1f} s, {result.steps} steps, {args.epochs} epochs, threads {torch.get_num_threads()}")
    print(f"sim tau (val)   {result.val_acceptance_length:.3f}  per-step acc {[round(a, 3) for a in result.val_acc]}")
    print(f"real tau        {report.tau:.3f} with K={report.draft_tokens} over {report.num_prompts} prompts")
    print(f"accept by pos   {[round(r, 3) for r in report.acceptance_rates]}")
    print(f"speed           greedy {report.greedy_tokens_per_s:.1f} tok/s, speculative "
          f"{report.spec_tokens_per_s:.1f} tok/s ({report.speedup:.2f}x)")
    print(f"lossless        {report.mismatches == 0}")


if __name__ == "__main__":
    main()
