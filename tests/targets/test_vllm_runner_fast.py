"""The vLLM runner's parts that need no vLLM: layer-id conventions checked against a real HF forward,
the head (final norm + lm_head) it rebuilds logits with, the weights fingerprint it streams from the
checkpoint, row validation, the ``--engine`` flags and the import isolation of ``draftcache.targets``.

The runner itself (vLLM on SmolLM2) is tested in tests/engine/test_vllm_runner.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftcache.defaults import default_data_path, default_target_path
from draftcache.precompute.config import PrecomputeConfig
from draftcache.precompute.fingerprint import config_fingerprint, model_fingerprint, named_tensors_fingerprint
from draftcache.targets import HFEagle3TargetModel, RunnerError, TargetLayoutError
from draftcache.targets.loading import load_target_model
from draftcache.targets.vllm_runner import TargetHeadModel, right_padded_lengths, vllm_capture_ids, vllm_layer_id
from prewarmed import SUBPROCESS_ENV, run_python

VLLM_AVAILABLE = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_model():
    return load_target_model(default_target_path(), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with TIED embeddings (the checkpoint then holds no lm_head.weight)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(default_target_path())
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial norm, so applying it matters
    out = tmp_path_factory.mktemp("tied")
    model.save_pretrained(out)
    return out


def _last_layer_pre_norm(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The last decoder layer's output (before the final norm) and the HF outputs of the same forward."""
    captured = {}
    layer = model.model.layers[-1]
    handle = layer.register_forward_hook(lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        handle.remove()
    return captured["h"], out


def test_vllm_layer_ids_are_hf_hidden_states_indices(hf_model):
    """vLLM id k (input of decoder layer k) = HF hidden_states[k] = our decoder-output id k - 1."""
    target = HFEagle3TargetModel(hf_model, aux_layer_ids=[0, 3, 6])
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(1))
    aux = target.forward_capture(ids, torch.ones_like(ids)).aux_hidden_states  # [B, S, 3H]
    _, out = _last_layer_pre_norm(hf_model, ids)
    hidden = hf_model.config.hidden_size
    for slot, i in enumerate(target.aux_layer_ids):
        torch.testing.assert_close(aux[..., slot * hidden : (slot + 1) * hidden], out.hidden_states[vllm_layer_id(i)],
                                   rtol=0, atol=0)


