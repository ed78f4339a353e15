"""Record normalisation, skip accounting and the strict-mode error text."""

from __future__ import annotations

import pytest

from draftcache.data import SKIP_REASONS, BadRecordError, Conversation, SkipCounts, SkippedRecord
from draftcache.data.records import normalize_record


def _reason(record, **options) -> str:
    result = normalize_record(record, "f.jsonl:1", **options)
    assert isinstance(result, SkippedRecord), result
    assert result.source == "f.jsonl:1"
    return result.reason


def _turns(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"{role} {i}"} for i, role in enumerate(roles)]}


def test_sharegpt_roles_map_to_openai_roles():
    record = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "User", "value": "Again"},
            {"from": "chatgpt", "value": "Sure"},
            {"from": "bard", "value": "b"},
            {"from": "bing", "value": "c"},
        ],
    }
    conv = normalize_record(record, "f.jsonl:3")
    assert conv == Conversation(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Sure"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        source="f.jsonl:3",
    )


def test_openai_record_keeps_only_role_and_content():
    record = {"messages": [{"role": "user", "content": "Q", "name": "bob"}, {"role": "assistant", "content": " A "}]}
    conv = normalize_record(record, "hub:x[train]#0")
    assert conv.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " A "}]


def test_arrow_style_rows_with_null_fields_are_accepted():
    # parquet/hub rows carry every column; the unused one is None
    record = {"conversations": None, "messages": [{"role": "user", "content": "Q", "from": None, "value": None},
                                                  {"role": "assistant", "content": "A", "from": None, "value": None}]}
    assert normalize_record(record, "s").messages[1] == {"role": "assistant", "content": "A"}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], "not_an_object"),
        ("text", "not_an_object"),
        ({"text": "hi"}, "no_messages"),
        ({"messages": "hi"}, "no_messages"),
        ({"messages": [], "conversations": [{"from": "gpt", "value": "x"}]}, "ambiguous_format"),
        ({"messages": []}, "empty_conversation"),
        ({"messages": ["hi"]}, "malformed_message"),
        ({"messages": [{"role": "user"}]}, "malformed_message"),
        ({"messages": [{"content": "x"}]}, "malformed_message"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
        ({"messages": [{"role": 3, "content": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "non_text_content"),
        ({"messages": [{"role": "user", "content": None}]}, "non_text_content"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "non_text_content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]}, "empty_content"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no_assistant_turn"),
        (_turns("assistant"), "no_assistant_turn"),
        (_turns("system", "assistant"), "no_assistant_turn"),
        (_turns("assistant", "user"), "no_assistant_turn"),  # the only reply came before the question
    ],
)
def test_bad_records_name_their_reason(record, reason):
    assert reason in SKIP_REASONS
    assert _reason(record) == reason


def test_skip_counts_accumulate_and_summarise():
    skipped = SkipCounts()
    assert skipped.total == 0
    assert skipped.summary() == "skipped 0 records"
    skipped.add("unknown_role", "a.jsonl:4")
    skipped.add("invalid_json", "a.jsonl:2")
    skipped.add("unknown_role", "a.jsonl:9")
    assert skipped.total == 3
    assert skipped.as_dict() == {"invalid_json": 1, "unknown_role": 2}
    assert list(skipped.as_dict()) == ["invalid_json", "unknown_role"]
    assert skipped.summary() == (
        "skipped 3 records: invalid_json=1 (first at a.jsonl:2), unknown_role=2 (first at a.jsonl:4)"
    )


def test_skip_counts_reject_unknown_reason():
    with pytest.raises(ValueError, match="unknown skip reason 'oops'"):
        SkipCounts().add("oops", "a:1")


def test_bad_record_error_names_source_reason_and_fix():
    error = BadRecordError("/d/a.jsonl:7", "unknown_role", "message 1 has role 'tool'")
    assert isinstance(error, ValueError)
    assert str(error) == (
        "/d/a.jsonl:7: bad record (unknown_role): message 1 has role 'tool'. "
        "Fix: drop the record or run without --strict (bad records are then skipped and counted)."
    )
    assert (error.source, error.reason) == ("/d/a.jsonl:7", "unknown_role")


@pytest.mark.parametrize(
    ("roles", "kept", "dropped"),
    [
        (("user", "assistant"), (0, 1), 0),
        (("assistant", "user", "assistant"), (1, 2), 1),                      # a split ShareGPT record
        (("assistant", "assistant", "user", "assistant", "user"), (2, 3, 4), 2),
        (("system", "assistant", "user", "assistant"), (0, 2, 3), 1),         # the system message stays
        (("system", "system", "user", "assistant"), (0, 2, 3), 1),            # only a leading one does
        (("user", "assistant", "assistant", "system", "user"), (0, 1, 2, 3, 4), 0),  # later turns are untouched
    ],
)
def test_turns_before_the_first_user_turn_are_dropped_and_counted(roles, kept, dropped):
    record = _turns(*roles)
    conv = normalize_record(record, "s.json:3")
    assert isinstance(conv, Conversation)
    assert conv.messages == [{"role": roles[i], "content": f"{roles[i]} {i}"} for i in kept]
    assert conv.dropped_turns == dropped


def test_prompts_mode_keeps_unanswered_records_and_needs_a_user_turn():
    conv = normalize_record(_turns("assistant", "system", "user", "user"), "p.jsonl:2", prompts=True)
    assert isinstance(conv, Conversation) and conv.dropped_turns == 2
    assert [m["role"] for m in conv.messages] == ["user", "user"]
    assert conv.prompt_messages() == conv.messages
    assert _reason(_turns("system", "assistant"), prompts=True) == "no_user_turn"
    assert _reason(_turns("system"), prompts=True) == "no_user_turn"
    assert _reason(_turns("user")) == "no_assistant_turn"  # the same record is not training data


def test_prompt_is_the_conversation_up_to_its_first_assistant_turn_ending_with_a_user_turn():
    conv = normalize_record(_turns("system", "user", "system", "assistant", "user", "assistant"), "a:1")
    assert conv.prompt_messages() == [{"role": "system", "content": "system 0"}, {"role": "user", "content": "user 1"}]
    conv = normalize_record(_turns("user", "user", "assistant"), "a:2")
    assert [m["content"] for m in conv.prompt_messages()] == ["user 0", "user 1"]
    assert Conversation([{"role": "system", "content": "s"}], "a:3").prompt_messages() == []


def test_skipped_record_details_name_the_roles():
    skipped = normalize_record(_turns("assistant", "user"), "x.json:9")
    assert skipped == SkippedRecord("x.json:9", "no_assistant_turn",
                                    "no assistant message after the first user message (roles: assistant, user)")
    assert str(skipped.error()).startswith("x.json:9: bad record (no_assistant_turn): no assistant message after")
