"""The embedded default target and chat dataset: present, well-formed, small, and actually trained."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from draftcache.defaults import DEFAULT_DATA_PATH, DEFAULT_TARGET_DIR, default_data_path, default_target_path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shipped model scores 0.894 on the assistant tokens of the first 20 shipped conversations
# (0.836 on all 600; chance is ~1/1024); 0.75 leaves margin yet fails for an untrained model.
ACCURACY_THRESHOLD = 0.75
ASSETS_DIR = DEFAULT_TARGET_DIR.parent


def _records() -> list[dict]:
    with open(default_data_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_target_path(), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(default_target_path(), dtype=torch.float32,
                                                local_files_only=True).eval()


def test_paths_resolve_inside_the_package():
    import draftcache

    package_dir = Path(draftcache.__file__).resolve().parent
    assert Path(default_target_path()) == DEFAULT_TARGET_DIR == package_dir / "assets" / "default_target"
    assert Path(default_data_path()) == DEFAULT_DATA_PATH == package_dir / "assets" / "default_data" / "chat.jsonl"
    assert {p.name for p in DEFAULT_TARGET_DIR.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
    }


def test_total_asset_size_is_small():
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 5_000_000, f"assets take {total} bytes"


def test_config_fits_eagle3_defaults():
    config = AutoConfig.from_pretrained(default_target_path(), local_files_only=True)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 8  # default aux ids [1, L//2-1, L-4] = [1, 3, 4]
    assert config.tie_word_embeddings is False
    assert config.vocab_size > config.hidden_size
    assert config.max_position_embeddings == 2048
    assert config.dtype == torch.float32


def test_special_tokens(tokenizer, model):
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_every_record_is_an_openai_chat_with_an_assistant_turn():
    records = _records()
    assert 400 <= len(records) <= 800
    assert DEFAULT_DATA_PATH.stat().st_size < 400_000
    n_multi_turn = 0
    for i, record in enumerate(records):
        assert set(record) == {"messages"}, i
        messages = record["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"] for m in messages), i
        roles = [m["role"] for m in messages]
        assert set(roles) <= {"system", "user", "assistant"}, i
        assert "system" not in roles[1:], i
        assert roles[-1] == "assistant", i
        n_multi_turn += roles.count("assistant") > 1
    assert n_multi_turn >= len(records) // 10


def test_chat_template_masks_exactly_the_assistant_turns(tokenizer):
    messages = next(r["messages"] for r in _records() if sum(m["role"] == "assistant" for m in r["messages"]) >= 2)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    assert ids[0] == tokenizer.bos_token_id
    assert len(mask) == len(ids) and 0 < sum(mask) < len(ids)
    masked_text = "".join(tokenizer.decode([t]) for t, m in zip(ids, mask) if m)
    assert masked_text == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_model_predicts_assistant_tokens_far_above_chance(tokenizer, model):
    encs = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True) for r in _records()[:20]]
    width = max(len(e["input_ids"]) for e in encs)
    # Right padding: under causal attention the pads never influence the real positions.
    ids = torch.tensor([list(e["input_ids"]) + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in encs])
    mask = torch.tensor([list(e["assistant_masks"]) + [0] * (width - len(e["assistant_masks"])) for e in encs]).bool()
    with torch.no_grad():
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)  # [20, width-1], prediction of ids[:, t+1]
    label_mask = mask[:, 1:]  # [20, width-1]
    accuracy = float((pred == ids[:, 1:])[label_mask].float().mean())
    assert accuracy > ACCURACY_THRESHOLD, f"assistant next-token accuracy {accuracy:.3f} over {int(label_mask.sum())} tokens"


def test_greedy_reply_follows_the_templates(tokenizer, model):
    def reply(messages: list[dict[str, str]]) -> str:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    assert reply([{"role": "user", "content": "Count from 21 to 27."}]).startswith("21, 22, 23, 24, 25, 26, 27")
    assert reply([{"role": "user", "content": "Convert 3 meters to centimeters."}]) == (
        "There are 100 centimeters in one meter, so 3 meters is 3 x 100 = 300 centimeters.")


def test_shipped_dataset_is_reproduced_by_the_build_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_default_assets", REPO_ROOT / "scripts" / "build_default_assets.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    regenerated = module.ConversationGenerator(module.SHIPPED_SEED).conversations(module.SHIPPED_CONVERSATIONS)
    assert regenerated == _records()
