"""``precompute-eagle3`` rejects every invalid value before any model loads, naming the flag."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from draftcache.precompute.cli import app

from .helpers import default_dims, file_digests, run_cli, write_chat_subset

_, VOCAB, LAYERS = default_dims()

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def chat_file(tmp_path):
    return write_chat_subset(tmp_path / "chat.jsonl", 4)


FLAG_CASES = [
    (["--seq-length", "1"], "--seq-length must be >= 2"),
    (["--dtype", "fp4"], "--dtype must be one of bf16, fp16, fp32, fp8, got 'fp4'"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--supervision", "logits"], "--supervision must be one of auto, probs, topk, hidden, got 'logits'"),
    (["--supervision", "topk"], "--supervision topk needs --target-probs-topk K"),
    (["--supervision", "probs", "--target-probs-topk", "4"],
     "--target-probs-topk 4 conflicts with --supervision probs"),
    (["--supervision", "hidden", "--target-probs-topk", "4"],
     "--target-probs-topk 4 conflicts with --supervision hidden"),
    (["--target-probs-topk", "-1"], "--target-probs-topk must be >= 0, got -1"),
    (["--draft-vocab-size", "8", "--target-probs-topk", "16"],
     "--target-probs-topk (16) must not exceed --draft-vocab-size (8)"),
    (["--draft-vocab-size", "0"], "--draft-vocab-size must be >= 1"),
    (["--aux-layer-ids", "1,x,3"], "--aux-layer-ids: expected comma-separated integers such as '1,15,28', got '1,x,3'"),
    (["--aux-layer-ids", "1,3"],
     "--aux-layer-ids needs exactly three layer ids (low, mid, high) such as '1,15,28', got 2: [1, 3]"),
    (["--aux-layer-ids", "1,3,4,5"], "--aux-layer-ids needs exactly three layer ids"),
    (["--aux-layer-ids", "1,3,3"], "--aux-layer-ids must be distinct, got [1, 3, 3] (repeated: [3])"),
    (["--aux-layer-ids=-1,2,3"], "--aux-layer-ids must be non-negative"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--device", "tpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--chat-template", "no/such/template.jinja"],
     "--chat-template 'no/such/template.jinja': no such file, and not template text either (template text contains "
     "'{{' or '{%'); pass the path of a Jinja file or the template itself"),
    (["--chat-template", " "], "--chat-template must be a file path or the Jinja template text, got an empty value"),
    # need the target's config (read before the weights)
    (["--aux-layer-ids", f"1,3,{LAYERS}"], f"--aux-layer-ids [{LAYERS}] out of range: the target has {LAYERS} decoder"),
    (["--draft-vocab-size", "5000"], f"--draft-vocab-size 5000 exceeds the target vocabulary ({VOCAB})"),
]


@pytest.mark.parametrize("flags,message", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_invalid_flag_is_rejected_before_any_model_loads(tmp_path, chat_file, config_only_target, flags, message):
    out = tmp_path / "cache"
    result = invoke("--target-model", str(config_only_target), "--input-data", str(chat_file),
                    "--output-dir", str(out), "--quiet", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "safetensors" not in result.stderr  # the weights (absent here) were never looked for
    assert not out.exists()


def test_every_problem_is_listed_at_once(tmp_path, chat_file, config_only_target):
    result = invoke("--target-model", str(config_only_target), "--input-data", str(chat_file),
                    "--output-dir", str(tmp_path / "cache"), "--seq-length", "1", "--batch-size", "0",
                    "--dtype", "int8")
    assert result.exit_code == 2
    for flag in ("--seq-length", "--batch-size", "--dtype"):
        assert flag in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_rejected(tmp_path, chat_file, config_only_target):
    result = invoke("--target-model", str(config_only_target), "--input-data", str(chat_file),
                    "--output-dir", str(tmp_path / "cache"), "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_missing_input_file_is_a_clear_error(tmp_path, config_only_target):
    missing = tmp_path / "nowhere" / "chat.jsonl"
    result = invoke("--target-model", str(config_only_target), "--input-data", str(missing),
                    "--output-dir", str(tmp_path / "cache"))
    assert result.exit_code == 1
    assert f"input data '{missing}' does not exist" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_missing_target_directory_is_a_clear_error(tmp_path, chat_file):
    missing = tmp_path / "no-model"
    result = invoke("--target-model", str(missing), "--input-data", str(chat_file),
                    "--output-dir", str(tmp_path / "cache"))
    assert result.exit_code == 1
    assert f"--target-model {missing} does not exist" in result.stderr


def test_non_empty_output_dir_is_refused_and_left_alone(tmp_path, chat_file, config_only_target):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = file_digests(out), os.stat(out / "notes.txt").st_mtime_ns
    result = invoke("--target-model", str(config_only_target), "--input-data", str(chat_file),
                    "--output-dir", str(out))
    assert result.exit_code == 1
    assert f"--output-dir {out} already holds 1 file(s) (notes.txt); pass --resume" in result.stderr
    assert (file_digests(out), os.stat(out / "notes.txt").st_mtime_ns) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    # --resume needs a cache there, not just any files
    result = invoke("--target-model", str(config_only_target), "--input-data", str(chat_file),
                    "--output-dir", str(out), "--resume")
    assert result.exit_code == 1
    assert "holds notes.txt but no manifest.json, so it is not a draftcache cache" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_flag_exit_code_from_a_real_process(tmp_path):
    """The console entry point itself: usage errors exit 2 and print to stderr, nothing created."""
    result = run_cli("--output-dir", str(tmp_path / "cache"), "--dtype", "fp4", "--shard-size", "0", timeout=60)
    assert result.returncode == 2
    assert "--dtype must be one of bf16, fp16, fp32, fp8, got 'fp4'" in result.stderr
    assert "--shard-size must be >= 1, got 0" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "cache").exists()
