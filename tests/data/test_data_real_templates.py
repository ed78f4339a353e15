"""Masks, dropped leading turns and skips with the chat templates real models ship (see
``real_chat_templates``): SmolLM2 and Qwen2.5 inject a default system prompt, Llama-3.1 writes a
dated header, one marks replies with ``{% generation %}``, Gemma-2 raises on roles it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftcache.data import ChatTokenizer, load_conversations, tokenize_all
from draftcache.defaults import default_target_path
from real_chat_templates import CHATML_GENERATION, REAL_TEMPLATES, RealTemplate


SEQ_LENGTH = 120

ANSWERS = {  # assistant text by record; every reply ends its turn with the template's end-of-turn token
    1: ["You are welcome."],
    2: ["How are you today?", "It is four."],
    4: ["Cats and dogs."],
}

RECORDS = [
    # 1: a split ShareGPT record: the end of an earlier answer, then a user turn (2 turns dropped)
    {"conversations": [{"from": "gpt", "value": "and that is all."}, {"from": "bing", "value": "More?"},
                       {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."}]},
    # 2: a system message and two exchanges
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
                  {"role": "assistant", "content": "How are you today?"},
                  {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]},
    # 3: not JSON
    "{broken",
    # 4: two user turns in a row (Gemma-2 raises: roles must alternate)
    {"messages": [{"role": "user", "content": "Tell me a joke"}, {"role": "user", "content": "about cats"},
                  {"role": "assistant", "content": "Cats and dogs."}]},
    # 5: the reply starts after SEQ_LENGTH tokens
    {"messages": [{"role": "user", "content": "please " * 150}, {"role": "assistant", "content": "No."}]},
    # 6: a role no chat model knows
    {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]},
    # 7: only a leading reply: nothing is left after the drop
    {"conversations": [{"from": "gpt", "value": "orphan"}]},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real") / "chats.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    return path


def _masked_runs(tokenizer, sample) -> list[str]:
    runs, previous = [], 0
    for token, bit in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("real", REAL_TEMPLATES, ids=[t.name for t in REAL_TEMPLATES])
def test_real_template_masks_drops_and_skips(make_tokenizer, data_file, real: RealTemplate):
    tokenizer = make_tokenizer(real.text)
    chat = ChatTokenizer(tokenizer, SEQ_LENGTH)
    assert chat.mask_method == ("generation_tags" if real.name == "generation_tags" else "prefix_spans")
    data = load_conversations(str(data_file), lazy=True)
    samples = tokenize_all(data, chat, data.skipped)

    refused = [2, 4] if real.refuses_system else []  # Gemma-2: record 2 has a system message, 4 does not alternate
    kept = [n for n in ANSWERS if n not in refused]
    assert [s.source for s in samples] == [f"{data_file}:{n}" for n in kept]
    expected = {"invalid_json": 1, "no_assistant_turn": 1, "no_supervised_tokens": 1, "unknown_role": 1}
    if refused:
        expected["template_error"] = 2
        assert data.skipped.first_source["template_error"] == f"{data_file}:2"
    assert data.skipped.as_dict() == expected
    assert data.skipped.first_source["no_supervised_tokens"] == f"{data_file}:5"
    assert data.skipped.first_source["no_assistant_turn"] == f"{data_file}:7"
    assert (data.dropped_turns, data.dropped_turn_records) == (2, 1)

    for sample, n in zip(samples, kept):
        text = tokenizer.decode(sample.input_ids.tolist())
        # exactly the reply texts and their end-of-turn tokens: no header, no separator, no system prompt
        assert _masked_runs(tokenizer, sample) == [answer + real.end_of_turn for answer in ANSWERS[n]]
        assert "and that is all." not in text and "More?" not in text  # the dropped leading turns
        if real.default_system and n != 2:
            assert real.default_system in text  # injected, since the kept conversation has no system message
        if n == 2:  # its own system message replaces the default one
            assert "Be brief." in text and (real.default_system is None or real.default_system not in text)
    if real.name == "llama3.1":
        assert "Cutting Knowledge Date: December 2023\nToday Date: " in tokenizer.decode(samples[0].input_ids.tolist())


@pytest.mark.parametrize("real", REAL_TEMPLATES, ids=[t.name for t in REAL_TEMPLATES])
def test_real_template_prompts_end_with_the_generation_prompt(make_tokenizer, tmp_path, real: RealTemplate):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "What is two plus two?"}]}) + "\n")
    conversation = next(iter(load_conversations(str(path), prompts=True)))
    tokenizer = make_tokenizer(real.text)
    ids = ChatTokenizer(tokenizer, None).encode_prompt(conversation)
    text = tokenizer.decode(ids)
    assert text.endswith({"<|eot_id|>": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                          "<end_of_turn>": "<start_of_turn>model\n"}.get(real.end_of_turn, "<|im_start|>assistant\n"))
    assert "What is two plus two?" in text


def test_embedded_template_is_the_asset_file():
    # SMOLLM2 is checked against the real model's file in the engine tier (tests/engine/test_smollm2_assets.py)
    asset = Path(default_target_path()) / "chat_template.jinja"
    assert asset.read_text(encoding="utf-8").strip() == CHATML_GENERATION
