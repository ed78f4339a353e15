"""``--gpu-memory-utilization`` and ``--vllm-arg`` (draftcache.targets.vllm_options) and their way from
each command's flags to ``vllm.LLM``: the real CLIs run in subprocesses against a stub ``vllm``
package that records the engine arguments it is given and stops there (no vLLM needed; the real
engine takes them in tests/engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draftcache.defaults import default_target_path
from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.targets.vllm_options import (MARGIN_BYTES, RUNNER_RESERVED_ARGS, default_memory_utilization,
                                             free_device_memory, parse_vllm_args)

GiB = 1 << 30

STUB = {
    "vllm/__init__.py": (
        "import json, os\n__version__ = '0.0+stub'\n"
        "class LLM:\n"
        "    def __init__(self, **kwargs):\n"
        "        with open(os.environ['VLLM_STUB_OUT'], 'a') as f:\n"
        "            f.write(json.dumps(kwargs, default=str) + '\\n')\n"
        "        raise RuntimeError('vllm stub: engine arguments recorded')\n"
        "class SamplingParams:\n"
        "    def __init__(self, **kwargs): pass\n"),
    "vllm/platforms/__init__.py": "class _Platform:\n    def is_cpu(self): return True\ncurrent_platform = _Platform()\n",
    "vllm/inputs.py": "class TokensPrompt(dict): pass\n",
    "vllm/distributed/__init__.py": "",
    "vllm/distributed/kv_transfer/__init__.py": "",
    "vllm/distributed/kv_transfer/kv_connector/__init__.py": "",
    "vllm/distributed/kv_transfer/kv_connector/v1/__init__.py": "",
    "vllm/distributed/kv_transfer/kv_connector/v1/example_hidden_states_connector.py": (
        "class ExampleHiddenStatesConnector: pass\nclass PendingSave: pass\n"
        "def extract_from_kv_cache(*args): pass\n"),
    "vllm/model_executor/__init__.py": "",
    "vllm/model_executor/models/__init__.py": "",
    "vllm/model_executor/models/llama_eagle3.py": "class Eagle3LlamaForCausalLM:\n    def load_weights(self, w): pass\n",
}


def test_vllm_args_are_json_values_or_strings():
    assert parse_vllm_args(["max_num_seqs=8", "kv_cache_dtype=fp8", "enable_chunked_prefill=false",
                            'compilation_config={"level": 0}', "max-num-batched-tokens=4096"]) == {
        "max_num_seqs": 8, "kv_cache_dtype": "fp8", "enable_chunked_prefill": False,
        "compilation_config": {"level": 0}, "max_num_batched_tokens": 4096}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_vllm_args(["max_num_seqs"])
    with pytest.raises(ValueError, match="--vllm-arg kv_transfer_config: the runner receives the hidden states"):
        parse_vllm_args(["kv_transfer_config={}"], reserved=RUNNER_RESERVED_ARGS)
    with pytest.raises(ValueError, match="use --gpu-memory-utilization"):
        parse_vllm_args(["gpu_memory_utilization=0.5"])


def test_default_share_fits_what_is_free_less_the_reserve():
    # 23.5 GiB machine, 20.35 GiB free (the numbers): vLLM's 0.92 would not fit
    share = default_memory_utilization(on_cpu=True, reserve_bytes=2 * GiB, free_total=(int(20.35 * GiB), int(23.54 * GiB)))
    assert share == 0.73  # (20.35 - 2 - 1) / 23.54 = 0.737, rounded down
    assert share * 23.54 * GiB <= 20.35 * GiB - 2 * GiB - MARGIN_BYTES
    assert default_memory_utilization(on_cpu=False, free_total=(79 * GiB, 80 * GiB)) == 0.9  # vLLM's cap
    with pytest.raises(ValueError, match="pass --gpu-memory-utilization explicitly"):
        default_memory_utilization(on_cpu=True, reserve_bytes=3 * GiB, free_total=(4 * GiB, 24 * GiB))


def test_free_host_memory_is_read_from_proc_meminfo():
    free, total = free_device_memory(on_cpu=True)
    assert 0 < free <= total


def test_precompute_config_takes_the_flags_with_engine_vllm_only():
    cfg = PrecomputeConfig(output_dir="x", engine="vllm", gpu_memory_utilization=0.5, vllm_args=("max_num_seqs=4",))
    assert cfg.validate().as_dict()["vllm_args"] == ["max_num_seqs=4"]
    with pytest.raises(ConfigError) as e:
        PrecomputeConfig(output_dir="x", gpu_memory_utilization=1.5, vllm_args=("model=y",)).validate()
    text = str(e.value)
    assert "they need --engine vllm" in text and "must be in (0, 1]" in text and "--vllm-arg model:" in text


@pytest.fixture()
def stub_env(tmp_path) -> dict[str, str]:
    for name, text in STUB.items():
        (tmp_path / "stub" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stub" / name).write_text(text, encoding="utf-8")
    src = Path(__file__).resolve().parents[2] / "src"
    path = os.pathsep.join([str(tmp_path / "stub"), str(src), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "VLLM_STUB_OUT": str(tmp_path / "llm.jsonl"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _recorded(env) -> list[dict]:
    path = Path(env["VLLM_STUB_OUT"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_flags_reach_vllm_from_precompute_and_regenerate(stub_env, tmp_path):
    target = default_target_path()
    cmd = [sys.executable, "-m", "draftcache.precompute", "--engine", "vllm", "--target-model", target,
           "--output-dir", str(tmp_path / "cache"), "--num-samples", "2", "--seq-length", "64", "--quiet",
           "--gpu-memory-utilization", "0.3", "--vllm-arg", "max_num_seqs=4", "--vllm-arg", "kv_cache_dtype=auto"]
    proc = subprocess.run(cmd, env=stub_env, capture_output=True, text=True, timeout=300)
    assert "vllm stub: engine arguments recorded" in proc.stderr, proc.stderr[-3000:]
    (precompute,) = _recorded(stub_env)
    assert precompute["gpu_memory_utilization"] == 0.3
    assert (precompute["max_num_seqs"], precompute["kv_cache_dtype"]) == (4, "auto")
    assert precompute["speculative_config"]["method"] == "extract_hidden_states"  # the runner's own, untouched

    cmd = [sys.executable, "-m", "draftcache.cli", "regenerate", "--engine", "vllm", "--target-model", target,
           "--output", str(tmp_path / "regen.jsonl"), "--num-samples", "1", "--quiet", "--vllm-arg", "max_num_seqs=2"]
    proc = subprocess.run(cmd, env=stub_env, capture_output=True, text=True, timeout=300)
    assert "vllm stub: engine arguments recorded" in proc.stderr, proc.stderr[-3000:]
    regenerate = _recorded(stub_env)[1]
    assert regenerate["max_num_seqs"] == 2
    assert 0.05 <= regenerate["gpu_memory_utilization"] <= 0.9  # the default: what is free here


def test_flags_reach_vllm_from_eval(stub_env):
    code = ("from draftcache.trainer.vllm_eval import make_vllm\n"
            "make_vllm('target', draft_dir='draft', gpu_memory_utilization=0.25, llm_kwargs={'max_num_seqs': 3})\n")
    proc = subprocess.run([sys.executable, "-c", code], env=stub_env, capture_output=True, text=True, timeout=120)
    assert "vllm stub: engine arguments recorded" in proc.stderr, proc.stderr[-3000:]
    (kwargs,) = _recorded(stub_env)
    assert (kwargs["gpu_memory_utilization"], kwargs["max_num_seqs"], kwargs["dtype"]) == (0.25, 3, "float32")
    proc = subprocess.run([sys.executable, "-m", "draftcache.cli", "eval", "--engine", "vllm", "--draft", "d",
                           "--vllm-arg", "dtype=float16"], env=stub_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--vllm-arg dtype: the comparison runs in fp32" in proc.stderr, proc.stderr
