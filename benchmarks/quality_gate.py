"""Draft quality gate on the embedded default: precompute -> train from the cache -> real speculative decoding.

Prints the training time, the trainer's simulated acceptance length (over supervised positions, and
the in-draft-vocabulary upper bound beside it), the real acceptance length tau (emitted tokens per
target verify forward, greedy chain drafting with K tokens) with the raw engine-style counters, and
whether speculative decoding reproduced plain greedy decoding exactly.

Exits 1 when decoding was not lossless (any prompt differs from plain greedy: a correctness bug,
whatever the draft) or when real tau is below ``--min-tau``. The default threshold, 2.0 with K=4,
means the draft must contribute on average at least one accepted token per verify forward, i.e.
halve the number of target forwards. Measured with train's defaults on this default: tau 2.23
(K=4, 20 prompts, 64 new tokens; simulated 2.67), so 2.0 leaves ~10% for numeric drift across
machines and thread counts, while a draft that has learnt nothing (tau ~1.0) or that lost a
tenth of its acceptance fails. Smaller runs (``--max-steps``) need a lower ``--min-tau``.

    python benchmarks/quality_gate.py --out /tmp/qg                 # the gate (~2-3 min of CPU)
    python benchmarks/quality_gate.py --max-steps 2 --num-samples 16 --num-prompts 2 \\
        --max-new-tokens 8 --min-tau 1.0                               # smoke: runs end to end

Training uses ``draftcache train``'s defaults (those the README's main job uses) unless overridden.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from draftcache.trainer.eagle3.config import TrainConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/draftcache-quality")
    defaults = TrainConfig(output_dir="")
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--max-steps", type=int, default=None, help="stop training after this many optimizer steps")
    ap.add_argument("--num-samples", type=int, default=None, help="precompute only the first N conversations")
    ap.add_argument("--ttt-steps", type=int, default=defaults.ttt_steps)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--min-tau", type=float, default=2.0, help="fail below this real tau (see the module docstring)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from draftcache.precompute.config import PrecomputeConfig
    from draftcache.precompute.main import precompute_from_config
    from draftcache.trainer.evaluate import evaluate_draft
    from draftcache.trainer.eagle3.train import train

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    precompute_from_config(PrecomputeConfig(output_dir=str(out / "cache"), num_samples=args.num_samples,
                                            progress=False), log=lambda *_: None)
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train(TrainConfig(output_dir=str(out / "draft"), cached_target_path=str(out / "cache"),
                               epochs=args.epochs, max_steps=args.max_steps, ttt_steps=args.ttt_steps, lr=args.lr,
                               batch_tokens=args.batch_tokens, progress=False), log=lambda *_: None)
    t_train = time.perf_counter() - t0
    report = evaluate_draft(draft_dir=result.export_dir, num_prompts=args.num_prompts,
                            draft_tokens=args.draft_tokens, max_new_tokens=args.max_new_tokens)
    stats = report.stats
    print(f"precompute      {t_pre:.1f} s")
    print(f"train           {t_train:.1f} s, {result.steps} steps, threads {torch.get_num_threads()}")
    if result.val_acceptance_length is not None:
        print(f"sim tau (val)   {result.val_acceptance_length:.3f}  per-step acc {[round(a, 3) for a in result.val_acc]}")
        print(f"  in draft vocab {result.val_acceptance_length_in_draft_vocab:.3f}  per-step acc "
              f"{[round(a, 3) for a in result.val_acc_in_draft_vocab]} (upper bound)")
    print(f"real tau        {report.tau:.3f} emitted tokens per verify step, K={report.draft_tokens}, "
          f"{report.num_prompts} prompts")
    print(f"engine counters drafts {stats.num_drafts}, accepted {stats.num_accepted_tokens}, mean acceptance "
          f"length {stats.mean_acceptance_length:.3f} (1 + accepted / drafts)")
    print(f"accept by pos   {[round(r, 3) for r in report.acceptance_rates]}")
    print(f"speed           greedy {report.greedy_tokens_per_s:.1f} tok/s, speculative "
          f"{report.spec_tokens_per_s:.1f} tok/s ({report.speedup:.2f}x)")
    print(f"lossless        {report.mismatches == 0}")
    failures = []
    if report.mismatches:
        failures.append(f"speculative decoding differed from greedy on {report.mismatches} prompts")
    if report.tau < args.min_tau:
        failures.append(f"real tau {report.tau:.3f} < --min-tau {args.min_tau}")
    print("gate            " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
