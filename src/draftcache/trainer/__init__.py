"""Draft training, one package per draft family over shared pieces.

``eagle3/`` (chain drafts: model, training-time test, loop, export, decoding) and ``dflash/`` (block
drafts) use the shared modules here: ``layers`` (norms, RoPE, MLP, packed-document layout),
``optim`` (optimizer step, accumulation), ``checkpoint``, ``distributed``, ``batching`` and
``speculative`` (counters, greedy baseline). ``evaluate``, ``vllm_eval`` and ``exporting`` serve
every family; no family imports another."""

from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.export import export_dflash_draft, load_exported_dflash_draft
from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors
from draftcache.trainer.dflash.model import DFlashDraftModel
from draftcache.trainer.dflash.speculative import dflash_speculative_generate
from draftcache.trainer.eagle3.export import EXPORT_FORMATS, export_draft, load_exported_draft
from draftcache.trainer.eagle3.model import (
    Eagle3DraftConfig,
    Eagle3DraftModel,
    Eagle3KVCache,
    Eagle3Output,
    build_attention_mask,
)
from draftcache.trainer.layers import document_layout, rope_inverse_frequencies
from draftcache.trainer.eagle3.ttt import TTTOutput, simulated_acceptance_length, ttt_forward

__all__ = [
    "DFlashDraftConfig",
    "DFlashDraftModel",
    "dflash_loss",
    "dflash_speculative_generate",
    "export_dflash_draft",
    "load_exported_dflash_draft",
    "sample_anchors",
    "EXPORT_FORMATS",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3KVCache",
    "Eagle3Output",
    "TTTOutput",
    "build_attention_mask",
    "document_layout",
    "export_draft",
    "load_exported_draft",
    "rope_inverse_frequencies",
    "simulated_acceptance_length",
    "ttt_forward",
]
