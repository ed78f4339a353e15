"""``draftcache regenerate`` through the real CLI in subprocesses, on the embedded target (HF engine):
kill and resume, bad records, refused resumes, and the output read by ``precompute-eagle3``."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest

from draftcache.defaults import default_data_path
from prewarmed import SUBPROCESS_ENV, run_python

# 24 chats (single- and multi-turn) in 6 batches of 4: the kill lands mid-run
ARGS = ["--engine", "hf", "--num-samples", "24", "--batch-size", "4", "--max-new-tokens", "32", "--quiet"]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftcache.cli", "regenerate", *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_python(_cmd(*args), env=SUBPROCESS_ENV, timeout=300)


def _in_process(*args: str):
    """``draftcache regenerate ARGS`` in this process (Typer's runner), for runs that end before any
    model loads (refusals, a finished output): ``(exit_code, stdout, stderr)``."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    r = CliRunner().invoke(app, ["regenerate", *args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("regen") / "ref.jsonl"
    r = _run("--output", str(out), *ARGS)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_summary_counts_and_the_output_is_chat_jsonl(reference):
    out, stdout = reference
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(24))
    originals = [json.loads(line) for line in open(default_data_path())][:24]
    changed = 0
    for record, original in zip(records, originals):
        assert [m["role"] for m in record["messages"]] == [m["role"] for m in original["messages"]]
        for new, old in zip(record["messages"], original["messages"]):
            if old["role"] != "assistant":
                assert new == old
            else:
                changed += new["content"] != old["content"]
    assert changed > 0  # the target's replies, not the dataset's
    truncated = sum(r["truncated_turns"] > 0 for r in records)
    assert f"regenerated  24 conversations ({truncated} with a reply cut at --max-new-tokens, 0 cut short)" in stdout
    assert f"truncated    {truncated}" in stdout and "skipped      0" in stdout


def test_killed_and_resumed_equals_uninterrupted(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out.jsonl"
    progress = tmp_path / "out.jsonl.progress"
    proc = subprocess.Popen(_cmd("--output", str(out), *ARGS), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_bytes().count(b"\n") >= 2:  # header + the first batch
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = [json.loads(line) for line in progress.read_bytes().splitlines()[1:]]
    assert committed and not committed[-1]["finished"], "the run finished before it could be killed"
    done = committed[-1]["next_id"]
    assert 0 < done < 24
    with open(out, "ab") as f:
        f.write(b'{"id": 99, "messages": [{"role": "user", "cont')  # a torn last line
    r = _run("--output", str(out), "--resume", *ARGS)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {done} conversations done" in r.stderr
    assert f"resumed      after {done} conversations" in r.stdout
    assert "regenerated  24 conversations" in r.stdout
    assert out.read_bytes() == ref.read_bytes()
    code, _, err = _in_process("--output", str(out), "--resume", *ARGS)  # a finished output: nothing to do
    assert code == 0 and "is complete" in err and out.read_bytes() == ref.read_bytes()
    more = [a if a != "24" else "26" for a in ARGS]  # asking for more continues a finished output
    r = _run("--output", str(out), "--resume", *more)
    assert r.returncode == 0 and "regenerated  26 conversations" in r.stdout
    assert out.read_bytes().startswith(ref.read_bytes())
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(26))


def test_resume_with_other_sampling_is_refused_naming_the_fields(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "ref.jsonl"
    out.write_bytes(ref.read_bytes())
    (tmp_path / "ref.jsonl.progress").write_bytes(ref.with_name("ref.jsonl.progress").read_bytes())
    args = [a if a != "32" else "16" for a in ARGS]
    code, _, err = _in_process("--output", str(out), "--resume", "--temperature", "0.5", *args)
    assert code == 1 and "--resume refused" in err
    assert "temperature: 0.0 != 0.5  [--temperature]" in err
    assert "max_new_tokens: 32 != 16  [--max-new-tokens]" in err
    assert out.read_bytes() == ref.read_bytes()
    code, _, err = _in_process("--output", str(out), *ARGS)
    assert code == 1 and "already exists; pass --resume" in err


BAD = [
    '{"messages": [{"role": "user", "content": "Compute 4 + 16."}, {"role": "assistant", "content": "20"}]}',
    '{"messages": [{"role": "user", "content": "broken"',
    '{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    '{"conversations": [{"from": "human", "value": "What is 6 hours in minutes?"}, {"from": "gpt", "value": "?"}]}',
]


def test_bad_records_are_skipped_and_counted_or_named_with_strict(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(BAD) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run("--output", str(out), "--input-data", str(data), "--engine", "hf", "--max-new-tokens", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "regenerated  2 conversations" in r.stdout
    assert "skipped      2: invalid_json=1, unknown_role=1" in r.stdout
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == [f"{data}:1", f"{data}:4"]
    r = _run("--output", str(tmp_path / "strict.jsonl"), "--input-data", str(data), "--engine", "hf", "--strict",
             "--quiet")
    assert r.returncode == 1 and f"{data}:2: bad record (invalid_json)" in r.stderr


def test_bad_settings_exit_2_and_write_nothing(tmp_path):
    """Refused before any model loads: the CLI in this process (Typer's runner)."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["regenerate", *args])

    r = run("--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "0", "--temperature", "-1")
    assert r.exit_code == 2
    assert "--max-new-tokens must be >= 1" in r.stderr and "--temperature must be >= 0" in r.stderr
    r = run("--output", str(tmp_path / "out.txt"))
    assert r.exit_code == 2 and "must end in .jsonl" in r.stderr
    if importlib.util.find_spec("vllm") is None:
        r = run("--output", str(tmp_path / "out.jsonl"), "--engine", "vllm")
        assert r.exit_code == 2 and "--engine vllm: vLLM is not importable" in r.stderr and "--engine hf" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_output_feeds_precompute(reference, tmp_path):
    ref, _ = reference
    r = run_python(["-m", "draftcache.precompute", "--input-data", str(ref), "--output-dir",
                    str(tmp_path / "cache"), "--seq-length", "256", "--quiet"],
                   env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "samples     24 (computed 24 now)" in r.stdout and "skipped     none" in r.stdout
