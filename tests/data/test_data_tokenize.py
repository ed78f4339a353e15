"""tokenize_all over whole inputs: the start-up probe, run-level vs per-record template errors,
``limit`` (N usable samples, reading no further) and the worker pool (equal to one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_chat_tokenizers import CHATML_TEMPLATE
from draftcache.data import (
    BadRecordError,
    ChatTemplateError,
    ChatTokenizer,
    Conversation,
    NoConversationsError,
    SkipCounts,
    load_conversations,
    tokenize_all,
)

# raises on a system message, like Gemma's template
NO_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    + CHATML_TEMPLATE
)


def _chat(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello there!"},
                         {"role": "assistant", "content": "How are you today?"}], **extra}


def _with_system() -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."}] + _chat()["messages"]}


def _long_prompt() -> dict:  # nothing supervised within a short seq_length
    return {"messages": [{"role": "user", "content": "tell me a joke " * 30}, {"role": "assistant", "content": "No."}]}


def _split() -> dict:  # a split ShareGPT record: starts with the end of an answer
    return {"conversations": [{"from": "gpt", "value": "and that is all."}, {"from": "human", "value": "Thanks!"},
                              {"from": "gpt", "value": "You are welcome."}]}


def _write(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ raise_exception('this template renders nothing') }}", "this template renders nothing"),
        ("{%- for m in messages %}{%- if m['role'] == 'user' %}{{ m['content'] }}{%- endif %}{%- endfor %}",
         "marks no assistant token in a plain chat"),
        ("{{ messages[0]['content'] }}{% for m in messages %}", "fails on a plain chat"),  # a syntax error
    ],
    ids=["raises", "drops_replies", "syntax_error"],
)
def test_a_template_that_fails_the_start_up_probe_is_a_run_level_error(make_tokenizer, template, problem):
    with pytest.raises(ChatTemplateError, match=problem) as info:
        ChatTokenizer(make_tokenizer(template), 64)
    assert str(info.value).endswith(
        "pass a template that works with --chat-template (the path of a Jinja file, or the template text)")


def test_a_template_that_refuses_every_record_is_a_run_level_error(make_tokenizer, tmp_path):
    chat = ChatTokenizer(make_tokenizer(NO_SYSTEM), 64)  # passes the probe: it has no system message
    data = load_conversations(str(_write(tmp_path / "sys.jsonl", [_with_system(), "oops", _with_system()])), lazy=True)
    with pytest.raises(ChatTemplateError, match=r"the chat template refused every conversation \(2; the first, at "
                                                rf"{tmp_path}/sys\.jsonl:1: the chat template raised: System role not "
                                                r"supported\); pass a template that works with --chat-template"):
        tokenize_all(data, chat, data.skipped)
    # one record it accepts makes the others ordinary skips
    data = load_conversations(str(_write(tmp_path / "mixed.jsonl", [_with_system(), _chat(), _with_system()])))
    skipped = SkipCounts()
    assert [s.source for s in tokenize_all(data, chat, skipped)] == [f"{tmp_path}/mixed.jsonl:2"]
    assert skipped.as_dict() == {"template_error": 2}
    # records that only fail for other reasons are a data problem
    with pytest.raises(NoConversationsError, match=r"no conversation survived tokenization \(skipped 1 record: "
                                                   r"no_supervised_tokens=1"):
        tokenize_all([Conversation(_long_prompt()["messages"], "l:1")], chat, SkipCounts())
    unread = load_conversations(str(_write(tmp_path / "bad.jsonl", ["{x", {"messages": []}])), lazy=True)
    with pytest.raises(NoConversationsError, match=r"no valid conversation \(skipped 2 records: empty_conversation=1 "
                                                   r".*invalid_json=1 .*\); each record needs"):
        tokenize_all(unread, chat, unread.skipped)
    assert tokenize_all([], chat, SkipCounts()) == []  # no input at all is not an error here


def test_limit_keeps_n_usable_samples_and_reads_no_further(make_tokenizer, tmp_path):
    records = [_chat(), "bad json", _long_prompt(), _with_system(), _split(), _chat(), "bad json", _long_prompt()]
    path = _write(tmp_path / "n.jsonl", records)
    chat = ChatTokenizer(make_tokenizer(NO_SYSTEM), 64)
    data = load_conversations(str(path), lazy=True, num_samples=3)
    samples = tokenize_all(data, chat, data.skipped, limit=3)
    assert [s.source for s in samples] == [f"{path}:{n}" for n in (1, 5, 6)]
    # exactly the records up to line 6 were read: line 7's bad JSON and line 8 are not counted
    assert data.skipped.as_dict() == {"invalid_json": 1, "no_supervised_tokens": 1, "template_error": 1}
    assert (data.dropped_turns, data.dropped_turn_records) == (1, 1)
    # without a limit everything is read
    data = load_conversations(str(path), lazy=True)
    assert len(tokenize_all(data, chat, data.skipped)) == 3
    assert data.skipped.as_dict() == {"invalid_json": 2, "no_supervised_tokens": 2, "template_error": 1}
    with pytest.raises(ValueError, match="limit must be a positive integer or None; got 0"):
        tokenize_all([], chat, SkipCounts(), limit=0)


def _pool_input(tmp_path: Path) -> Path:
    records = []
    for i in range(45):  # loader skips, template errors, truncation skips and dropped turns, interleaved
        kind = i % 9
        if kind == 2:
            records.append("{not json")
        elif kind == 4:
            records.append(_with_system())
        elif kind == 5:
            records.append(_long_prompt())
        elif kind == 7:
            records.append(_split())
        else:
            records.append({"messages": [{"role": "user", "content": f"What is {i} plus two?"},
                                         {"role": "assistant", "content": f"It is {i + 2}."}]})
    return _write(tmp_path / "pool.jsonl", records)


def _summary(data, samples) -> tuple:
    return ([s.source for s in samples], data.skipped.as_dict(), data.skipped.first_source,
            data.dropped_turns, data.dropped_turn_records)


@pytest.mark.slow
def test_worker_pool_output_equals_one_process(make_tokenizer, tmp_path):
    path = _pool_input(tmp_path)
    chat = ChatTokenizer(make_tokenizer(NO_SYSTEM), 64)
    runs = []
    for workers in (0, 2):  # 20 of the 30 usable samples: the pool must stop reading where one process does
        data = load_conversations(str(path), lazy=True)
        samples = tokenize_all(data, chat, data.skipped, limit=20, num_workers=workers, progress=False)
        runs.append((data, samples))
    (one, one_samples), (pool, pool_samples) = runs
    assert _summary(pool, pool_samples) == _summary(one, one_samples)
    assert len(one_samples) == 20 and one.dropped_turns > 0
    assert one.skipped.as_dict() == {"invalid_json": 3, "no_supervised_tokens": 3, "template_error": 3}
    for a, b in zip(one_samples, pool_samples):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
        assert a.input_ids.dtype == b.input_ids.dtype == torch.int64

    # strict: the first bad record in input order is named, although the reader meets the bad JSON
    # of line 12 while a worker still renders line 5
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(_chat())
    path.write_text("\n".join(lines) + "\n")
    strict = load_conversations(str(path), lazy=True, strict=True)
    with pytest.raises(BadRecordError, match=rf"{path}:5: bad record \(template_error\): the chat template raised: "
                                             "System role not supported"):
        tokenize_all(strict, chat, strict.skipped, strict=True, num_workers=2)
