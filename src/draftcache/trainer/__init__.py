"""EAGLE-3 draft training: the draft model, the training-time-test loss and the engine export."""

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
