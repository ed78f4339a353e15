"""load_conversations over real files written under tmp_path (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftcache.data import (
    BadRecordError,
    DataFileError,
    NoConversationsError,
    load_conversations,
)
from draftcache.data import loading


def _sharegpt(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}


def _openai(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def _answers(conversations) -> list[str]:
    return [c.messages[-1]["content"] for c in conversations]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# one bad line per reason the loader can see, in a fixed order; good records on lines 1 and 13
BAD_LINES = {
    2: ("{not json", "invalid_json"),
    3: ("[1, 2]", "not_an_object"),
    4: ('{"text": "hi"}', "no_messages"),
    5: ('{"messages": [], "conversations": []}', "ambiguous_format"),
    6: ('{"messages": []}', "empty_conversation"),
    7: ('{"messages": [{"role": "user"}]}', "malformed_message"),
    8: ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown_role"),
    9: ('{"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "y"}]}',
        "non_text_content"),
    10: ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}', "empty_content"),
    11: ('{"messages": [{"role": "user", "content": "q"}]}', "no_assistant_turn"),
    12: ("", None),  # a blank line is not a record
}


@pytest.fixture
def mixed_jsonl(tmp_path: Path) -> Path:
    lines = [json.dumps(_sharegpt(0))] + [BAD_LINES[n][0] for n in range(2, 13)] + [json.dumps(_openai(1))]
    return _write_jsonl(tmp_path / "mixed.jsonl", lines)


def test_jsonl_counts_every_bad_reason_with_its_line(mixed_jsonl: Path):
    result = load_conversations(str(mixed_jsonl))
    assert _answers(result) == ["a0", "a1"]
    assert [c.source for c in result] == [f"{mixed_jsonl}:1", f"{mixed_jsonl}:13"]
    expected = {reason: 1 for _, reason in BAD_LINES.values() if reason}
    assert result.skipped.as_dict() == dict(sorted(expected.items()))
    assert result.skipped.total == 10
    for line, (_, reason) in BAD_LINES.items():
        if reason:
            assert result.skipped.first_source[reason] == f"{mixed_jsonl}:{line}"


def test_strict_raises_at_first_bad_record_naming_file_and_line(mixed_jsonl: Path):
    with pytest.raises(BadRecordError) as info:
        load_conversations(str(mixed_jsonl), strict=True)
    message = str(info.value)
    assert message.startswith(f"{mixed_jsonl}:2: bad record (invalid_json): the line is not valid JSON")
    assert "drop the record or run without --strict" in message
    assert info.value.source == f"{mixed_jsonl}:2"


def test_strict_error_for_a_later_reason(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(_openai(0)), BAD_LINES[8][0]])
    with pytest.raises(BadRecordError, match=r"d\.jsonl:2: bad record \(unknown_role\): message 0 has role 'tool'"):
        load_conversations(str(path), strict=True)


def test_invalid_utf8_line_is_invalid_json(tmp_path: Path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(_openai(0)).encode() + b"\n\xff\xfe{}\n" + json.dumps(_openai(1)).encode() + b"\n")
    result = load_conversations(str(path))
    assert _answers(result) == ["a0", "a1"]
    assert result.skipped.as_dict() == {"invalid_json": 1}
    assert result.skipped.first_source["invalid_json"] == f"{path}:2"


def test_json_array_names_the_line_each_element_starts_on(tmp_path: Path):
    path = tmp_path / "list.json"
    records = [_sharegpt(0), {"messages": "bad"}, _openai(2)]
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    result = load_conversations(str(path))
    assert _answers(result) == ["a0", "a2"]
    text_lines = path.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(text_lines) if line == "  {"]
    assert [c.source for c in result] == [f"{path}:{starts[0]}", f"{path}:{starts[2]}"]
    assert result.skipped.first_source == {"no_messages": f"{path}:{starts[1]}"}


def test_json_single_object_and_json_lines(tmp_path: Path):
    single = tmp_path / "one.json"
    single.write_text("\n\n" + json.dumps(_openai(5), indent=1), encoding="utf-8")
    result = load_conversations(str(single))
    assert _answers(result) == ["a5"]
    assert result[0].source == f"{single}:3"

    lines = _write_jsonl(tmp_path / "lines.json", [json.dumps(_openai(1)), "oops", json.dumps(_sharegpt(2))])
    result = load_conversations(str(lines))
    assert _answers(result) == ["a1", "a2"]
    assert result.skipped.first_source == {"invalid_json": f"{lines}:2"}


def test_broken_json_array_is_a_file_error_with_line(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"{path}:3: the JSON array is not valid JSON .*convert it to JSON lines"):
        load_conversations(str(path))


def test_parquet_rows_are_named_by_row(tmp_path: Path):
    path = tmp_path / "data.parquet"
    rows = [_sharegpt(0), {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, _sharegpt(2)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_conversations(str(path))
    assert _answers(result) == ["a0", "a2"]
    assert [c.source for c in result] == [f"{path}:1", f"{path}:3"]
    assert result.skipped.first_source == {"unknown_role": f"{path}:2"}


def test_corrupt_parquet_is_a_file_error(tmp_path: Path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataFileError, match="not a readable parquet file"):
        load_conversations(str(path))


def test_directory_reads_data_files_in_path_order(tmp_path: Path):
    root = tmp_path / "dir"
    (root / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _write_jsonl(root / "b" / "x.jsonl", [json.dumps(_openai(2))])
    _write_jsonl(root / "a.jsonl", [json.dumps(_openai(0)), json.dumps(_openai(1))])
    pq.write_table(pa.Table.from_pylist([_sharegpt(3)]), root / "c.parquet")
    _write_jsonl(root / ".hidden" / "z.jsonl", [json.dumps(_openai(9))])
    (root / "README.md").write_text("not data")
    result = load_conversations(str(root), shuffle_seed=123)
    assert _answers(result) == ["a0", "a1", "a2", "a3"]  # local files are never shuffled
    assert result.files == [str(root / "a.jsonl"), str(root / "b" / "x.jsonl"), str(root / "c.parquet")]
    assert result.kind == "files"


def test_empty_directory_is_an_error_naming_it(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"input directory {tmp_path / 'empty'} holds no .json, .jsonl, .parquet file"):
        load_conversations(str(tmp_path / "empty"))


@pytest.mark.parametrize("missing", ["./nope.jsonl", "/definitely/not/here", "data.parquet", "~/no_such_dir_xyz"])
def test_missing_local_path_is_not_a_hub_lookup(missing: str):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conversations(missing)


def test_unsupported_extension(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported input file type '.csv'"):
        load_conversations(str(path))


def test_num_samples_keeps_the_first_valid(mixed_jsonl: Path, tmp_path: Path):
    result = load_conversations(str(mixed_jsonl), num_samples=1)
    assert _answers(result) == ["a0"]
    assert result.skipped.total == 0  # reading stopped at the first valid record
    path = _write_jsonl(tmp_path / "n.jsonl", ["bad", json.dumps(_openai(1)), "bad", json.dumps(_openai(3)),
                                               json.dumps(_openai(4))])
    result = load_conversations(str(path), num_samples=2)
    assert _answers(result) == ["a1", "a3"]
    assert result.skipped.as_dict() == {"invalid_json": 2}
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        load_conversations(str(path), num_samples=0)


def test_all_bad_is_an_error_with_the_summary(tmp_path: Path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["x", "[]"])
    with pytest.raises(NoConversationsError, match=r"skipped 2 records: invalid_json=1 .*not_an_object=1"):
        load_conversations(str(path))


def test_fingerprint_follows_content_not_location(tmp_path: Path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _write_jsonl(tmp_path / "one" / "d.jsonl", [json.dumps(_openai(0))])
    two = _write_jsonl(tmp_path / "two" / "d.jsonl", [json.dumps(_openai(0))])
    first, second = load_conversations(str(one)), load_conversations(str(two))
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64
    two.write_text(json.dumps(_openai(1)) + "\n")
    assert load_conversations(str(two)).fingerprint != first.fingerprint
    identity = first.identity()
    assert identity == {
        "input_data": str(one),
        "kind": "files",
        "split": None,
        "shuffle_seed": 42,
        "num_samples": None,
        "fingerprint": first.fingerprint,
        "datasets_fingerprint": None,
        "dropped_leading_turns": {"turns": 0, "records": 0},
    }
    json.dumps(identity)


def test_saved_dataset_is_shuffled_like_datasets_shuffle(tmp_path: Path):
    records = [_openai(i) for i in range(20)]
    records[4] = {"messages": [{"role": "user", "content": "only a question"}]}
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(tmp_path / "saved"))
    result = load_conversations(str(tmp_path / "saved"), shuffle_seed=7)
    expected = [r["messages"][-1]["content"] for r in dataset.shuffle(seed=7) if r["messages"][-1]["role"] == "assistant"]
    assert _answers(result) == expected
    assert _answers(result) != sorted(expected, key=lambda a: int(a[1:]))
    first = result[0]
    assert first.source == f"{tmp_path / 'saved'}#{int(first.messages[-1]['content'][1:])}"
    assert result.skipped.first_source == {"no_assistant_turn": f"{tmp_path / 'saved'}#4"}
    assert result.kind == "saved_dataset" and result.fingerprint and result.datasets_fingerprint

    unshuffled = load_conversations(str(tmp_path / "saved"), shuffle_seed=None, num_samples=3)
    assert _answers(unshuffled) == ["a0", "a1", "a2"]
    # loading did not write cache files into the saved folder
    assert load_conversations(str(tmp_path / "saved"), shuffle_seed=7).fingerprint == result.fingerprint


def test_saved_dataset_dict_picks_the_split(tmp_path: Path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([_openai(0)]),
                               "test": datasets.Dataset.from_list([_openai(1)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    result = load_conversations(str(tmp_path / "dd"), split="test")
    assert _answers(result) == ["a1"]
    assert result[0].source == f"{tmp_path / 'dd'}[test]#0"
    with pytest.raises(ValueError, match=r"has no split 'validation'; available: \['test', 'train'\]"):
        load_conversations(str(tmp_path / "dd"), split="validation")


def test_hub_names_are_not_mistaken_for_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from draftcache.data.loading import _local_path

    monkeypatch.chdir(tmp_path)
    assert _local_path("Aeala/ShareGPT_Vicuna_unfiltered") is None
    assert _local_path("squad") is None
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert _local_path("org/name") == (tmp_path / "org" / "name").resolve()  # an existing folder wins


# ---- truncated JSON arrays, chunked reading ---------------------------------------------------

def _array_text(records: list) -> str:
    return json.dumps(records, indent=2, ensure_ascii=False)


@pytest.mark.parametrize("cut", ["inside a string", "inside a key", "after a comma", "after an element"])
def test_truncated_json_array_keeps_every_complete_record(tmp_path: Path, cut: str):
    full = _array_text([_sharegpt(0), _openai(1), _sharegpt(2)])
    last = full.index("\n  {", full.index('"a1"')) + 1  # where the third element starts
    ends = {
        "inside a string": full.index('"q2"') + 2,  # like the real ShareGPT split file
        "inside a key": full.index('"from"', last) + 3,
        "after a comma": full.rindex(",", 0, last) + 1,
        "after an element": full.rindex("}", 0, last) + 1,
    }
    path = tmp_path / "cut.json"
    path.write_text(full[: ends[cut]], encoding="utf-8")
    result = load_conversations(str(path))
    assert _answers(result) == ["a0", "a1"]
    assert result.skipped.as_dict() == {"invalid_json": 1}
    # a cut element is named by its first line; a cut between elements by the last line
    line = full.count("\n", 0, last) + 1 if cut.startswith("inside") else full.count("\n", 0, ends[cut]) + 1
    assert line == (26 if cut.startswith("inside") else 25)
    assert result.skipped.first_source == {"invalid_json": f"{path}:{line}"}

    with pytest.raises(BadRecordError, match=rf"{path}:{line}: bad record \(invalid_json\): the file ends inside the "
                                             r"JSON array \(.*\): it is truncated, so this last element is lost"):
        load_conversations(str(path), strict=True)


def test_a_syntax_error_inside_an_array_is_still_a_file_error(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n' + " " * 100, encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"{path}:3: the JSON array is not valid JSON"):
        load_conversations(str(path))
    path.write_text('[{"messages": []}, ]', encoding="utf-8")  # a trailing comma is not truncation
    with pytest.raises(DataFileError, match="the JSON array is not valid JSON"):
        load_conversations(str(path))
    path.write_text('[{"messages": []}] x', encoding="utf-8")
    with pytest.raises(DataFileError, match="extra data after the closing"):
        load_conversations(str(path))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_array_reading_equals_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int):
    # chunk boundaries fall inside multi-byte characters, escapes, literals and numbers
    records = [
        {"messages": [{"role": "user", "content": "caf\u00e9 \u2603 \U0001F600 \"quoted\" \\ back"},
                      {"role": "assistant", "content": "x" * 50}], "score": -12.5e-3, "ok": True, "none": None},
        {"conversations": [{"from": "human", "value": "\u00fcber"}, {"from": "gpt", "value": "1234567890"}],
         "n": 1234567890123, "flags": [False, True, None]},
        [1, 2], 42, "text",
    ]
    text = json.dumps(records, indent=1, ensure_ascii=False)
    path = tmp_path / "arr.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a BOM
    monkeypatch.setattr(loading, "_READ_CHUNK", chunk)
    rows = list(loading._json_file(path))
    assert [value for _, value in rows] == json.loads(text)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line.rstrip(",") in (" {", " [", " 42", ' "text"')]
    assert [source for source, _ in rows] == [f"{path}:{n}" for n in starts]


def test_json_array_not_utf8_is_a_file_error(tmp_path: Path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"messages": [{"role": "user", "content": "caf\xe9"}]}]')
    with pytest.raises(DataFileError, match=rf"{path}: not UTF-8 text \(bad byte at offset 47\)"):
        load_conversations(str(path))


# ---- lazy sets, dropped turns, prompts ----------------------------------------------------------

def test_lazy_set_reads_only_what_is_taken(tmp_path: Path):
    path = _write_jsonl(tmp_path / "lazy.jsonl", [json.dumps(_openai(0)), "bad", json.dumps(_openai(2)), "bad",
                                                 json.dumps(_openai(4))])
    result = load_conversations(str(path), lazy=True, num_samples=2)
    assert result.lazy and result.skipped.total == 0 and result.conversations == []
    with pytest.raises(TypeError, match="a lazily read ConversationSet has no length"):
        len(result)
    stream = iter(result)
    assert next(stream).source == f"{path}:1"
    assert result.skipped.total == 0             # line 2 not read yet
    assert next(stream).source == f"{path}:3"
    assert result.skipped.as_dict() == {"invalid_json": 1}
    stream.close()
    assert result.identity()["num_samples"] == 2  # recorded for the consumer, not applied while reading
    with pytest.raises(RuntimeError, match="were already iterated"):
        iter(result)

    everything = load_conversations(str(path), lazy=True, num_samples=1)
    assert _answers(everything) == ["a0", "a2", "a4"]
    assert everything.skipped.as_dict() == {"invalid_json": 2}


def test_lazy_strict_raises_when_the_bad_record_is_reached(tmp_path: Path):
    path = _write_jsonl(tmp_path / "s.jsonl", [json.dumps(_openai(0)), "[]"])
    stream = iter(load_conversations(str(path), lazy=True, strict=True))
    assert next(stream).source == f"{path}:1"
    with pytest.raises(BadRecordError, match=rf"{path}:2: bad record \(not_an_object\)"):
        next(stream)


def test_leading_assistant_turns_are_dropped_and_counted(tmp_path: Path):
    split = {"conversations": [{"from": "gpt", "value": "...the end of an answer"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]}
    two = {"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "x"},
                             {"from": "bard", "value": "y"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    only_reply = {"conversations": [{"from": "gpt", "value": "orphan"}]}
    path = _write_jsonl(tmp_path / "split.jsonl", [json.dumps(r) for r in (split, _openai(1), two, only_reply)])
    result = load_conversations(str(path))
    assert [[m["role"] for m in c.messages] for c in result] == [
        ["user", "assistant"], ["user", "assistant"], ["system", "user", "assistant"]]
    assert (result.dropped_turns, result.dropped_turn_records) == (3, 2)
    assert result.identity()["dropped_leading_turns"] == {"turns": 3, "records": 2}
    assert result.skipped.as_dict() == {"no_assistant_turn": 1}
    assert result.skipped.first_source == {"no_assistant_turn": f"{path}:4"}


def test_prompts_only_input(tmp_path: Path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}),
             json.dumps(_openai(1)),
             json.dumps({"messages": [{"role": "system", "content": "only a system prompt"}]})]
    path = _write_jsonl(tmp_path / "prompts.jsonl", lines)
    with pytest.raises(NoConversationsError, match="with an assistant turn after a user turn"):
        load_conversations(str(_write_jsonl(tmp_path / "q.jsonl", [lines[0]])))  # not training data
    result = load_conversations(str(path), prompts=True)
    assert [c.prompt_messages()[-1]["content"] for c in result] == ["What is 2+2?", "q1"]
    assert result.skipped.as_dict() == {"no_user_turn": 1}
