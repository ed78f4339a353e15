"""TargetRunner protocol: the HF-backed runner gives bit-identical batches to the co-located backend."""

from __future__ import annotations

import pytest
import torch
from tiny_targets import LAYERS, build_model

from draftcache.target import (
    HFEagle3TargetModel,
    HFTargetRunner,
    LayerIdError,
    RunnerEagle3TargetModel,
    RunnerError,
    TargetRunner,
)

_FIELDS = ("aux_hidden_states", "input_ids", "attention_mask", "loss_mask", "logits")


@pytest.mark.parametrize("family", ["llama", "mistral", "llava"])
@pytest.mark.parametrize("aux_layer_ids", [None, [2, 5, 0]])
def test_runner_batch_is_bit_identical_to_hf_backend(family, aux_layer_ids, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, loss_mask = padded_inputs
    runner = HFTargetRunner(model)
    assert isinstance(runner, TargetRunner)
    via_runner = RunnerEagle3TargetModel(runner, aux_layer_ids=aux_layer_ids)
    direct = HFEagle3TargetModel(model, aux_layer_ids=aux_layer_ids)
    assert via_runner.aux_layer_ids == direct.aux_layer_ids
    assert via_runner.num_layers == LAYERS

    a = via_runner.generate_batch(input_ids, attention_mask, loss_mask)
    b = direct.generate_batch(input_ids, attention_mask, loss_mask)
    for name in _FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert via_runner.get_input_embeddings().weight is model.get_input_embeddings().weight


def test_runner_forward_is_unshifted(padded_inputs):
    model = build_model("llama")
    input_ids, attention_mask, _ = padded_inputs
    runner = HFTargetRunner(model)
    runner.set_aux_layers([1, 3, 4])
    logits, aux = runner.forward_eagle3(input_ids, attention_mask)
    raw = HFEagle3TargetModel(model).forward_capture(input_ids, attention_mask)
    assert torch.equal(logits, raw.logits)
    assert torch.equal(aux, raw.aux_hidden_states)
    assert torch.equal(runner.input_embedding_weight(), model.get_input_embeddings().weight)


def test_runner_rejects_packing(padded_inputs):
    input_ids, attention_mask, loss_mask = padded_inputs
    target = RunnerEagle3TargetModel(HFTargetRunner(build_model("llama")))
    with pytest.raises(ValueError, match=r"does not support packed rows \(got seq_lens\)"):
        target.generate_batch(input_ids, attention_mask, loss_mask, seq_lens=torch.tensor([[10], [7]]))
    with pytest.raises(ValueError, match=r"packed rows \(got position_ids, doc_remaining\)"):
        target.generate_batch(
            input_ids, attention_mask, loss_mask, position_ids=torch.zeros_like(input_ids), doc_remaining=loss_mask
        )


def test_runner_order_and_close(padded_inputs):
    input_ids, attention_mask, _ = padded_inputs
    runner = HFTargetRunner(build_model("llama"))
    with pytest.raises(RunnerError, match=r"call set_aux_layers\(ids\) before forward_eagle3"):
        runner.forward_eagle3(input_ids, attention_mask)
    target = RunnerEagle3TargetModel(runner)
    target.close()
    assert runner.model is None
    with pytest.raises(RunnerError, match="HFTargetRunner is closed"):
        runner.forward_eagle3(input_ids, attention_mask)


def test_runner_validation():
    model = build_model("llama")
    with pytest.raises(LayerIdError, match=r"\[9\] out of range for a target with L=8"):
        RunnerEagle3TargetModel(HFTargetRunner(model), aux_layer_ids=[1, 2, 9])
    with pytest.raises(LayerIdError, match=r"L=4 .* too shallow"):
        RunnerEagle3TargetModel(HFTargetRunner(build_model("llama", num_layers=4)))
    with pytest.raises(TypeError, match=r"Module does not implement TargetRunner"):
        RunnerEagle3TargetModel(torch.nn.Module())
