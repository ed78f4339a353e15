"""Export an EAGLE-3 draft as a HF-style directory that SGLang and vLLM load without edits.

Two formats, each ``config.json`` + ``model.safetensors``:

``eagle3`` (default; SGLang and vLLM)
    ``architectures: ["LlamaForCausalLMEagle3"]`` (SGLang's class; vLLM's registry maps it to
    ``Eagle3LlamaForCausalLM``). Weights are the draft's own state_dict names: ``midlayer.*``,
    ``fc.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d`` and, only when the draft
    trained its own, ``embed_tokens.weight``, with no ``model.`` prefix. SGLang prefixes ``model.`` to names
    that are not already parameters and silently skips what it does not know; vLLM prefixes
    ``model.`` (except ``lm_head``), renames ``midlayer.`` -> ``layers.0.`` and
    ``d2t`` -> ``draft_id_to_target_id``, skips ``t2d`` and raises on unknown names. Both
    fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` on load.

``speculators`` (vLLM's speculators format, also loadable by the ``speculators`` library)
    ``speculators_model_type: "eagle3"``, ``architectures: ["Eagle3Speculator"]``, a
    ``transformer_layer_config`` (the Llama layer), ``speculators_config`` (algorithm,
    proposal methods, verifier). The decoder layer is saved as ``layers.0.*`` (the
    speculators library's name; vLLM maps both spellings onto its ``layers.0``). vLLM
    defaults an absent ``norm_before_residual`` to True for this format, so it is always
    written.

Aux-layer ids: the two engines read different keys with different conventions (as read in
their sources):

* SGLang reads ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` and adds 1 before
  capturing ("the ith layer takes the output of the (i-1)th layer"), so that key holds
  *decoder-layer output* ids: ours, unchanged.
* vLLM (and speculators) read the top-level ``eagle_aux_hidden_state_layer_ids`` and capture
  the *input* of that layer (``hidden_states + residual`` before running it), so that key
  holds our ids + 1.

Both keys are written; ``draftcache.aux_layer_ids`` records ours and the convention.

Embeddings: a frozen ``embed_tokens`` is the target's table, but the copy a draft trained from a
cache holds is the cache's (rounded to its storage dtype), so it is left out: vLLM then logs
"Detected EAGLE model without its own embed_tokens in the checkpoint. Sharing target model
embedding weights with the draft model" and serves the target's exact table (SGLang likewise sets
the target's embedding into the draft), as :func:`load_exported_draft` does here.

Variants (vLLM's names, as ``llama_eagle3.py`` reads them): ``norm_before_fc`` (``input_norm.weight``
over the concatenated aux vector), ``fc_norm`` (``fc_norm.{i}.weight``, one per aux chunk) and
``norm_output`` (the next step reads the post-norm hidden) are written at the top level with the
draft's values (never inside ``eagle_config``, whose ``norm_before_fc`` would take precedence);
``attention_bias`` (q/k/v/o ``.bias`` tensors) and ``num_hidden_layers`` sit in the layer fields;
decoder layers after the first are saved as ``layers.{i}.*`` in both formats (vLLM's own names;
``midlayer.`` would map onto ``layers.0.``). The speculators format also writes the three flags into
``transformer_layer_config``, which vLLM's ``peagle`` conversion reads them from.

P-EAGLE (parallel drafting): ``mask_hidden [1, num_aux * H_t]`` (vLLM copies it into its buffer and
passes it through the aux norms and ``fc``), ``mask_token_id`` at the top level (vLLM's proposer reads
it there; the speculators ``peagle`` type maps it to ``pard_token``) and ``parallel_drafting: true``
(recorded for our loader; vLLM is told by ``speculative_config={"method": "eagle3",
"parallel_drafting": true}``, or by ``speculators_model_type: "peagle"`` in the speculators format).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from draftcache.cache_format.checksum import atomic_write_bytes
from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "export_draft",
    "is_peagle_export",
    "load_exported_draft",
    "read_export_config",
]

EXPORT_FORMATS = ("eagle3", "speculators")
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
AUX_LAYER_CONVENTION = "decoder-layer output (HF hidden_states[i + 1]); engines' capture id = i + 1"

_LAYER_PREFIX = {"eagle3": "midlayer.", "speculators": "layers.0."}
#: EAGLE-3.1 flags vLLM reads at the top level of config.json
EAGLE31_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")
EMBEDDED_TARGET_ID = "draftcache/embedded-default-target"  # what manifests name the embedded default target
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _resolve_target(config: Eagle3DraftConfig, target_config: Any | None) -> tuple[int, float, dict | None, list[str]]:
    """``(max_position_embeddings, rope_theta, rope_scaling, verifier_architectures)``, taken
    from the target when given (after checking the draft was built for it)."""
    if target_config is None:
        return config.max_position_embeddings, config.rope_theta, config.rope_scaling, []
    try:
        expected = Eagle3DraftConfig.from_target_config(
            target_config,
            draft_vocab_size=config.draft_vocab_size,
            aux_layer_ids=config.aux_layer_ids,
            norm_before_residual=config.norm_before_residual,
            **config.variant_fields,
        )
    except ValueError as err:
        raise ValueError(f"draft does not match target_config: {err}") from None
    problems = [
        f"{name}: draft has {getattr(config, name)!r}, target gives {getattr(expected, name)!r}"
        for name in ("target_hidden_size", "target_vocab_size", "rope_theta", "rope_scaling")
        if getattr(config, name) != getattr(expected, name)
    ]
    if problems:
        raise ValueError(
            "draft does not match target_config (" + "; ".join(problems) + "); build the draft config with "
            "Eagle3DraftConfig.from_target_config"
        )
    if isinstance(target_config, Mapping):
        architectures = list(target_config.get("architectures") or [])
    else:
        architectures = list(getattr(target_config, "architectures", None) or [])
    return expected.max_position_embeddings, expected.rope_theta, expected.rope_scaling, architectures


def _layer_config(config: Eagle3DraftConfig, max_pos: int, theta: float, scaling: dict | None) -> dict[str, Any]:
    """The Llama fields every engine reads for the draft's decoder layer."""
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.target_vocab_size,
        "max_position_embeddings": max_pos,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }


