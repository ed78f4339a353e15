"""What several engine-tier modules do alike: run the CLI, build SmolLM2 training data from the
target's own greedy replies, and serve one export with vLLM beside our own eval of it."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data" / "chats.json"


def run_cli(cmd: list[str], env: dict[str, str], what: str) -> str:
    """Run ``cmd``; fail the test with its output tail when it exits non-zero."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@dataclass
class ReplyData:
    """``data_dir`` holds ``chats.json`` and ``regenerated.jsonl`` (each prompt with the target's
    greedy reply of ``reply_tokens``); ``reference[i]`` is plain vLLM greedy for ``prompts.ids[i]``,
    cut at ``max_new_tokens`` (or its EOS)."""

    prompts: object  # draftcache.trainer.evaluate.EvalPrompts
    reference: list[list[int]]
    data_dir: Path
    max_len: int


def smollm2_reply_data(target: str, root: Path, *, reply_tokens: int, max_new_tokens: int,
                       draft_tokens: int) -> ReplyData:
    """Plain vLLM greedy replies to the chats' prompts, written as training data beside the chats."""
    from draftcache.data import load_conversations
    from draftcache.trainer.evaluate import load_eval_prompts
    from draftcache.trainer.vllm_eval import make_vllm, release_vllm, vllm_generate

    prompts = load_eval_prompts(target_path=target, input_data=str(DATA), num_prompts=1000)
    eos = prompts.tokenizer.eos_token_id
    max_len = max(len(p) for p in prompts.ids) + reply_tokens + draft_tokens + 8
    plain = make_vllm(target, max_model_len=max_len)
    replies = vllm_generate(plain.llm, prompts.ids, reply_tokens, eos)
    release_vllm(plain)
    reference = [r[:max_new_tokens] if eos not in r[:max_new_tokens] else r[: r.index(eos) + 1] for r in replies]

    data = root / "data"
    data.mkdir()
    shutil.copy(DATA, data / "chats.json")
    # the same records, in the same order, as load_eval_prompts read them
    convs = [c for c in load_conversations(str(DATA), prompts=True) if c.prompt_messages()]
    assert len(convs) == len(prompts.ids)
    with open(data / "regenerated.jsonl", "w", encoding="utf-8") as f:
        for conv, reply in zip(convs, replies):
            answer = prompts.tokenizer.decode(reply, skip_special_tokens=True)
            f.write(json.dumps({"messages": conv.prompt_messages() + [{"role": "assistant", "content": answer}]}) + "\n")
    return ReplyData(prompts=prompts, reference=reference, data_dir=data, max_len=max_len)


def serve_beside_ours(name: str, target: str, draft_dir: Path, prompts, *, draft_tokens: int, max_new_tokens: int,
                      max_len: int) -> dict:
    """``draftcache eval`` of ``draft_dir`` and vLLM serving it (K = ``draft_tokens``) on the same
    prompts: our report, vLLM's load check, outputs and counters, the drafter parameters vLLM
    loaded (``snapshot``) and the variant flags its drafter reads."""
    from draftcache.trainer.evaluate import evaluate_draft
    from draftcache.trainer.vllm_eval import (check_vllm_draft, counters_since, drafter_state, make_vllm,
                                              release_vllm, vllm_generate, vllm_spec_counters)

    ours = evaluate_draft(draft_dir=str(draft_dir), target_model=target, prompts=prompts, num_prompts=len(prompts.ids),
                          draft_tokens=draft_tokens, max_new_tokens=max_new_tokens, device="cpu")
    engine = make_vllm(target, draft_dir=str(draft_dir), draft_tokens=draft_tokens, max_model_len=max_len)
    check = check_vllm_draft(engine, draft_dir)
    before = vllm_spec_counters(engine.llm, draft_tokens)
    outputs = vllm_generate(engine.llm, prompts.ids, max_new_tokens, prompts.tokenizer.eos_token_id)
    counters = counters_since(vllm_spec_counters(engine.llm, draft_tokens), before)
    snapshot = engine.drafter_params[0]
    flags = engine.llm.collective_rpc(drafter_state)[0]
    release_vllm(engine)
    print(f"\n[{name}] vLLM mean acceptance length {counters.mean_acceptance_length:.3f} (drafts "
          f"{counters.num_drafts}, accepted per position {counters.num_accepted_tokens_per_pos}); ours "
          f"{ours.stats.mean_acceptance_length:.3f} (drafts {ours.stats.num_drafts}, accepted per position "
          f"{ours.stats.num_accepted_tokens_per_pos}), tau {ours.tau:.3f}, drafter forwards per round "
          f"{ours.stats.draft_forwards_per_round:.2f}; load check: {check.format()}")
    return {"name": name, "dir": draft_dir, "ours": ours, "check": check, "outputs": outputs, "counters": counters,
            "snapshot": snapshot, "flags": flags}
