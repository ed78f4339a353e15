"""DFlash target side: any set of layers, concatenated in order, no shift."""

from __future__ import annotations

import pytest
import torch
from tiny_targets import HIDDEN, build_model, hook_snapshot, reference_hidden_states

from draftcache.targets import (
    DFlashTargetBatch,
    HFDFlashTargetModel,
    LayerIdError,
    TargetBatchError,
    default_dflash_layer_ids,
)


@pytest.mark.parametrize(
    ("num_target_layers", "num_draft_layers", "expected"),
    [
        (8, 1, [4]),
        (32, 1, [16]),
        (8, 3, [1, 3, 5]),
        (8, 2, [1, 5]),
        (32, 5, [1, 8, 15, 22, 29]),
        (10, 5, [1, 2, 4, 6, 7]),  # 2.5 -> 2 and 5.5 -> 6: Python round, half to even
        (36, 4, [1, 12, 22, 33]),
    ],
)
def test_default_dflash_layer_ids(num_target_layers, num_draft_layers, expected):
    assert default_dflash_layer_ids(num_target_layers, num_draft_layers) == expected


def test_default_dflash_layer_ids_errors():
    with pytest.raises(LayerIdError, match=r"L=4 .* too shallow for 3 DFlash context layers .* got \[1, 1, 1\]"):
        default_dflash_layer_ids(4, 3)
    with pytest.raises(LayerIdError, match=r"num_draft_layers must be a positive int, got 0"):
        default_dflash_layer_ids(8, 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("layer_ids", [[5, 1], [0, 2, 4, 6], [3]])
def test_dflash_capture_matches_hidden_states_unshifted(family, layer_ids, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, loss_mask = padded_inputs
    hooks = hook_snapshot(model)
    target = HFDFlashTargetModel(model, layer_ids)
    batch = target.generate_batch(input_ids, attention_mask, loss_mask)
    assert hook_snapshot(model) == hooks
    hidden, _ = reference_hidden_states(model, input_ids, attention_mask)
    assert batch.hidden_states.shape == (2, 10, len(layer_ids) * HIDDEN)
    assert torch.equal(batch.hidden_states, torch.cat([hidden[i + 1] for i in layer_ids], dim=-1))
    assert torch.equal(batch.input_ids, input_ids)
    assert torch.equal(batch.attention_mask, attention_mask)
    assert torch.equal(batch.loss_mask, loss_mask)
    assert target.target_layer_ids == layer_ids
    assert target.get_input_embeddings() is model.get_input_embeddings()


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([], r"target_layer_ids is empty"),
        ([2, 4, 2], r"must be distinct, got \[2, 4, 2\] \(repeated: \[2\]\)"),
        ([1, 8], r"\[8\] out of range for a target with L=8"),
    ],
)
def test_dflash_layer_id_validation(ids, match):
    with pytest.raises(LayerIdError, match=match):
        HFDFlashTargetModel(build_model("llama"), ids)


def test_dflash_batch_shape_validation():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(
        TargetBatchError, match=r"hidden_states must be \[B, S, ...\] with B, S = 2, 5 .* got shape \(2, 4, 8\)"
    ):
        DFlashTargetBatch(hidden_states=torch.zeros(2, 4, 8), input_ids=ids, attention_mask=ids, loss_mask=ids)
