"""Capture supervision from a frozen target LM: EAGLE-3 aux states + logits, DFlash context features.

Importing this package imports neither SGLang, vLLM nor transformers; it works on any
``nn.Module`` with a Hugging Face causal-LM layout.
"""

from .batch import Eagle3TargetBatch, TargetBatchError
from .capture import CaptureError, TargetForward
from .dflash import DFlashTargetBatch, HFDFlashTargetModel
from .eagle3 import HFEagle3TargetModel
from .layer_ids import (
    LayerIdError,
    default_dflash_layer_ids,
    default_eagle3_aux_layer_ids,
    validate_dflash_layer_ids,
    validate_eagle3_aux_layer_ids,
)
from .layout import TargetLayoutError, find_decoder_layers, num_hidden_layers
from .packing import PackingError, block_causal_mask, packed_position_ids
from .runner import HFTargetRunner, RunnerEagle3TargetModel, RunnerError, TargetRunner
from .supervision import compute_target_distribution, shift_left_with_zero

__all__ = [
    "Eagle3TargetBatch",
    "TargetForward",
    "HFEagle3TargetModel",
    "TargetRunner",
    "RunnerEagle3TargetModel",
    "HFTargetRunner",
    "DFlashTargetBatch",
    "HFDFlashTargetModel",
    "default_eagle3_aux_layer_ids",
    "default_dflash_layer_ids",
    "validate_eagle3_aux_layer_ids",
    "validate_dflash_layer_ids",
    "find_decoder_layers",
    "num_hidden_layers",
    "block_causal_mask",
    "packed_position_ids",
    "shift_left_with_zero",
    "compute_target_distribution",
    "TargetBatchError",
    "CaptureError",
    "LayerIdError",
    "TargetLayoutError",
    "PackingError",
    "RunnerError",
]
