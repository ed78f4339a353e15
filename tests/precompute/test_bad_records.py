"""Bad input records are skipped and counted by reason (summary and manifest); ``--strict`` stops
at the first one, naming its file and line, and leaves no cache directory behind."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from draftcache.precompute.cli import app

from .helpers import data_file, read_manifest_json, target_dir


def _good(n: int) -> list[str]:
    with open(data_file(), encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


LONG_PROMPT = json.dumps({"messages": [{"role": "user", "content": "Say hat. " * 60},
                                       {"role": "assistant", "content": "hat"}]})
BAD = {
    3: "{not json",
    5: json.dumps({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}),
    6: json.dumps({"messages": [{"role": "user", "content": "Hi."}]}),
    8: json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "ok"}]}),
    9: LONG_PROMPT,  # the assistant turn starts after --seq-length tokens: nothing left to supervise
}
# a split ShareGPT record (it starts with the end of an answer): kept, its leading turn dropped
SPLIT = json.dumps({"conversations": [{"from": "gpt", "value": "27, 28, 29."}, {"from": "human", "value": "Count on."},
                                      {"from": "gpt", "value": "30, 31."}]})


@pytest.fixture
def messy_file(tmp_path):
    good = iter(_good(6))
    lines = [BAD[n] if n in BAD else next(good) for n in range(1, 12)] + [SPLIT]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _invoke(data, out, *extra):
    return CliRunner().invoke(app, ["--target-model", target_dir(), "--input-data", str(data), "--output-dir",
                                    str(out), "--seq-length", "64", "--quiet", *extra])


def test_bad_records_are_skipped_and_counted(tmp_path, messy_file):
    result = _invoke(messy_file, tmp_path / "cache")
    assert result.exit_code == 0, result.stderr
    expected = {"empty_content": 1, "invalid_json": 1, "no_assistant_turn": 1, "no_supervised_tokens": 1,
                "unknown_role": 1}
    manifest = read_manifest_json(tmp_path / "cache")
    assert manifest["dataset"]["skipped"] == expected
    assert manifest["dataset"]["dropped_leading_turns"] == {"turns": 1, "records": 1}
    assert manifest["num_samples"] == 7
    assert ("skipped     5 records: empty_content=1, invalid_json=1, no_assistant_turn=1, no_supervised_tokens=1, "
            "unknown_role=1") in result.stdout
    assert "dropped     1 turn before the first user turn, in 1 record" in result.stdout


@pytest.mark.parametrize("line,reason", [(3, "invalid_json"), (9, "no_supervised_tokens")])
@pytest.mark.parametrize("existing_dir", [False, True], ids=["new_dir", "empty_dir"])
def test_strict_stops_at_the_first_bad_record_and_writes_nothing(tmp_path, messy_file, line, reason, existing_dir):
    if line == 9:  # only the too-long prompt is bad: it is found at tokenization, after the file was read
        lines = messy_file.read_text().splitlines()
        lines = [text if n == 9 or n not in BAD else lines[0] for n, text in enumerate(lines, start=1)]
        messy_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    if existing_dir:
        out.mkdir()
    result = _invoke(messy_file, out, "--strict")
    assert result.exit_code == 1
    assert f"{messy_file}:{line}: bad record ({reason})" in result.stderr
    assert "run without --strict" in result.stderr
    if existing_dir:
        assert list(out.iterdir()) == []  # no lock, no manifest: a later run can use it as is
    else:
        assert not out.exists()


def test_truncated_json_array_strict_names_the_broken_tail(tmp_path):
    records = [json.loads(line) for line in _good(3)]
    text = json.dumps(records, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"content"') + 5], encoding="utf-8")  # ends inside the last record's key
    tail = text.count("\n", 0, text.rindex("\n {")) + 2  # the line the last record starts on
    result = _invoke(path, tmp_path / "cache", "--strict")
    assert result.exit_code == 1
    assert f"{path}:{tail}: bad record (invalid_json): the file ends inside the JSON array" in result.stderr
    assert not (tmp_path / "cache").exists()
