"""vLLM's view of an EAGLE-3 and a DFlash draft of one target: acceptance and tokens/s (engine venv).

Each configuration (plain greedy, EAGLE-3 with K drafted tokens, DFlash with its block's K) runs in
its own subprocess with ``LLM(dtype="float32", enforce_eager=True)``: one warm-up request, then the
prompts one at a time (as ``draftcache eval`` does), greedy, ``ignore_eos``. Prints per configuration
the decode tokens/s, vLLM's mean acceptance length (1 + accepted / drafts), per-position acceptance
rates, and whether every output equals plain greedy; then the DFlash/EAGLE-3 ratios.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-engine/bin/python benchmarks/vllm_dflash_vs_eagle3.py \\
        --target-model ~/.cache/draftcache/SmolLM2-135M-Instruct --eagle3 RUN_E/export --dflash RUN_D/export \\
        --eval-data prompts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _prompts(target: str, eval_data: str | None, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from draftcache.data import load_conversations
    from draftcache.defaults import default_eval_data_path
    from draftcache.trainer.evaluate import prompt_ids_from_conversations

    tokenizer = AutoTokenizer.from_pretrained(target)
    conversations = load_conversations(eval_data or default_eval_data_path(), prompts=True, lazy=True)
    return prompt_ids_from_conversations(conversations, tokenizer, n)


def _run_one(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None
    if args.only != "plain":
        draft = args.eagle3 if args.only == "eagle3" else args.dflash
        k = args.k if args.only == "eagle3" else json.load(open(os.path.join(draft, "config.json")))["block_size"] - 1
        spec = {"method": args.only, "model": draft, "num_speculative_tokens": k}
    llm = LLM(model=args.target_model, dtype="float32", enforce_eager=True, max_model_len=2048,
              disable_log_stats=False, seed=0, speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    prompts = _prompts(args.target_model, args.eval_data, args.num_prompts)

    def counters() -> dict:
        m = {x.name: x for x in llm.get_metrics()}
        get = lambda n: m[n].value if n in m else 0  # noqa: E731
        per_pos = list(m["vllm:spec_decode_num_accepted_tokens_per_pos"].values) if spec else []
        return {"drafts": get("vllm:spec_decode_num_drafts"), "accepted": get("vllm:spec_decode_num_accepted_tokens"),
                "per_pos": per_pos}

    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    before = counters()
    outputs, t0 = [], time.perf_counter()
    for p in prompts:
        res = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        outputs.append(list(res[0].outputs[0].token_ids))
    seconds = time.perf_counter() - t0
    after = counters()
    drafts = after["drafts"] - before["drafts"]
    accepted = after["accepted"] - before["accepted"]
    per_pos = [a - b for a, b in zip(after["per_pos"], before["per_pos"] or [0] * len(after["per_pos"]))]
    return {"name": args.only, "tokens": sum(map(len, outputs)), "seconds": seconds, "drafts": drafts,
            "accepted": accepted, "per_pos": per_pos, "outputs": outputs, "k": spec["num_speculative_tokens"] if spec else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-model", required=True)
    ap.add_argument("--eagle3", required=True, help="EAGLE-3 export directory")
    ap.add_argument("--dflash", required=True, help="DFlash export directory")
    ap.add_argument("--eval-data", default=None)
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=7, help="EAGLE-3 drafted tokens per round (DFlash: block_size - 1)")
    ap.add_argument("--only", choices=["plain", "eagle3", "dflash"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(_run_one(args)))
        return 0
    results = {}
    for name in ("plain", "eagle3", "dflash"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: vLLM run failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(lines[-1][len("RESULT "):])
    plain = results["plain"]
    for name in ("plain", "eagle3", "dflash"):
        r = results[name]
        tps = r["tokens"] / r["seconds"]
        line = f"vllm {name:<7} {tps:6.1f} tok/s ({tps / (plain['tokens'] / plain['seconds']):.2f}x plain)"
        if name != "plain":
            rates = " ".join(f"{a / max(1, r['drafts']):.2f}" for a in r["per_pos"])
            line += (f"  K={r['k']} mean acceptance length {1 + r['accepted'] / max(1, r['drafts']):.3f}"
                     f"  accept/pos {rates}  equals greedy {r['outputs'] == plain['outputs']}")
        print(line)
    e, d = results["eagle3"], results["dflash"]
    print(f"vllm ratio   dflash/eagle3 tok/s {(d['tokens'] / d['seconds']) / (e['tokens'] / e['seconds']):.2f}x  "
          f"mean acceptance length {(1 + d['accepted'] / max(1, d['drafts'])) / (1 + e['accepted'] / max(1, e['drafts'])):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