def test_capture_ids_add_the_pre_norm_last_layer_sorted_and_deduplicated():
    assert vllm_capture_ids([1, 14, 26], 30) == [2, 15, 27, 30]
    assert vllm_capture_ids([26, 1, 14], 30) == [2, 15, 27, 30]  # vLLM orders them itself
    assert vllm_capture_ids([0, 14, 29], 30) == [1, 15, 30]      # the last layer's output is the logits' input


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_head_rebuilds_the_final_hidden_and_logits_exactly(which, hf_model, tied_dir):
    """norm + lm_head applied to the pre-norm last layer output (vLLM id L) give the HF model's
    final hidden state (HF hidden_states[L], after the norm) and logits, bit for bit: same modules."""
    path = default_target_path() if which == "untied" else str(tied_dir)
    model = hf_model if which == "untied" else load_target_model(path, device=torch.device("cpu"))
    head = TargetHeadModel(path)
    assert (head.lm_head.weight is head.embed_tokens.weight) == (which == "tied")
    ids = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(2))
    pre_norm, out = _last_layer_pre_norm(model, ids)
    final_hidden, logits = head(pre_norm)
    torch.testing.assert_close(final_hidden, out.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(head.get_input_embeddings().weight, model.get_input_embeddings().weight, rtol=0, atol=0)
    # the manifest's fingerprints of a vLLM-served target equal the HF model's
    assert named_tensors_fingerprint(head.checkpoint_tensors()) == model_fingerprint(model)
    assert config_fingerprint(head.config) == config_fingerprint(model.config)


def test_head_refuses_a_final_logit_transform_and_a_checkpoint_without_weights(tmp_path):
    softcapped = tmp_path / "softcapped"
    shutil.copytree(default_target_path(), softcapped)
    config = json.loads((softcapped / "config.json").read_text())
    (softcapped / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(TargetLayoutError, match="final_logit_softcapping=30.0.*use the HF engine"):
        TargetHeadModel(softcapped)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(default_target_path()) / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        TargetHeadModel(no_weights)


def test_rows_must_be_right_padded_and_non_empty():
    assert right_padded_lengths(torch.tensor([[1, 1, 1], [1, 0, 0]])) == [3, 1]
    with pytest.raises(RunnerError, match="right-padded"):
        right_padded_lengths(torch.tensor([[0, 1, 1]]))
    with pytest.raises(RunnerError, match="empty prompt"):
        right_padded_lengths(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("changes, message", [
    ({"engine": "sglang"}, "--engine must be one of hf, vllm, got 'sglang'"),
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size must be >= 1, got 0"),
    ({"tensor_parallel_size": 2}, "--tensor-parallel-size 2 needs --engine vllm"),
    ({"engine": "vllm", "device": "cpu"}, "--device cpu does not apply to --engine vllm"),
])
def test_engine_flags_are_validated(changes, message):
    problems = PrecomputeConfig(output_dir="out", **changes).problems()
    assert any(message in p for p in problems), problems


def test_valid_engine_flags():
    assert PrecomputeConfig(output_dir="out", engine="vllm", tensor_parallel_size=3).problems() == []
    assert PrecomputeConfig(output_dir="out").engine == "hf"


def test_importing_the_target_and_precompute_does_not_import_vllm():
    code = ("import sys, draftcache.targets, draftcache.targets.vllm_runner, draftcache.precompute.engines, "
            "draftcache.precompute.pipeline, draftcache.precompute.cli; "
            "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
            "assert not loaded, loaded; print('ok')")
    # a fresh interpreter: what a prewarmed one had imported before would hide an import made here
    proc = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(VLLM_AVAILABLE, reason="checks the message where vLLM is not installed")
def test_engine_vllm_without_vllm_fails_before_reading_data(tmp_path):
    out = tmp_path / "cache"
    proc = run_python(["-m", "draftcache.precompute", "--output-dir", str(out), "--engine", "vllm",
                       "--quiet"], env=SUBPROCESS_ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--engine vllm: the vllm package is not importable" in proc.stderr
    assert not out.exists()


def test_manifest_records_the_engine_and_resume_refuses_another(tmp_path):
    """An hf run records target.engine; a cache recorded as made by vLLM is refused by an hf
    --resume before any data or model loads (tests/engine runs the real vLLM side)."""
    import transformers
    from typer.testing import CliRunner

    from draftcache.precompute.cli import app as precompute

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(Path(default_data_path()).read_text().splitlines()[:4]) + "\n")
    out = tmp_path / "cache"
    args = ["--output-dir", str(out), "--input-data", str(chats), "--quiet", "--shard-size", "2"]
    run = CliRunner().invoke(precompute, args)  # the precompute CLI in this process (Typer's runner)
    assert run.exit_code == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["engine"] == {"name": "hf", "version": transformers.__version__}

    from draftcache.cache_format import Manifest, ManifestError, validate_manifest

    assert Manifest(manifest).engine == {"name": "hf", "version": transformers.__version__}
    broken = json.loads(json.dumps(manifest))
    del broken["target"]["engine"]["version"]
    with pytest.raises(ManifestError, match="version"):
        validate_manifest(broken)

    manifest["target"]["engine"] = {"name": "vllm", "version": "0.32.0"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in out.iterdir())
    run = CliRunner().invoke(precompute, [*args, "--resume", "--input-data", str(tmp_path / "missing.jsonl")])
    assert run.exit_code == 1, run.stderr
    assert "--resume refused" in run.stderr and "target.engine.name: 'vllm' != 'hf'" in run.stderr
    assert "--engine vllm" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == before
