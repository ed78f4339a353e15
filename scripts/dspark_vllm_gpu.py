"""A DSpark draft of the embedded default target served by a CUDA build of vLLM (``method: "dspark"``).

vLLM's CPU build refuses DSpark (its V1 runner does not support it, V2 needs Triton), so this is the
GPU check's step: train a small DSpark draft online (``train_dflash`` with a Markov head), run the
vLLM-class load check (``check_vllm_dspark_draft``), evaluate it with our block speculative decoding
(the Markov step, lossless by construction), then serve it with vLLM at
``num_speculative_tokens = block_size`` in fp32, eager, greedy, and compare: vLLM's speculative
output must equal vLLM's plain greedy output and ours, and vLLM must accept draft tokens. vLLM's
acceptance counters are printed next to ours (equal where the two fp32 forwards agree on every argmax).

    python scripts/dspark_vllm_gpu.py               # on the GPU machine (CUDA vLLM)
    python scripts/dspark_vllm_gpu.py --dry-run     # CPU: train, export, our eval; no vLLM

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a few steps, no vLLM")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300; dry run 2)")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dspark-vllm-"))
    try:
        return _check(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(args: argparse.Namespace, work: Path) -> int:

    from draftcache.defaults import default_target_path
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash
    from draftcache.trainer.evaluate import evaluate_draft, load_eval_prompts

    device = "cpu" if args.dry_run else "cuda"
    steps = args.steps or (2 if args.dry_run else 300)
    target = default_target_path()
    result = train_dflash(DFlashTrainConfig(output_dir=str(work / "run"), markov_rank=64, block_size=args.block_size,
                                            max_steps=steps, warmup_steps=min(20, steps), device=device,
                                            progress=False), log=lambda *_: None)
    export = Path(result.export_dir)
    prompts = load_eval_prompts(target_path=target, input_data=None, num_prompts=args.num_prompts)
    # our eval in fp32 on the CPU: the reference decoding with the Markov step
    ours = evaluate_draft(draft_dir=str(export), target_model=target, prompts=prompts, num_prompts=args.num_prompts,
                          max_new_tokens=args.max_new_tokens, device="cpu")
    print(f"dspark ours: K {ours.draft_tokens}, tau {ours.tau:.3f}, mean acceptance length "
          f"{ours.stats.mean_acceptance_length:.3f}, accepted per position {ours.stats.num_accepted_tokens_per_pos}, "
          f"lossless {'yes' if ours.mismatches == 0 else 'NO'}")
    failures = [] if ours.mismatches == 0 else [f"our decoding differs from greedy on {ours.mismatches} prompts"]
    if args.dry_run:
        print("dspark vllm: skipped (dry run)")
        return 1 if failures else 0

    from draftcache.trainer.vllm_eval import (check_vllm_dspark_draft, counters_since, make_vllm, release_vllm,
                                              vllm_generate, vllm_spec_counters)

    check = check_vllm_dspark_draft(target, export)
    print(f"dspark load check: {check.format()}")
    if not check.ok:
        failures.append("the load check failed")
    eos = prompts.tokenizer.eos_token_id
    max_len = max(len(p) for p in prompts.ids) + args.max_new_tokens + args.block_size + 8
    plain = make_vllm(target, max_model_len=max_len)
    greedy = vllm_generate(plain.llm, prompts.ids, args.max_new_tokens, eos)
    release_vllm(plain)
    from vllm import LLM

    llm = LLM(model=target, dtype="float32", enforce_eager=True, max_model_len=max_len, disable_log_stats=False,
              seed=0, enable_prefix_caching=False, speculative_config={"method": "dspark", "model": str(export),
                                          "num_speculative_tokens": args.block_size})
    before = vllm_spec_counters(llm, args.block_size)
    outputs = vllm_generate(llm, prompts.ids, args.max_new_tokens, eos)
    counters = counters_since(vllm_spec_counters(llm, args.block_size), before)
    print(f"dspark vllm: mean acceptance length {counters.mean_acceptance_length:.3f}, drafts {counters.num_drafts}, "
          f"accepted per position {counters.num_accepted_tokens_per_pos}; ours "
          f"{ours.stats.mean_acceptance_length:.3f} ({ours.stats.num_accepted_tokens_per_pos})")
    if outputs != greedy:
        failures.append("vLLM's DSpark output differs from its plain greedy output")
    if outputs != ours.outputs:
        failures.append("vLLM's DSpark output differs from our eval's")
    if counters.num_accepted_tokens == 0:
        failures.append("vLLM accepted no draft token")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
