"""Wire the components for one precompute run: data first (cheap checks), then the target."""

from __future__ import annotations

from draftcache.data import load_conversations
from draftcache.precompute.config import PrecomputeConfig
from draftcache.target.loading import load_target_model, load_tokenizer, resolve_device
from draftcache.precompute.pipeline import PrecomputeError, PrecomputeSummary, check_output_dir, run_precompute
from draftcache.target import HFEagle3TargetModel

__all__ = ["precompute_from_config", "PrecomputeError"]


def precompute_from_config(cfg: PrecomputeConfig, *, log=print) -> PrecomputeSummary:
    from draftcache.defaults import default_data_path, default_target_path

    cfg.validate()
    check_output_dir(cfg.output_dir, cfg.resume)
    device = resolve_device(cfg.device)
    target_path = cfg.target_model or default_target_path()
    data_path = cfg.input_data or default_data_path()
    conversations = load_conversations(data_path, split=cfg.split, strict=cfg.strict, shuffle_seed=cfg.shuffle_seed,
                                       num_samples=cfg.num_samples, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(target_path, trust_remote_code=cfg.trust_remote_code)
    model = load_target_model(target_path, device=device, trust_remote_code=cfg.trust_remote_code)
    aux = list(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else None
    target = HFEagle3TargetModel(model, aux_layer_ids=aux)
    model_id = cfg.target_model or "draftcache/embedded-default-target"
    return run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, model_id=model_id,
                          log=log)
