"""Draft training: EAGLE-3 (draft model, training-time-test loss, engine export) and DFlash (block draft,
anchor-block loss, vLLM export, block speculative decoding)."""

from draftcache.trainer.dflash_config import DFlashDraftConfig
from draftcache.trainer.dflash_export import export_dflash_draft, load_exported_dflash_draft
from draftcache.trainer.dflash_loss import dflash_loss, sample_anchors
from draftcache.trainer.dflash_model import DFlashDraftModel
from draftcache.trainer.dflash_speculative import dflash_speculative_generate
from draftcache.trainer.export import EXPORT_FORMATS, export_draft, load_exported_draft
from draftcache.trainer.model import (
    Eagle3DraftConfig,
    Eagle3DraftModel,
    Eagle3KVCache,
    Eagle3Output,
    build_attention_mask,
    document_layout,
)
from draftcache.trainer.layers import rope_inverse_frequencies
from draftcache.trainer.ttt import TTTOutput, simulated_acceptance_length, ttt_forward

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
