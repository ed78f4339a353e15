"""Real chat data on the trainer side: ``--chat-template`` for online training and eval, split
records (a leading assistant turn) that no longer abort, and eval on a prompts-only file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from draftcache.data import ChatTemplateError
from draftcache.defaults import default_target_path
from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.trainer.evaluate import evaluate_draft
from draftcache.trainer.eagle3.export import export_draft
from draftcache.trainer.eagle3.model import Eagle3DraftConfig
from draftcache.trainer.eagle3.setup import build_source

from .helpers import random_draft
from .pipeline_fixtures import build_tiny_target_dir

# ChatML that refuses system messages (like Gemma's template)
NO_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _msgs(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def test_chat_template_flag_is_checked_with_the_other_settings():
    problems = TrainConfig(output_dir="run", cached_target_path="cache", chat_template=NO_SYSTEM).problems()
    assert ("--chat-template applies to online training only; a cache was rendered with its own template (pass "
            "--chat-template to precompute-eagle3)") in problems
    problems = TrainConfig(output_dir="run", chat_template="templates/none.jinja").problems()
    assert problems == ["--chat-template 'templates/none.jinja': no such file, and not template text either "
                        "(template text contains '{{' or '{%'); pass the path of a Jinja file or the template itself"]


def test_the_commands_take_chat_template(tmp_path):
    from typer.testing import CliRunner

    from draftcache.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--output-dir", str(tmp_path / "run"), "--cached-target-path",
                                 str(tmp_path / "cache"), "--chat-template", NO_SYSTEM])
    assert result.exit_code == 2
    assert "--chat-template applies to online training only" in result.stderr
    missing = tmp_path / "missing.jinja"
    result = runner.invoke(app, ["eval", "--draft", str(tmp_path / "draft"), "--chat-template", str(missing)])
    assert result.exit_code == 1
    assert f"error: --chat-template '{missing}': no such file, and not template text either" in result.stderr


def test_online_source_drops_leading_turns_and_skips_what_the_template_refuses(tmp_path):
    target = build_tiny_target_dir(tmp_path / "target")
    data = _write(tmp_path / "chats.jsonl", [
        {"conversations": [{"from": "gpt", "value": "and so on."}, {"from": "human", "value": "Count to 3."},
                           {"from": "gpt", "value": "1, 2, 3."}]},                   # split: starts with a reply
        _msgs(("system", "Be brief."), ("user", "Count to 2."), ("assistant", "1, 2.")),  # refused by NO_SYSTEM
        _msgs(("user", "Count to 4."), ("assistant", "1, 2, 3, 4.")),
    ])
    template = tmp_path / "no_system.jinja"
    template.write_text(NO_SYSTEM, encoding="utf-8")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), target_model=str(target), input_data=str(data),
                      seq_length=64, chat_template=str(template), device="cpu", progress=False)
    source = build_source(cfg.validate(), torch.device("cpu"))
    assert [s.source for s in source.samples] == [f"{data}:1", f"{data}:3"]
    text = source.tokenizer.decode(source.samples[0].input_ids.tolist())
    assert text == "<|im_start|>user\nCount to 3.<|im_end|>\n<|im_start|>assistant\n1, 2, 3.<|im_end|>\n"

    everything_refused = _write(tmp_path / "system.jsonl", [_msgs(("system", "s"), ("user", "q"), ("assistant", "a"))])
    with pytest.raises(ChatTemplateError, match="the chat template refused every conversation .*--chat-template"):
        build_source(replace(cfg, input_data=str(everything_refused)), torch.device("cpu"))


@pytest.mark.slow
def test_eval_on_a_prompts_only_file(tmp_path):
    target_config = AutoConfig.from_pretrained(default_target_path(), local_files_only=True)
    config = Eagle3DraftConfig.from_target_config(target_config, draft_vocab_size=64, aux_layer_ids=[1, 3, 4])
    draft_dir = export_draft(random_draft(config), tmp_path / "draft", target_config=target_config)
    prompts = _write(tmp_path / "prompts.jsonl", [
        _msgs(("system", "Be concise."), ("user", "Please count from 27 up to 34.")),
        {"conversations": [{"from": "gpt", "value": "...done."}, {"from": "human", "value": "Now count to 5."}]},
        _msgs(("system", "Only a system prompt.")),
        _msgs(("user", "What comes after 9?")),
        _msgs(("user", "never read")),
    ])
    report = evaluate_draft(draft_dir=str(draft_dir), input_data=str(prompts), num_prompts=3, draft_tokens=2,
                            max_new_tokens=6, device="cpu")
    assert report.num_prompts == 3 and report.mismatches == 0
    assert report.skipped == {"no_user_turn": 1}
    assert "skipped records    no_user_turn=1" in report.format()
    # the same prompts through --chat-template: a template refusing system prompts skips the first
    report = evaluate_draft(draft_dir=str(draft_dir), input_data=str(prompts), num_prompts=3, draft_tokens=2,
                            max_new_tokens=6, device="cpu", chat_template=NO_SYSTEM)
    assert report.num_prompts == 3
    assert report.skipped == {"no_user_turn": 1, "template_error": 1}
