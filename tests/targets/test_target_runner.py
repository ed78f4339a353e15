"""TargetRunner protocol: the HF-backed runner's outputs against Hugging Face's own
``output_hidden_states`` and logits (aux id ``i`` = ``hidden_states[i + 1]``), shifted as EAGLE-3 wants."""

from __future__ import annotations

import pytest
import torch
from tiny_targets import LAYERS, build_model, reference_hidden_states

from draftcache.targets import (
    HFEagle3TargetModel,
    HFTargetRunner,
    LayerIdError,
    RunnerEagle3TargetModel,
    RunnerError,
    TargetRunner,
)


def _expected_aux(hidden_states, ids) -> torch.Tensor:
    """``[B, S, 3H]``: HF's ``hidden_states[i + 1]`` of each id (valid for ids below L - 1)."""
    return torch.cat([hidden_states[i + 1] for i in ids], dim=-1)


@pytest.mark.parametrize("family", ["llama", "mistral", "llava"])
@pytest.mark.parametrize("aux_layer_ids", [None, [2, 5, 0]])
def test_runner_batch_matches_hf_hidden_states_and_logits(family, aux_layer_ids, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, loss_mask = padded_inputs
    runner = HFTargetRunner(model)
    assert isinstance(runner, TargetRunner)
    target = RunnerEagle3TargetModel(runner, aux_layer_ids=aux_layer_ids)
    ids = [1, LAYERS // 2 - 1, LAYERS - 4] if aux_layer_ids is None else aux_layer_ids
    assert target.aux_layer_ids == ids and target.num_layers == LAYERS
    hidden_states, logits = reference_hidden_states(model, input_ids, attention_mask)
    assert len(hidden_states) == LAYERS + 1

    batch = target.generate_batch(input_ids, attention_mask, loss_mask)
    real = attention_mask.bool()
    # aux states are position-aligned (not shifted)
    torch.testing.assert_close(batch.aux_hidden_states[real], _expected_aux(hidden_states, ids)[real],
                               rtol=1e-6, atol=1e-6)
    # logits, tokens and loss mask move left by one: slot t holds position t + 1's, the last slot zeros
    torch.testing.assert_close(batch.logits[:, :-1][real[:, 1:]], logits[:, 1:][real[:, 1:]], rtol=1e-6, atol=1e-6)
    assert not batch.logits[:, -1].any()
    assert torch.equal(batch.input_ids[:, :-1], input_ids[:, 1:]) and not batch.input_ids[:, -1].any()
    assert torch.equal(batch.loss_mask[:, :-1], loss_mask[:, 1:]) and not batch.loss_mask[:, -1].any()
    assert torch.equal(batch.attention_mask, attention_mask)
    assert target.get_input_embeddings().weight is model.get_input_embeddings().weight


def test_runner_forward_is_unshifted_and_the_last_layer_is_taken_before_the_final_norm(padded_inputs):
    """Id L - 1 is the last decoder layer's raw output; HF's ``hidden_states[L]`` is that after the
    final norm, so the two differ and ``norm(aux)`` equals it."""
    model = build_model("llama")
    input_ids, attention_mask, _ = padded_inputs
    runner = HFTargetRunner(model)
    ids = [1, 3, LAYERS - 1]
    runner.set_aux_layers(ids)
    logits, aux = runner.forward_eagle3(input_ids, attention_mask)
    hidden_states, ref_logits = reference_hidden_states(model, input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-6, atol=1e-6)
    width = hidden_states[0].size(-1)
    torch.testing.assert_close(aux[..., : 2 * width][real], _expected_aux(hidden_states, ids[:2])[real],
                               rtol=1e-6, atol=1e-6)
    last = aux[..., 2 * width :]
    assert not torch.allclose(last[real], hidden_states[LAYERS][real], atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last)[real], hidden_states[LAYERS][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(runner.input_embedding_weight(), model.get_input_embeddings().weight)
    # the co-located backend captures the same tensors
    direct = HFEagle3TargetModel(model, aux_layer_ids=ids).forward_capture(input_ids, attention_mask)
    torch.testing.assert_close(direct.aux_hidden_states[real], aux[real], rtol=1e-6, atol=1e-6)


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