def _export_config(
    config: Eagle3DraftConfig,
    *,
    format: str,
    target_config: Any | None,
    target_model_id: str | None,
    dtype: torch.dtype,
    num_speculative_tokens: int,
) -> dict[str, Any]:
    max_pos, theta, scaling, verifier_archs = _resolve_target(config, target_config)
    engine_ids = [i + 1 for i in config.aux_layer_ids]  # vLLM / speculators: input of layer i+1
    meta = {
        "format": format,
        "format_version": EXPORT_FORMAT_VERSION,
        "aux_layer_ids": list(config.aux_layer_ids),
        "aux_layer_convention": AUX_LAYER_CONVENTION,
        "target_model": target_model_id,
    }
    layer = _layer_config(config, max_pos, theta, scaling)
    flags = {name: bool(getattr(config, name)) for name in EAGLE31_FLAGS}
    parallel = {"parallel_drafting": True, "mask_token_id": config.mask_token_id} if config.parallel_drafting else {}
    if format == "eagle3":
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            **layer,
            "draft_vocab_size": config.draft_vocab_size,
            "target_hidden_size": config.target_hidden_size,
            "norm_before_residual": config.norm_before_residual,
            **flags,
            **parallel,
            "torch_dtype": _DTYPE_NAMES[dtype],
            "eagle_config": {
                # SGLang adds 1 to these before capturing: decoder-layer output ids (ours)
                "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
                "use_aux_hidden_state": True,
                "aux_layer_convention": "layer_output",
            },
            # vLLM reads this top-level key as-is: capture the input of layer id
            "eagle_aux_hidden_state_layer_ids": engine_ids,
            "draftcache": meta,
        }
    algorithm = "peagle" if config.parallel_drafting else "eagle3"
    return {
        "architectures": ["PeagleLlamaForCausalLM" if config.parallel_drafting else "Eagle3Speculator"],
        "speculators_model_type": algorithm,
        "transformer_layer_config": {**layer, **flags},
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "norm_before_residual": config.norm_before_residual,
        **flags,
        **parallel,
        "eagle_aux_hidden_state_layer_ids": engine_ids,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "speculators_config": {
            "algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target_model_id, "architectures": verifier_archs},
        },
        "draftcache": meta,
    }


