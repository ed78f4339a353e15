"""Build the supervision source a ``TrainConfig`` names: a cache, or an online co-located target."""

from __future__ import annotations

import torch

from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.trainer.eagle3.sources import CachedSource, OnlineSource

__all__ = ["build_source"]


def build_source(cfg: TrainConfig, device: torch.device):
    if cfg.cached_target_path is not None:
        return CachedSource(cfg.cached_target_path, draft_vocab_size=cfg.draft_vocab_size,
                            num_workers=cfg.num_workers)
    from draftcache.data import ChatTokenizer, load_conversations, set_chat_template, tokenize_all
    from draftcache.defaults import default_data_path, default_target_path
    from draftcache.targets import HFEagle3TargetModel
    from draftcache.targets.loading import load_target_model, load_tokenizer

    target_path = cfg.target_model or default_target_path()
    conversations = load_conversations(cfg.input_data or default_data_path(), trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(target_path, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
    set_chat_template(tokenizer, cfg.chat_template)
    # before the model loads: a template that fails on everything is found cheaply
    samples = tokenize_all(conversations, ChatTokenizer(tokenizer, cfg.seq_length), conversations.skipped,
                           strict=False, progress=False)
    model = load_target_model(target_path, device=device, trust_remote_code=cfg.trust_remote_code)
    target = HFEagle3TargetModel(model, aux_layer_ids=list(cfg.aux_layer_ids) if cfg.aux_layer_ids else None)
    return OnlineSource(target=target, tokenizer=tokenizer, samples=samples,
                        model_id=cfg.target_model or "draftcache/embedded-default-target",
                        draft_vocab_size=cfg.draft_vocab_size, num_workers=cfg.num_workers)
