"""HFEagle3TargetModel on real tiny HF models: capture, shift, final hidden, hooks, validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_targets import FAMILIES, HIDDEN, LAYERS, VOCAB, build_model, hook_snapshot, reference_hidden_states
from torch import nn

from draftcache.targets import (
    HFEagle3TargetModel,
    LayerIdError,
    TargetBatchError,
    TargetLayoutError,
    find_decoder_layers,
    shift_left_with_zero,
)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("aux_layer_ids", [None, [6, 0, 3]])
def test_aux_equals_hf_hidden_states(family, aux_layer_ids, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, _ = padded_inputs
    hooks = hook_snapshot(model)
    target = HFEagle3TargetModel(model, aux_layer_ids=aux_layer_ids)
    expected_ids = [1, LAYERS // 2 - 1, LAYERS - 4] if aux_layer_ids is None else aux_layer_ids
    assert target.aux_layer_ids == expected_ids

    out = target.forward_capture(input_ids, attention_mask)
    assert hook_snapshot(model) == hooks
    hidden, logits = reference_hidden_states(model, input_ids, attention_mask)
    expected = torch.cat([hidden[i + 1] for i in expected_ids], dim=-1)
    assert out.aux_hidden_states.shape == (2, 10, 3 * HIDDEN)
    assert torch.equal(out.aux_hidden_states, expected)
    assert torch.equal(out.logits, logits)
    assert out.final_hidden is None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_last_layer_is_captured_before_the_final_norm(family, padded_inputs):
    """transformers 5.x stores norm(output of layer L-1) at hidden_states[L]; aux id L-1 is the raw output."""
    model = build_model(family)
    input_ids, attention_mask, _ = padded_inputs
    out = HFEagle3TargetModel(model, aux_layer_ids=[0, 1, LAYERS - 1]).forward_capture(input_ids, attention_mask)
    hidden, _ = reference_hidden_states(model, input_ids, attention_mask)
    last = out.aux_hidden_states[..., 2 * HIDDEN :]
    final_norm = model.model.norm if family == "llama" else model.model.language_model.norm
    assert not torch.allclose(last, hidden[LAYERS], atol=1e-3)
    assert torch.equal(final_norm(last), hidden[LAYERS])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_shift_semantics(family, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, loss_mask = padded_inputs
    target = HFEagle3TargetModel(model)
    raw = target.forward_capture(input_ids, attention_mask)
    batch = target.generate_batch(input_ids, attention_mask, loss_mask)

    # Slot t carries x_{t+1}, m_{t+1} and the logits of position t+1; the last slot is zero.
    assert torch.equal(batch.input_ids[:, :-1], input_ids[:, 1:])
    assert torch.equal(batch.loss_mask[:, :-1], loss_mask[:, 1:])
    assert torch.equal(batch.logits[:, :-1], raw.logits[:, 1:])
    for shifted in (batch.input_ids, batch.loss_mask, batch.logits):
        assert not shifted[:, -1].any()
    assert torch.equal(batch.input_ids, shift_left_with_zero(input_ids))
    # Features and the attention mask stay position-aligned.
    assert torch.equal(batch.aux_hidden_states, raw.aux_hidden_states)
    assert torch.equal(batch.attention_mask, attention_mask)
    assert batch.target_probs is None and batch.position_mask is None
    assert batch.position_ids is None and batch.seq_lens is None and batch.doc_remaining is None
    assert set(batch.to_trainer_inputs()) == {"input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "logits"}


@pytest.mark.parametrize("family", FAMILIES)
def test_final_hidden_projects_to_logits(family, padded_inputs):
    model = build_model(family)
    input_ids, attention_mask, _ = padded_inputs
    target = HFEagle3TargetModel(model)
    hooks = hook_snapshot(model)
    out = target.forward_capture(input_ids, attention_mask, capture_final_hidden=True)
    assert hook_snapshot(model) == hooks
    weight, bias = target.output_projection()
    assert out.final_hidden.shape == (2, 10, HIDDEN)
    assert weight.shape == (VOCAB, HIDDEN)
    assert torch.equal(nn.functional.linear(out.final_hidden, weight, bias), out.logits)


@pytest.mark.parametrize("family", ["llama", "llava", "gpt2"])
def test_properties_and_embeddings(family):
    model = build_model(family)
    target = HFEagle3TargetModel(model)
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (LAYERS, HIDDEN, VOCAB)
    assert target.get_input_embeddings() is model.get_input_embeddings()
    assert isinstance(target.get_input_embeddings(), nn.Embedding)
    assert not model.training


def test_hooks_removed_when_forward_raises(padded_inputs):
    model = build_model("llama", fresh=True)
    input_ids, attention_mask, _ = padded_inputs
    target = HFEagle3TargetModel(model)
    hooks = hook_snapshot(model)

    class Boom(RuntimeError):
        pass

    def explode(*_args):
        raise Boom("layer 5 failed")

    trap = model.model.layers[5].register_forward_pre_hook(explode)
    try:
        with pytest.raises(Boom, match="layer 5 failed"):
            target.forward_capture(input_ids, attention_mask, capture_final_hidden=True)
    finally:
        trap.remove()
    assert hook_snapshot(model) == hooks
    assert not any(layer._forward_hooks for layer in model.model.layers)
    assert not model.lm_head._forward_pre_hooks
    # The wrapper still works after the failure.
    assert target.forward_capture(input_ids, attention_mask).aux_hidden_states.shape == (2, 10, 3 * HIDDEN)


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([1, 2], LayerIdError, r"exactly three aux_layer_ids .* got 2: \[1, 2\]"),
        ([1, 2, 3, 4], LayerIdError, r"exactly three aux_layer_ids .* got 4"),
        ([1, 3, 3], LayerIdError, r"must be distinct, got \[1, 3, 3\] \(repeated: \[3\]\)"),
        ([1, 3, 8], LayerIdError, r"\[8\] out of range for a target with L=8 .* \[0, 8\)"),
        ([-1, 3, 5], LayerIdError, r"\[-1\] out of range"),
        ([1, 3.0, 5], TypeError, r"must be ints, got \[3.0\]"),
        ([1, True, 5], TypeError, r"must be ints, got \[True\]"),
        ("135", TypeError, r"sequence of ints, got str"),
    ],
)
def test_aux_layer_id_validation(ids, error, match):
    model = build_model("llama")
    hooks = hook_snapshot(model)
    with pytest.raises(error, match=match):
        HFEagle3TargetModel(model, aux_layer_ids=ids)
    assert hook_snapshot(model) == hooks


def test_too_shallow_for_default_ids():
    model = build_model("llama", num_layers=4)
    with pytest.raises(
        LayerIdError, match=r"L=4 .* too shallow .* \[1, 1, 0\] \(ids \[1\] collide\); pass aux_layer_ids"
    ):
        HFEagle3TargetModel(model)
    assert HFEagle3TargetModel(model, aux_layer_ids=[0, 1, 2]).aux_layer_ids == [0, 1, 2]


def test_input_shape_errors(padded_inputs):
    target = HFEagle3TargetModel(build_model("llama"))
    input_ids, attention_mask, loss_mask = padded_inputs
    with pytest.raises(TargetBatchError, match=r"loss_mask must have the shape of input_ids \(2, 10\), got \(2, 9\)"):
        target.generate_batch(input_ids, attention_mask, loss_mask[:, :9])
    with pytest.raises(TargetBatchError, match=r"input_ids must be a \[B, S\] tensor, got \(10,\)"):
        target.forward_capture(input_ids[0], attention_mask[0])


# --- layouts -------------------------------------------------------------------------------------


def test_layout_paths():
    llama = build_model("llama")
    llava = build_model("llava")
    gpt2 = build_model("gpt2")
    assert find_decoder_layers(llama) == list(llama.model.layers)  # model.model.layers
    assert find_decoder_layers(llama.model) == list(llama.model.layers)  # model.layers
    assert find_decoder_layers(llava) == list(llava.model.language_model.layers)  # model.model.language_model.layers
    assert find_decoder_layers(llava.model) == list(llava.model.language_model.layers)  # model.language_model.layers
    assert find_decoder_layers(gpt2) == list(gpt2.transformer.h)  # model.transformer.h
    with pytest.raises(TargetLayoutError, match=r"could not find the decoder layers of Linear: tried model.layers"):
        find_decoder_layers(nn.Linear(2, 2))


class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (hidden_states + torch.tanh(self.proj(hidden_states)),)  # tuple output, as in transformers 4.x


class _DictLM(nn.Module):
    """A real (tiny) causal-LM-shaped model whose decoder layers sit in a ModuleDict keyed by str(i)."""

    def __init__(self, num_layers: int = 8, hidden: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=num_layers)
        self.embed = nn.Embedding(vocab, hidden)
        # Inserted out of order on purpose: the layout helper must order by int(key).
        self.layers = nn.ModuleDict({str(i): _Block(hidden) for i in reversed(range(num_layers))})
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, output_hidden_states=False):
        h = self.embed(input_ids)
        states = [h]
        for i in range(self.config.num_hidden_layers):
            h = self.layers[str(i)](h)[0]
            states.append(h)
        return SimpleNamespace(logits=self.lm_head(self.norm(h)), hidden_states=states)


def test_module_dict_layout():
    torch.manual_seed(0)
    model = _DictLM()
    assert find_decoder_layers(model) == [model.layers[str(i)] for i in range(8)]
    assert HFEagle3TargetModel(model).aux_layer_ids == [1, 3, 4]
    input_ids = torch.randint(0, 32, (2, 5))
    attention_mask = torch.ones_like(input_ids)
    target = HFEagle3TargetModel(model, aux_layer_ids=[4, 0, 2])
    out = target.forward_capture(input_ids, attention_mask, capture_final_hidden=True)
    ref = model(input_ids)
    assert torch.equal(out.aux_hidden_states, torch.cat([ref.hidden_states[i + 1] for i in (4, 0, 2)], -1))
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(model.lm_head(out.final_hidden), out.logits)
    assert hook_snapshot(model) == {}
    assert (target.hidden_size, target.vocab_size) == (16, 32)


def test_module_dict_with_bad_keys():
    model = _DictLM()
    model.layers = nn.ModuleDict({"0": _Block(16), "two": _Block(16)})
    with pytest.raises(TargetLayoutError, match=r"ModuleDict with keys \['0', 'two'\]; expected the keys '0'..'1'"):
        find_decoder_layers(model)


@pytest.mark.parametrize("wrapper", ["eagle3", "dflash", "runner"])
def test_every_hf_wrapper_rejects_a_config_deeper_than_the_model(wrapper):
    from draftcache.targets import HFDFlashTargetModel, HFTargetRunner

    model = build_model("llama", fresh=True)
    model.config.num_hidden_layers = LAYERS + 1
    build = {
        "eagle3": lambda: HFEagle3TargetModel(model, aux_layer_ids=[0, 1, 2]),
        "dflash": lambda: HFDFlashTargetModel(model, [0, 1]),
        "runner": lambda: HFTargetRunner(model),
    }[wrapper]
    with pytest.raises(TargetLayoutError, match=rf"config says {LAYERS + 1} decoder layers but the model holds {LAYERS}"):
        build()
