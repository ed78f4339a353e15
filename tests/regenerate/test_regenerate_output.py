"""The appended output and its progress file: commit order, torn lines, refused resumes."""

from __future__ import annotations

import json

import pytest

from draftcache.regenerate.output import RegenerationOutput, ResumeError
from draftcache.regenerate.turns import Regenerated

SETTINGS = {"target_model": "t", "chat_template_sha256": "abc", "temperature": 0.0, "max_new_tokens": 8, "seed": 0}


def _results(start: int, n: int) -> list[Regenerated]:
    return [Regenerated(i, f"in.jsonl:{i + 1}", [{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}], generated_tokens=2)
            for i in range(start, start + n)]


def _write(path, batches, settings=SETTINGS, resume=False):
    out = RegenerationOutput(str(path), settings, resume=resume)
    out.start({})
    for batch in batches:
        out.commit(batch)
    out.close()
    return out


def test_resume_cuts_a_torn_line_and_an_uncommitted_batch(tmp_path):
    path = tmp_path / "out.jsonl"
    _write(path, [_results(0, 2), _results(2, 2)])
    committed = path.read_bytes()
    with open(path, "ab") as f:  # a batch written but never committed, ending in a torn line
        f.write(b'{"id": 4, "messages": []}\n{"id": 5, "mess')
    with open(path.with_name("out.jsonl.progress"), "ab") as f:
        f.write(b'{"next_id": 6, "outp')  # a torn progress line
    out = RegenerationOutput(str(path), SETTINGS, resume=True)
    assert out.progress.next_id == 4 and out.progress.regenerated == 4
    out.start({})
    out.commit(_results(4, 2))
    out.close()
    lines = path.read_bytes().splitlines()
    assert path.read_bytes().startswith(committed)
    assert [json.loads(line)["id"] for line in lines] == [0, 1, 2, 3, 4, 5]
    progress = [json.loads(line) for line in path.with_name("out.jsonl.progress").read_bytes().splitlines()]
    assert [p.get("next_id") for p in progress[1:]] == [2, 4, 6]
    assert progress[-1]["output_bytes"] == path.stat().st_size


def test_a_complete_progress_line_without_its_newline_is_torn(tmp_path):
    """A kill between the JSON of a progress line and its newline: the line is cut, its batch redone,
    and the file stays resumable (appending onto it would glue two JSON objects into one line)."""
    path = tmp_path / "out.jsonl"
    _write(path, [_results(0, 2), _results(2, 2), _results(4, 2)])
    progress_path = path.with_name("out.jsonl.progress")
    raw = progress_path.read_bytes()
    assert raw.endswith(b"}\n")
    progress_path.write_bytes(raw[:-1])  # the tear exactly at the newline
    json.loads(raw[:-1].rsplit(b"\n", 1)[1])  # the last line is still complete JSON
    out = RegenerationOutput(str(path), SETTINGS, resume=True)
    assert out.progress.next_id == 4 and out.progress.regenerated == 4
    out.start({})
    out.commit(_results(4, 2))
    out.close()
    again = RegenerationOutput(str(path), SETTINGS, resume=True)  # old code: refused as damaged
    assert again.progress.next_id == 6
    assert [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == [0, 1, 2, 3, 4, 5]
    progress = [json.loads(line) for line in progress_path.read_bytes().splitlines()]
    assert [p.get("next_id") for p in progress[1:]] == [2, 4, 6]


def test_other_settings_are_refused_naming_each_field_and_flag(tmp_path):
    path = tmp_path / "out.jsonl"
    _write(path, [_results(0, 1)])
    changed = {**SETTINGS, "temperature": 0.7, "chat_template_sha256": "def"}
    with pytest.raises(ResumeError) as e:
        RegenerationOutput(str(path), changed, resume=True)
    message = str(e.value)
    assert "temperature: 0.0 != 0.7  [--temperature]" in message
    assert "chat_template_sha256: 'abc' != 'def'  [--chat-template]" in message
    assert "max_new_tokens" not in message


def test_an_existing_output_needs_resume_and_a_progress_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"messages": []}\n')
    with pytest.raises(ResumeError, match="already exists; pass --resume"):
        RegenerationOutput(str(path), SETTINGS, resume=False)
    with pytest.raises(ResumeError, match="has no progress file out.jsonl.progress"):
        RegenerationOutput(str(path), SETTINGS, resume=True)
    assert path.read_text() == '{"messages": []}\n'  # refused without touching it


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    first = RegenerationOutput(str(path), SETTINGS, resume=False)
    first.start({})
    second = RegenerationOutput(str(path), SETTINGS, resume=True)
    with pytest.raises(ResumeError, match="another draftcache regenerate is writing"):
        second.start({})
    first.close()


def test_files_respect_the_umask(tmp_path):
    import os

    old = os.umask(0o077)
    try:
        _write(tmp_path / "out.jsonl", [_results(0, 1)])
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out.jsonl.progress").stat().st_mode & 0o777 == 0o600
