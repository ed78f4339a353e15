"""The data-facing flags of ``precompute-eagle3``: ``--num-samples`` counts usable samples,
``--chat-template`` replaces the tokenizer's template (fingerprinted; ``--resume`` with another one
is refused), template problems are per-record skips unless the template fails everywhere, and
``--num-workers`` tokenizes in processes without changing a byte of the cache."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from draftcache.precompute.cli import app

from .helpers import data_file, file_digests, read_manifest_json, target_dir

# ChatML that refuses system messages, as Gemma's template does (the default chats mostly have one)
NO_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _default_lines() -> list[str]:
    with open(data_file(), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _has_system(line: str) -> bool:
    return json.loads(line)["messages"][0]["role"] == "system"


def _invoke(data, out, *extra):
    return CliRunner().invoke(app, ["--target-model", target_dir(), "--input-data", str(data), "--output-dir",
                                    str(out), "--seq-length", "64", "--quiet", *extra])


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "no_system.jinja"
    path.write_text(NO_SYSTEM, encoding="utf-8")
    return path


def test_num_samples_counts_usable_samples_and_the_template_used_is_fingerprinted(tmp_path, template_file):
    lines = _default_lines()
    system = [line for line in lines if _has_system(line)]
    plain = [line for line in lines if not _has_system(line)]
    data = tmp_path / "chats.jsonl"
    # usable with this template: lines 2 and 5; --num-samples 2 must not read lines 6 and on
    data.write_text("\n".join([system[0], plain[0], "{bad", system[1], plain[1], "{bad", plain[2]]) + "\n")
    out = tmp_path / "cache"
    result = _invoke(data, out, "--num-samples", "2", "--chat-template", str(template_file))
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest_json(out)
    assert manifest["num_samples"] == 2 and manifest["dataset"]["num_samples"] == 2
    assert manifest["dataset"]["skipped"] == {"invalid_json": 1, "template_error": 2}
    assert manifest["tokenizer"]["chat_template_fingerprint"] == hashlib.sha256(NO_SYSTEM.encode()).hexdigest()
    assert "skipped     3 records: invalid_json=1, template_error=2" in result.stdout

    # --resume with the tokenizer's own template: refused before any tokenizing, naming the flag
    before = file_digests(out)
    result = _invoke(data, out, "--num-samples", "2", "--resume")
    assert result.exit_code == 1
    assert (f"--resume refused: the cache in {out} was made with a different chat template "
            "(tokenizer.chat_template_fingerprint: ") in result.stderr
    assert "[--chat-template]. Rerun with the --chat-template it was made with" in result.stderr
    assert file_digests(out) == before
    # the same template given as text instead of a file is the same template
    result = _invoke(data, out, "--num-samples", "2", "--resume", "--chat-template", NO_SYSTEM)
    assert result.exit_code == 0, result.stderr
    assert file_digests(out) == before


def test_a_template_refusing_every_record_ends_the_run_naming_the_flag(tmp_path, template_file):
    data = tmp_path / "system.jsonl"
    data.write_text("\n".join([line for line in _default_lines() if _has_system(line)][:5]) + "\n")
    result = _invoke(data, tmp_path / "cache", "--chat-template", str(template_file))
    assert result.exit_code == 1
    assert (f"error: the chat template refused every conversation (5; the first, at {data}:1: the chat template "
            "raised: System role not supported); pass a template that works with --chat-template") in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{{ raise_exception('not this one') }}",
         "the chat template fails on a plain chat (one user turn, one assistant turn): not this one; pass a template "
         "that works with --chat-template"),
        ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
         "the chat template marks no assistant token in a plain chat"),  # it leaves the replies out
    ],
    ids=["raises", "no_assistant_marked"],
)
def test_a_template_failing_the_start_up_probe_ends_the_run(tmp_path, value, message):
    result = _invoke(data_file(), tmp_path / "cache", "--chat-template", value)
    assert result.exit_code == 1
    assert message in result.stderr
    assert not (tmp_path / "cache").exists()


def test_help_says_what_the_data_flags_do():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"})
    text = " ".join(result.stdout.split())
    assert "Cache N usable samples: records are read in order until N of them survive loading and tokenization" in text
    assert "Tokenize in N worker processes (spawned" in text
    assert "the path of a Jinja file, or the template text itself" in text


@pytest.mark.slow
def test_num_workers_writes_the_same_cache(tmp_path):
    from draftcache.precompute.config import PrecomputeConfig
    from draftcache.precompute.main import precompute_from_config

    lines = _default_lines()[:40]
    lines[3] = "{bad"
    lines[7] = json.dumps({"conversations": [{"from": "gpt", "value": "27, 28."}, {"from": "human", "value": "Go on."},
                                             {"from": "gpt", "value": "29, 30."}]})
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    summaries = []
    for workers in (0, 2):
        cfg = PrecomputeConfig(output_dir=str(tmp_path / f"cache{workers}"), input_data=str(data), seq_length=48,
                               num_samples=30, num_workers=workers, shard_size=8, dtype="fp32", device="cpu",
                               progress=False)
        summaries.append(precompute_from_config(cfg, log=lambda *_: None))
    assert file_digests(tmp_path / "cache0") == file_digests(tmp_path / "cache2")
    manifest = read_manifest_json(tmp_path / "cache2")
    assert manifest["num_samples"] == 30
    assert manifest["dataset"]["dropped_leading_turns"] == {"turns": 1, "records": 1}
    assert summaries[0].skipped == summaries[1].skipped and summaries[0].skipped["invalid_json"] == 1


def test_a_tokenizer_without_template_runs_with_chat_template_and_is_named_without(tmp_path):
    """A base model's tokenizer has no chat template: --chat-template supplies one (the run
    finishes and fingerprints it); without it the error names the flag and nothing is written."""
    import shutil
    from pathlib import Path

    bare = tmp_path / "base-target"
    shutil.copytree(target_dir(), bare)
    template = (bare / "chat_template.jinja").read_text(encoding="utf-8")
    (bare / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((bare / "tokenizer_config.json").read_text(encoding="utf-8"))

    def run(out, *extra):
        return CliRunner().invoke(app, ["--target-model", str(bare), "--input-data", str(data_file()),
                                        "--output-dir", str(out), "--seq-length", "64", "--num-samples", "4",
                                        "--quiet", *extra])

    refused = run(tmp_path / "refused")
    assert refused.exit_code != 0
    assert "--chat-template" in refused.output and "no chat template" in refused.output
    assert not Path(tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())

    ok = run(tmp_path / "ok", "--chat-template", template)
    assert ok.exit_code == 0, ok.output
    manifest = read_manifest_json(tmp_path / "ok")
    assert manifest["num_samples"] == 4
    assert manifest["tokenizer"]["chat_template_fingerprint"] == hashlib.sha256(template.encode()).hexdigest()
