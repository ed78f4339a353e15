"""``draftcache regenerate`` on SmolLM2 with ``--engine vllm`` and ``--engine hf`` (fp32, greedy):
the two engines write the same replies, up to near-ties, and the output feeds precompute.

Exact agreement is not guaranteed: vLLM's CPU kernels (paged attention, its own GEMM order) and
HF's eager attention over a left-padded batch sum in different orders, so fp32 logits differ in the
last bits; where the top two logits are closer than that, greedy picks differ and the rest of the
reply (and every later turn of the conversation) follows another path. So the test counts replies
that match exactly and, for every reply that differs while its history was the same, checks that
the first differing token was a near-tie for the HF model itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "x"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}, {"role": "assistant", "content": "x"},
     {"role": "user", "content": "Which of them is the warmest?"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."},
     {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "Give me a Python one-liner that reverses a string."},
     {"role": "assistant", "content": "x"}, {"role": "user", "content": "Now make it a function."},
     {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "How many legs does a spider have?"}, {"role": "assistant", "content": "x"}],
]
MAX_NEW = 48
NEAR_TIE = 1e-3  # logit gap between the two picks at the first difference (fp32 logits of size ~10-30)


@pytest.fixture(scope="module")
def outputs(smollm2_dir, engine_env, tmp_path_factory):
    work = tmp_path_factory.mktemp("regen_vllm")
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    result = {}
    for engine in ("vllm", "hf"):
        out = work / f"{engine}.jsonl"
        r = subprocess.run([sys.executable, "-m", "draftcache.cli", "regenerate", "--target-model", str(smollm2_dir),
                            "--input-data", str(data), "--output", str(out), "--engine", engine, "--dtype", "fp32",
                            "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--max-model-len", "1024",
                            "--quiet"], env=engine_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "regenerated  6 conversations" in r.stdout
        result[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    result["dir"] = work
    return result


def _replies(record):
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


def test_vllm_and_hf_write_the_same_greedy_replies_up_to_near_ties(outputs, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    exact = total = 0
    explained = []
    for v, h in zip(outputs["vllm"], outputs["hf"]):
        assert [m["role"] for m in v["messages"]] == [m["role"] for m in h["messages"]]
        for turn, (a, b) in enumerate(zip(_replies(v), _replies(h))):
            total += 1
            if a == b:
                exact += 1
                continue
            # the first reply that differs: find the first differing token and its logit gap
            upto = [i for i, m in enumerate(h["messages"]) if m["role"] == "assistant"][turn]
            prompt = tokenizer.apply_chat_template(h["messages"][:upto], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
            ta = tokenizer(a, add_special_tokens=False)["input_ids"]
            tb = tokenizer(b, add_special_tokens=False)["input_ids"]
            k = next(i for i in range(min(len(ta), len(tb)) + 1) if i == min(len(ta), len(tb)) or ta[i] != tb[i])
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tb[:k]])).logits[0, -1]
            picks = [ta[k] if k < len(ta) else tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     tb[k] if k < len(tb) else tokenizer.convert_tokens_to_ids("<|im_end|>")]
            gap = float((logits[picks[0]] - logits[picks[1]]).abs())
            explained.append((v["id"], turn, k, gap))
            assert gap < NEAR_TIE, (f"conversation {v['id']} turn {turn + 1}: vLLM and HF differ at reply token {k} "
                                    f"with a logit gap of {gap:.2e} (not a near-tie)")
            break  # later turns see a different history
    print(f"\nvLLM vs HF greedy (fp32): {exact} of {total} replies identical; differing (id, turn, token, gap): "
          f"{explained}")
    assert exact >= total - 2


def test_the_vllm_output_feeds_precompute(outputs, smollm2_dir, engine_env):
    work = outputs["dir"]
    r = subprocess.run([sys.executable, "-m", "draftcache.precompute", "--target-model", str(smollm2_dir),
                        "--input-data", str(work / "vllm.jsonl"), "--output-dir", str(work / "cache"),
                        "--seq-length", "256", "--draft-vocab-size", "1024", "--device", "cpu", "--quiet"],
                       env=engine_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "samples     6 (computed 6 now)" in r.stdout and "skipped     none" in r.stdout
