"""Export: round trip, engine-facing config fields, and each engine's weight-name rules.

The engine rules below restate docs/REFERENCE.md "Engine checkpoint formats" (and the
loaders read there: SGLang python/sglang/srt/models/llama_eagle3.py, vLLM
vllm/model_executor/models/llama_eagle3.py, vLLM speculators config conversion); the
parameter lists are those engines' module parameters for a one-layer draft.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from draftcache.trainer.checkpoint import TrainState, save_checkpoint
from draftcache.trainer.eagle3.export import export_draft, load_exported_draft
from draftcache.trainer.eagle3.model import Eagle3DraftConfig

from .helpers import LLAMA3_ROPE, random_draft, tiny_target_config

FORMATS = ["eagle3", "speculators"]


# ---------------------------------------------------------------------------------------------
# Engine parameter tables (name -> shape) and stacked-shard layouts
# ---------------------------------------------------------------------------------------------


def _layer_params(prefix: str, cfg: Eagle3DraftConfig) -> dict[str, tuple[int, ...]]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return {
        f"{prefix}hidden_norm.weight": (h,),
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}self_attn.qkv_proj.weight": (qkv_rows, 2 * h),
        f"{prefix}self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        f"{prefix}post_attention_layernorm.weight": (h,),
        f"{prefix}mlp.gate_up_proj.weight": (2 * i, h),
        f"{prefix}mlp.down_proj.weight": (h, i),
    }


def sglang_params(cfg: Eagle3DraftConfig) -> dict[str, tuple[int, ...]]:
    """SGLang LlamaForCausalLMEagle3 (num_hidden_layers=1, tie_word_embeddings=False)."""
    return {
        "model.embed_tokens.weight": (cfg.target_vocab_size, cfg.hidden_size),
        "model.fc.weight": (cfg.hidden_size, cfg.num_aux_layers * cfg.target_hidden_size),
        **_layer_params("model.midlayer.", cfg),
        "model.norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.draft_vocab_size, cfg.hidden_size),
    }


def vllm_params(cfg: Eagle3DraftConfig) -> dict[str, tuple[int, ...]]:
    """vLLM Eagle3LlamaForCausalLM (its LlamaModel keeps the decoder layer as layers.0)."""
    return {
        "model.embed_tokens.weight": (cfg.target_vocab_size, cfg.hidden_size),
        **_layer_params("model.layers.0.", cfg),
        "model.fc.weight": (cfg.hidden_size, cfg.num_aux_layers * cfg.target_hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.draft_vocab_size, cfg.hidden_size),
        "draft_id_to_target_id": (cfg.draft_vocab_size,),
    }


STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


class FakeParams:
    """Engine parameters as empty slots; stacked ones are filled shard by shard with shape checks."""

    def __init__(self, table: dict[str, tuple[int, ...]], cfg: Eagle3DraftConfig):
        self.table = table
        self.values: dict[str, torch.Tensor] = {}
        self.shards: dict[str, dict] = {}
        q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
            cfg.intermediate_size
        self.rows = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), 0: (0, inter), 1: (inter, inter)}

    def __contains__(self, name: str) -> bool:
        return name in self.table

    def load(self, name: str, tensor: torch.Tensor, shard=None) -> None:
        if shard is None:
            assert tuple(tensor.shape) == self.table[name], (name, tuple(tensor.shape), self.table[name])
            self.values[name] = tensor
            return
        start, size = self.rows[shard]
        assert tuple(tensor.shape) == (size, self.table[name][1]), (name, shard, tuple(tensor.shape))
        self.shards.setdefault(name, {})[shard] = (start, tensor)
        parts = self.shards[name]
        if len(parts) == (3 if shard in ("q", "k", "v") else 2):
            self.values[name] = torch.cat([t for _, (_, t) in sorted(parts.items(), key=lambda kv: kv[1][0])])

    def unfilled(self) -> list[str]:
        return sorted(set(self.table) - set(self.values))


def sglang_load(tensors: dict[str, torch.Tensor], cfg: Eagle3DraftConfig):
    """SGLang's rules: d2t -> hot_token_id = d2t + arange; t2d ignored; stacked q/k/v and
    gate/up; keep a name that is already a parameter, else prefix ``model.``; unknown names
    are silently skipped."""
    params = FakeParams(sglang_params(cfg), cfg)
    hot_token_id, skipped = None, []
    for name, tensor in tensors.items():
        if "d2t" in name:
            hot_token_id = tensor + torch.arange(tensor.shape[0])
            continue
        if "t2d" in name:
            continue
        for param_suffix, weight_suffix, shard in STACKED:
            if weight_suffix not in name:
                continue
            name = name.replace(weight_suffix, param_suffix)
            target = name if name in params else f"model.{name}"
            if target in params:
                params.load(target, tensor, shard)
            else:
                skipped.append(name)
            break
        else:
            target = name if name in params else f"model.{name}"
            if target in params:
                params.load(target, tensor)
            else:
                skipped.append(name)
    return params, hot_token_id, skipped


def vllm_load(tensors: dict[str, torch.Tensor], cfg: Eagle3DraftConfig):
    """vLLM's rules: skip t2d; d2t -> draft_id_to_target_id; prefix ``model.`` except lm_head;
    inside the model rename ``midlayer.`` -> ``layers.0.`` and stack q/k/v, gate/up; an unknown
    name raises. Embeddings absent from the checkpoint come from the target."""
    params = FakeParams(vllm_params(cfg), cfg)
    for name, tensor in tensors.items():
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
        elif "lm_head" not in name:
            name = "model." + name
        if name.startswith("model."):
            name = "model." + name[len("model."):].replace("midlayer.", "layers.0.")
        for param_suffix, weight_suffix, shard in STACKED:
            if weight_suffix in name:
                name = name.replace(weight_suffix, param_suffix)
                if name not in params:
                    raise KeyError(f"vLLM: no parameter {name}")
                params.load(name, tensor, shard)
                break
        else:
            if name not in params:
                raise KeyError(f"vLLM: no parameter {name}")
            params.load(name, tensor)
    return params


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def model(draft_config):
    return random_draft(draft_config, seed=4, draft_vocab_seed=5)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 10), generator=gen), torch.randn(2, 10, 96, generator=gen)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_gives_identical_logits(tmp_path, model, target_config, fmt):
    out = export_draft(model, tmp_path / fmt, target_config=target_config, target_model_id="org/tiny", format=fmt,
                       include_embeddings=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries left
    loaded = load_exported_draft(out)
    assert loaded.config == model.config
    assert not loaded.embed_tokens.weight.requires_grad
    ids, aux = _inputs()
    assert torch.equal(loaded(ids, aux).logits, model(ids, aux).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_round_trip_without_embeddings_and_in_bfloat16(tmp_path, model):
    export_draft(model, tmp_path, include_embeddings=False, dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "embed_tokens.weight" not in tensors
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["d2t"].dtype == torch.int64
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"missing names \['embed_tokens.weight'\]"):
        load_exported_draft(tmp_path)
    loaded = load_exported_draft(tmp_path, target_embeddings=model.embed_tokens.weight.detach())
    assert torch.equal(loaded.fc.weight, model.fc.weight.detach().to(torch.bfloat16).float())


def test_eagle3_config_fields(tmp_path, draft_config, target_config):
    export_draft(random_draft(draft_config), tmp_path, target_config=target_config)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["tie_word_embeddings"]) == ("llama", 1, False)
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "rms_norm_eps", "hidden_act", "vocab_size", "draft_vocab_size",
                                "target_hidden_size")} == {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": 128, "draft_vocab_size": 64,
        "target_hidden_size": 32}
    assert (cfg["max_position_embeddings"], cfg["rope_theta"], cfg["rope_scaling"]) == (131072, 500000.0, LLAMA3_ROPE)
    assert cfg["norm_before_residual"] is False
    # SGLang reads eagle_config and adds 1; vLLM reads the top-level key as the layer to capture the input of
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert cfg["eagle_config"]["use_aux_hidden_state"] is True
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert cfg["draftcache"]["aux_layer_ids"] == [1, 3, 4]

    # what a transformers-based engine sees when it parses the directory
    parsed = AutoConfig.from_pretrained(tmp_path)
    assert parsed.max_position_embeddings == 131072
    assert parsed.rope_parameters == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert parsed.draft_vocab_size == 64 and parsed.tie_word_embeddings is False


def test_speculators_config_fields_and_vllm_conversion(tmp_path, draft_config, target_config):
    export_draft(random_draft(draft_config), tmp_path, target_config=target_config, target_model_id="org/tiny",
                 format="speculators", num_speculative_tokens=5)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["norm_before_residual"] is False and cfg["draft_vocab_size"] == 64
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert cfg["speculators_config"] == {
        "algorithm": "eagle3",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": "org/tiny", "architectures": ["LlamaForCausalLM"]},
    }
    layer = cfg["transformer_layer_config"]
    assert (layer["model_type"], layer["num_hidden_layers"], layer["vocab_size"]) == ("llama", 1, 128)
    assert (layer["max_position_embeddings"], layer["rope_theta"], layer["rope_scaling"]) == (
        131072, 500000.0, LLAMA3_ROPE)

    # vLLM's speculators conversion as read: required structure, then the eagle3 updater
    spec = cfg["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] and "name_or_path" in spec["verifier"]
    assert isinstance(cfg["transformer_layer_config"], dict)
    converted = dict(layer)
    converted.update(draft_vocab_size=cfg.get("draft_vocab_size"), target_hidden_size=cfg["target_hidden_size"],
                     norm_before_residual=cfg.get("norm_before_residual", True),  # vLLM's default is True
                     architectures=["Eagle3LlamaForCausalLM"],
                     eagle_aux_hidden_state_layer_ids=cfg["eagle_aux_hidden_state_layer_ids"])
    assert converted["norm_before_residual"] is False
    parsed = AutoConfig.for_model(**converted)
    assert parsed.max_position_embeddings == 131072 and parsed.draft_vocab_size == 64


def test_aux_layer_ids_name_the_same_tensors_in_both_engines(tmp_path, draft_config, target_config):
    """Capture what each engine would with a real tiny target: SGLang hooks the input of layer
    ``eagle_config id + 1``, vLLM the input of layer ``top-level id``; both must be the output
    of our decoder layer ``i``."""
    export_draft(random_draft(draft_config), tmp_path, target_config=target_config)
    cfg = json.loads((tmp_path / "config.json").read_text())
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tiny_target_config()).eval()
    inputs, outputs = {}, {}
    for j, layer in enumerate(target.model.layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, j=j: inputs.__setitem__(j, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        layer.register_forward_hook(
            lambda mod, args, out, j=j: outputs.__setitem__(j, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        target(torch.randint(0, 128, (1, 6)))
    ours = [outputs[i] for i in draft_config.aux_layer_ids]
    sglang = [inputs[i + 1] for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    vllm = [inputs[i] for i in cfg["eagle_aux_hidden_state_layer_ids"]]
    for a, b, c in zip(ours, sglang, vllm):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("include_embeddings", [True, False])
def test_engines_fill_every_parameter_from_the_eagle3_export(tmp_path, model, include_embeddings):
    export_draft(model, tmp_path, include_embeddings=include_embeddings)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    cfg = model.config
    absent_ok = [] if include_embeddings else ["model.embed_tokens.weight"]  # engines share the target's

    sg, hot_token_id, skipped = sglang_load(tensors, cfg)
    assert skipped == [] and sg.unfilled() == absent_ok
    assert torch.equal(hot_token_id, model.selected_token_ids)
    attn = model.midlayer.self_attn
    assert torch.equal(sg.values["model.midlayer.self_attn.qkv_proj.weight"],
                       torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(sg.values["model.midlayer.mlp.gate_up_proj.weight"],
                       torch.cat([model.midlayer.mlp.gate_proj.weight, model.midlayer.mlp.up_proj.weight]))

    vl = vllm_load(tensors, cfg)
    assert vl.unfilled() == absent_ok
    assert torch.equal(vl.values["draft_id_to_target_id"] + torch.arange(64), model.selected_token_ids)
    assert torch.equal(vl.values["model.layers.0.self_attn.qkv_proj.weight"],
                       sg.values["model.midlayer.self_attn.qkv_proj.weight"])


def test_vllm_fills_every_parameter_from_the_speculators_export(tmp_path, model):
    export_draft(model, tmp_path, format="speculators", include_embeddings=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert any(name.startswith("layers.0.") for name in tensors)
    vl = vllm_load(tensors, model.config)
    assert vl.unfilled() == []
    assert torch.equal(vl.values["model.layers.0.mlp.down_proj.weight"], model.midlayer.mlp.down_proj.weight)


def test_model_prefixed_layer_checkpoint_is_flagged(tmp_path, model):
    """A checkpoint saved as ``model.layers.0.*`` loads as a random layer in SGLang (silently)
    and fails in vLLM; our loader refuses it by name."""
    export_draft(model, tmp_path)
    good = load_file(str(tmp_path / "model.safetensors"))
    bad = {}
    for name, tensor in good.items():
        if name.startswith("midlayer."):
            name = "model.layers.0." + name[len("midlayer."):]
        elif name not in ("d2t", "t2d", "lm_head.weight"):
            name = "model." + name
        bad[name] = tensor
    save_file(bad, str(tmp_path / "model.safetensors"))

    sg, _, skipped = sglang_load(bad, model.config)
    assert "model.midlayer.self_attn.qkv_proj.weight" in sg.unfilled()
    assert "model.layers.0.self_attn.qkv_proj.weight" in skipped
    with pytest.raises(KeyError, match=r"no parameter model\.model\."):
        vllm_load(bad, model.config)
    with pytest.raises(ValueError, match=r"unknown names \[.*'model.layers.0.mlp.down_proj.weight'"):
        load_exported_draft(tmp_path)


def test_export_refuses_a_mismatched_target_and_bad_arguments(tmp_path, model):
    other_rope = tiny_target_config(rope_scaling=None, rope_theta=10000.0)
    with pytest.raises(ValueError, match=r"rope_theta: draft has 500000.0, target gives 10000.0"):
        export_draft(model, tmp_path, target_config=other_rope)
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        export_draft(model, tmp_path, format="gguf")
    with pytest.raises(ValueError, match="export dtype must be one of"):
        export_draft(model, tmp_path, dtype=torch.int8)
    assert not any(tmp_path.iterdir())


def test_export_warns_that_sglang_ignores_norm_before_residual(tmp_path, draft_config):
    cfg = Eagle3DraftConfig.from_dict({**draft_config.to_dict(), "norm_before_residual": True})
    with pytest.warns(UserWarning, match="SGLang"):
        export_draft(random_draft(cfg), tmp_path, include_embeddings=True)
    assert load_exported_draft(tmp_path).config.norm_before_residual is True


# ---------------------------------------------------------------------------------------------
# Issue 8 section 4: umask, embeddings, EAGLE-3.1 flags
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask, file_mode", [(0o022, 0o644), (0o027, 0o640)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_files_respect_the_umask(tmp_path, model, umask, mask, file_mode, fmt):
    """A server running as another user must be able to read the export (mkstemp gave 0600)."""
    umask(mask)
    export_draft(model, tmp_path / "out", format=fmt)
    assert _modes(tmp_path / "out") == {"config.json": file_mode, "model.safetensors": file_mode}


def test_checkpoint_files_respect_the_umask(tmp_path, model, umask):
    umask(0o022)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.fc.weight.sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "run", model=model, optimizer=optimizer, scheduler=None, state=TrainState(step=1),
                    config={})
    modes = _modes(tmp_path / "run")
    assert modes == {"latest": 0o644, "step-0000001": 0o755, "step-0000001/draft.safetensors": 0o644,
                     "step-0000001/optimizer.safetensors": 0o644, "step-0000001/rng.safetensors": 0o644,
                     "step-0000001/state.json": 0o644}


@pytest.mark.parametrize("fmt", FORMATS)
def test_eagle31_flags_are_written_false_where_vllm_reads_them(tmp_path, model, target_config, fmt):
    """vLLM's llama_eagle3.py reads ``fc_norm`` and ``norm_output`` from the top level and
    ``norm_before_fc`` from ``eagle_config`` first, then the top level; its speculators
    conversion copies all three from the top level (default False)."""
    export_draft(model, tmp_path, target_config=target_config, format=fmt)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {k: cfg[k] for k in ("norm_before_fc", "fc_norm", "norm_output")} == {
        "norm_before_fc": False, "fc_norm": False, "norm_output": False}
    assert "norm_before_fc" not in cfg.get("eagle_config", {})  # it would override the top-level key
    if fmt == "eagle3":  # what a transformers-based engine sees
        parsed = AutoConfig.from_pretrained(tmp_path)
        assert (parsed.norm_before_fc, parsed.fc_norm, parsed.norm_output) == (False, False, False)


def test_frozen_embeddings_are_left_to_the_engines_and_trained_ones_exported_bit_exact(tmp_path, draft_config):
    frozen = random_draft(draft_config)
    export_draft(frozen, tmp_path / "frozen", dtype=torch.bfloat16)
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "frozen" / "model.safetensors"))

    trained = random_draft(draft_config)
    trained.embed_tokens.weight.requires_grad_(True)
    export_draft(trained, tmp_path / "trained")
    tensors = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert tensors["embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(tensors["embed_tokens.weight"], trained.embed_tokens.weight.detach())


def test_an_export_without_embeddings_takes_them_from_the_target_it_names(tmp_path, model, target_config):
    """As the engines share the target's table, our loader reads it from the target directory
    that config.json names; bit-exact, whatever copy the draft trained with."""
    torch.manual_seed(3)
    target = AutoModelForCausalLM.from_config(tiny_target_config())
    target.save_pretrained(tmp_path / "target")
    export_draft(model, tmp_path / "draft", target_config=target_config, target_model_id=str(tmp_path / "target"))
    loaded = load_exported_draft(tmp_path / "draft")
    assert torch.equal(loaded.embed_tokens.weight, target.get_input_embeddings().weight.detach())
    assert not torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)  # the target's, not the draft's
    export_draft(model, tmp_path / "elsewhere", target_config=target_config, target_model_id="org/not-here")
    with pytest.raises(ValueError, match=r"missing names \['embed_tokens.weight'\].*target_embeddings"):
        load_exported_draft(tmp_path / "elsewhere")