def _export_tensors(model: Eagle3DraftModel, *, format: str, dtype: torch.dtype,
                    include_embeddings: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "embed_tokens.weight" and not include_embeddings:
            continue
        if name.startswith("midlayer."):
            name = _LAYER_PREFIX[format] + name[len("midlayer."):]
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().clone()  # safetensors refuses shared storage
    return tensors


def export_draft(
    model: Eagle3DraftModel,
    output_dir: str | os.PathLike[str],
    *,
    target_config: Any | None = None,
    target_model_id: str | None = None,
    format: str = "eagle3",
    dtype: torch.dtype | None = None,
    include_embeddings: bool | None = None,
    num_speculative_tokens: int = 3,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for SGLang/vLLM into ``output_dir``.

    Args:
        model: the trained draft.
        output_dir: created if missing; only the two files are (atomically) replaced.
        target_config: the target's HF config (object or ``to_dict()`` form); when given,
            ``max_position_embeddings`` and RoPE are taken from it (after checking the draft
            was built for it) and its ``architectures`` fill the speculators verifier entry.
        target_model_id: hub id or path of the target (speculators ``verifier.name_or_path``;
            vLLM serves that model when given only the speculator).
        format: ``"eagle3"`` (SGLang + vLLM) or ``"speculators"`` (vLLM / speculators).
        dtype: weight dtype (float32, float16, bfloat16); default the model's.
        include_embeddings: save ``embed_tokens.weight``. Default: only when the draft trained
            it (``requires_grad``); a frozen table is the target's, which the engines then share
            bit-exact (the draft's own copy may be a cache's rounded one).
        num_speculative_tokens: ``speculators_config.proposal_methods[0].speculative_tokens``.

    Returns:
        The output directory.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {EXPORT_FORMATS}")
    dtype = dtype or model.fc.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"export dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if format == "eagle3" and model.config.norm_before_residual:
        warnings.warn(
            "norm_before_residual=True is written to config.json, but SGLang's LlamaForCausalLMEagle3 (as read) "
            "always takes the residual before hidden_norm; serve this draft with vLLM or check your SGLang version",
            stacklevel=2,
        )
    config = _export_config(model.config, format=format, target_config=target_config,
                            target_model_id=target_model_id, dtype=dtype,
                            num_speculative_tokens=num_speculative_tokens)
    if include_embeddings is None:
        include_embeddings = bool(model.embed_tokens.weight.requires_grad)
    tensors = _export_tensors(model, format=format, dtype=dtype, include_embeddings=include_embeddings)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # each file: temporary -> fsync -> rename -> fsync dir, created with the umask's mode
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------------
# Load (our own loader: safetensors only, both formats)
# --------------------------------------------------------------------------------------------


def _rope_from_fields(fields_: Mapping[str, Any]) -> tuple[float, dict | None]:
    params = fields_.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        params = dict(params)
        theta = params.pop("rope_theta", fields_.get("rope_theta"))
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), (params if kind != "default" else None)
    if fields_.get("rope_theta") is None:
        raise ValueError("exported config has no rope_theta; it cannot be loaded faithfully")
    return float(fields_["rope_theta"]), fields_.get("rope_scaling")


def _draft_config_from_export(data: Mapping[str, Any]) -> Eagle3DraftConfig:
    """Rebuild the draft config from the engine-facing fields of an exported config.json."""
    is_speculators = "speculators_model_type" in data
    if is_speculators and data["speculators_model_type"] not in ("eagle3", "peagle"):
        raise ValueError(f"speculators_model_type is {data['speculators_model_type']!r}; "
                         "only 'eagle3' and 'peagle' are supported")
    layer = data["transformer_layer_config"] if is_speculators else data
    if is_speculators or "eagle_config" not in data:
        engine_ids = data.get("eagle_aux_hidden_state_layer_ids")
        ids = None if engine_ids is None else [int(i) - 1 for i in engine_ids]
    else:
        ids = [int(i) for i in data["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    recorded = (data.get("draftcache") or {}).get("aux_layer_ids")
    if ids is None:
        ids = recorded
    if ids is None:
        raise ValueError("exported config names no aux layer ids (eagle_config or eagle_aux_hidden_state_layer_ids)")
    if recorded is not None and list(recorded) != ids:
        raise ValueError(f"config.json aux-layer ids disagree: engine keys give {ids}, draftcache records {recorded}")
    required = ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps",
                "max_position_embeddings", "vocab_size")
    missing = [name for name in required if layer.get(name) is None]
    missing += [name for name in ("draft_vocab_size",) if data.get(name) is None]
    if missing:
        raise ValueError(f"exported config.json lacks {missing}")
    theta, scaling = _rope_from_fields(layer)
    heads = int(layer["num_attention_heads"])
    # as vLLM reads them: eagle_config's norm_before_fc first, the top level (then the layer fields) after
    flags = {name: bool(data.get(name, layer.get(name, False))) for name in EAGLE31_FLAGS}
    if "norm_before_fc" in (data.get("eagle_config") or {}):
        flags["norm_before_fc"] = bool(data["eagle_config"]["norm_before_fc"])
    parallel = bool(data.get("parallel_drafting", False)) or data.get("speculators_model_type") == "peagle"
    mask_token_id = data.get("mask_token_id")
    if parallel and mask_token_id is None:
        raise ValueError("exported config.json is a parallel-drafting (P-EAGLE) draft without mask_token_id")
    return Eagle3DraftConfig(
        hidden_size=int(layer["hidden_size"]),
        intermediate_size=int(layer["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or int(layer["hidden_size"]) // heads),
        rms_norm_eps=float(layer["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(layer["max_position_embeddings"]),
        target_hidden_size=int(data.get("target_hidden_size") or layer["hidden_size"]),
        target_vocab_size=int(layer["vocab_size"]),
        draft_vocab_size=int(data["draft_vocab_size"]),
        aux_layer_ids=ids,
        num_aux_layers=len(ids),
        hidden_act=str(layer.get("hidden_act", "silu")),
        # vLLM's default for a speculators config without the key is True
        norm_before_residual=bool(data.get("norm_before_residual", is_speculators)),
        **flags,
        attention_bias=bool(layer.get("attention_bias", False)),
        num_hidden_layers=int(layer.get("num_hidden_layers") or 1),
        parallel_drafting=parallel,
        mask_token_id=None if mask_token_id is None else int(mask_token_id),
    )


def _named_target_embeddings(model_id: str | None) -> torch.Tensor | None:
    """The input embeddings ``[V, H]`` (float32) of the target an export names, when that target
    is here without a download: a local directory or the embedded default. Else None."""
    if model_id == EMBEDDED_TARGET_ID:
        from draftcache.defaults import default_target_path

        model_id = default_target_path()
    if not model_id or not (Path(model_id) / "config.json").is_file():
        return None
    from draftcache.targets.loading import load_target_model

    model = load_target_model(model_id, device=torch.device("cpu"))
    return model.get_input_embeddings().weight.detach().float()


def read_export_config(path: str | os.PathLike[str]) -> Eagle3DraftConfig:
    """The draft config ``path/config.json`` describes, read as the engines read its fields."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; expected a directory written by export_draft")
    return _draft_config_from_export(json.loads(config_path.read_text(encoding="utf-8")))


def is_peagle_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path/config.json`` is a P-EAGLE (parallel drafting) export of either format."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    data = json.loads(config_path.read_text(encoding="utf-8"))
    return bool(data.get("parallel_drafting", False)) or data.get("speculators_model_type") == "peagle"


def load_exported_draft(
    path: str | os.PathLike[str],
    *,
    target_embeddings: torch.Tensor | None = None,
    freeze_embeddings: bool = True,
) -> Eagle3DraftModel:
    """Load a directory written by :func:`export_draft` (either format) as a float32 draft.

    ``embed_tokens`` comes from the export when it has one, else from ``target_embeddings [V, H]``,
    else from the target ``config.json`` names (a local directory or the embedded default), as
    the engines share it. Names that are not draft parameters (e.g. a ``model.layers.0.*``
    checkpoint) and missing parameters raise, naming them.
    """
    root = Path(path)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found; expected a directory written by export_draft")
    data = json.loads(config_path.read_text(encoding="utf-8"))
    config = _draft_config_from_export(data)
    model = Eagle3DraftModel(config, freeze_embeddings=freeze_embeddings)

    state: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(weights_path)).items():
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        state[name] = tensor
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if "embed_tokens.weight" in missing and target_embeddings is None:
        target_embeddings = _named_target_embeddings((data.get("draftcache") or {}).get("target_model"))
    if "embed_tokens.weight" in missing and target_embeddings is not None:
        missing.remove("embed_tokens.weight")
        state["embed_tokens.weight"] = target_embeddings
    if unknown or missing:
        raise ValueError(
            f"{weights_path} does not hold an EAGLE-3 draft in the exported layout: unknown names {unknown}, "
            f"missing names {missing} (expected midlayer.*/layers.0.*, layers.{{i}}.* for later layers, fc, "
            "input_norm/fc_norm.{i} and mask_hidden as config.json asks, norm, lm_head, d2t, t2d without a "
            "'model.' prefix; pass target_embeddings if embed_tokens.weight was not exported and the target "
            "config.json names is not a local directory)"
        )
    wrong = [f"{name}: {tuple(t.shape)} != {tuple(expected[name].shape)}"
             for name, t in state.items() if tuple(t.shape) != tuple(expected[name].shape)]
    if wrong:
        raise ValueError(f"{weights_path} tensor shapes do not match config.json: {wrong}")
    model.load_state_dict(state, strict=True)
    return model
