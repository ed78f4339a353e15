"""Eagle3TargetBatch validation and trainer inputs; default EAGLE-3 aux layer ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from draftcache.targets import (
    Eagle3TargetBatch,
    LayerIdError,
    TargetBatchError,
    compute_target_distribution,
    default_eagle3_aux_layer_ids,
)

B, S, H, V, VD = 2, 6, 4, 16, 5


def _base(**overrides):
    fields = dict(
        aux_hidden_states=torch.zeros(B, S, 3 * H),
        input_ids=torch.zeros(B, S, dtype=torch.long),
        attention_mask=torch.ones(B, S, dtype=torch.long),
        loss_mask=torch.ones(B, S, dtype=torch.long),
    )
    fields.update(overrides)
    return fields


def _probs_encoding():
    torch.manual_seed(0)
    logits = torch.randn(B, S, V)
    selected = torch.tensor([0, 3, 5, 8, 13])
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[selected] = True
    target_probs, position_mask = compute_target_distribution(logits, torch.ones(B, S), selected, t2d)
    return target_probs, position_mask


def test_logits_encoding_trainer_inputs():
    batch = Eagle3TargetBatch(**_base(logits=torch.zeros(B, S, V)))
    inputs = batch.to_trainer_inputs()
    assert list(inputs) == ["input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "logits"]
    assert inputs["logits"] is batch.logits


def test_probs_encoding_with_packing_trainer_inputs():
    target_probs, position_mask = _probs_encoding()
    batch = Eagle3TargetBatch(
        **_base(
            target_probs=target_probs,
            position_mask=position_mask,
            position_ids=torch.zeros(B, S, dtype=torch.long),
            seq_lens=torch.tensor([[6, 0], [3, 3]]),
            doc_remaining=torch.zeros(B, S, dtype=torch.long),
        )
    )
    inputs = batch.to_trainer_inputs()
    assert list(inputs) == [
        "input_ids",
        "attention_mask",
        "loss_mask",
        "aux_hidden_states",
        "target_probs",
        "position_mask",
        "position_ids",
        "seq_lens",
        "doc_remaining",
    ]
    assert inputs["position_mask"].shape == (B, S, 1)


def test_encoding_errors():
    target_probs, position_mask = _probs_encoding()
    with pytest.raises(TargetBatchError, match=r"carries no supervision; pass logits \[B, S, V\] or target_probs"):
        Eagle3TargetBatch(**_base())
    with pytest.raises(TargetBatchError, match=r"two supervision encodings \(logits and target_probs\+position_mask\)"):
        Eagle3TargetBatch(**_base(logits=torch.zeros(B, S, V), target_probs=target_probs, position_mask=position_mask))
    with pytest.raises(TargetBatchError, match=r"got target_probs without position_mask"):
        Eagle3TargetBatch(**_base(target_probs=target_probs))
    with pytest.raises(TargetBatchError, match=r"got position_mask without target_probs"):
        Eagle3TargetBatch(**_base(position_mask=position_mask))
    with pytest.raises(TargetBatchError, match=r"got position_mask without target_probs"):
        Eagle3TargetBatch(**_base(logits=torch.zeros(B, S, V), position_mask=position_mask))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (
            "aux_hidden_states",
            torch.zeros(B, S + 1, 3 * H),
            r"aux_hidden_states must be \[B, S, ...\] with B, S = 2, 6 .* got shape \(2, 7, 12\)",
        ),
        ("aux_hidden_states", torch.zeros(B, S, 10), r"aux_hidden_states must be \[B, S, 3H\] .* last dim 10"),
        (
            "attention_mask",
            torch.ones(B + 1, S),
            r"attention_mask must be \[B, S\] with B, S = 2, 6 .* got shape \(3, 6\)",
        ),
        ("loss_mask", torch.ones(B, S, 1), r"loss_mask must be \[B, S\] .* got shape \(2, 6, 1\)"),
        ("logits", torch.zeros(B, S - 1, V), r"logits must be \[B, S, ...\] .* got shape \(2, 5, 16\)"),
        ("position_ids", torch.zeros(B, S + 2), r"position_ids must be \[B, S\] .* got shape \(2, 8\)"),
        ("doc_remaining", torch.zeros(1, S), r"doc_remaining must be \[B, S\] .* got shape \(1, 6\)"),
        ("seq_lens", torch.zeros(3, 2), r"seq_lens must be \[B, max_docs\] with B = 2, got shape \(3, 2\)"),
        ("input_ids", torch.zeros(B, S, 1), r"input_ids must be \[B, S\], got shape \(2, 6, 1\)"),
    ],
)
def test_shape_errors_with_logits(field, value, match):
    fields = _base(logits=torch.zeros(B, S, V))
    fields[field] = value
    with pytest.raises(TargetBatchError, match=match):
        Eagle3TargetBatch(**fields)


def test_shape_errors_with_probs():
    target_probs, position_mask = _probs_encoding()
    with pytest.raises(
        TargetBatchError, match=r"position_mask must be \[B, S, 1\] = \[2, 6, 1\], got shape \(2, 6, 2\)"
    ):
        Eagle3TargetBatch(**_base(target_probs=target_probs, position_mask=position_mask.expand(B, S, 2)))
    with pytest.raises(TargetBatchError, match=r"position_mask must be \[B, S, ...\] .* got shape \(2, 6\)"):
        Eagle3TargetBatch(**_base(target_probs=target_probs, position_mask=position_mask[..., 0]))
    with pytest.raises(TargetBatchError, match=r"target_probs must be \[B, S, ...\] .* got shape \(2, 3, 5\)"):
        Eagle3TargetBatch(**_base(target_probs=target_probs[:, :3], position_mask=position_mask))


@pytest.mark.parametrize(
    ("num_layers", "expected"), [(32, [1, 15, 28]), (8, [1, 3, 4]), (28, [1, 13, 24]), (6, [1, 2, 2])]
)
def test_default_eagle3_aux_layer_ids(num_layers, expected):
    if len(set(expected)) < 3:
        with pytest.raises(
            LayerIdError, match=rf"L={num_layers} .* too shallow .* {expected}".replace("[", r"\[").replace("]", r"\]")
        ):
            default_eagle3_aux_layer_ids(num_layers)
    else:
        assert default_eagle3_aux_layer_ids(num_layers) == expected


def test_too_shallow_out_of_range():
    with pytest.raises(LayerIdError, match=r"L=3 .* \[1, 0, -1\] \(ids \[-1\] are outside \[0, 3\)\)"):
        default_eagle3_aux_layer_ids(3)


def test_import_pulls_no_engine_or_transformers():
    code = (
        "import sys, draftcache.targets; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'sglang', 'vllm', 'transformers'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
