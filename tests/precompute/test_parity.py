"""Each encoding read back from the cache equals the online path: the target run alone on each
sample through ``HFEagle3TargetModel.generate_batch`` + ``compute_target_distribution``.

``probs`` is bit-exact (fp32 storage, batch size 1), ``hidden`` is within bf16 rounding (and
close in fp32) for the stored and for any other draft vocabulary, ``topk`` keeps the argmax.
"""

from __future__ import annotations

import pytest
import torch

from draftcache.cache_format import open_cache
from draftcache.data import (
    ChatTokenizer,
    DraftVocab,
    build_draft_vocab,
    count_supervised_tokens,
    load_conversations,
    tokenize_all,
)
from draftcache.precompute import PrecomputeConfig, precompute_from_config
from draftcache.targets import compute_target_distribution
from draftcache.targets.loading import load_tokenizer

from .helpers import default_dims, save_tiny_target, target_dir, write_chat_subset

NUM_SAMPLES = 12
HIDDEN, VOCAB, _ = default_dims()
SEQ_LENGTH = 64  # several of the chats are longer: truncation is exercised too


def _precompute(out, data, *, target=None, **flags) -> dict:
    logs: list[str] = []
    cfg = PrecomputeConfig(output_dir=str(out), target_model=str(target or target_dir()), input_data=str(data),
                           seq_length=SEQ_LENGTH, progress=False, **flags)
    precompute_from_config(cfg, log=logs.append)
    return {"path": out, "log": "\n".join(logs)}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_subset(tmp_path_factory.mktemp("data") / "chat.jsonl", NUM_SAMPLES)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, chat):
    root = tmp_path_factory.mktemp("caches")
    return {
        # auto with a draft vocabulary no larger than the hidden size -> probs
        "probs": _precompute(root / "probs", chat, draft_vocab_size=HIDDEN, dtype="fp32", batch_size=1),
        # auto on the default target: hidden size < vocabulary -> hidden
        "hidden_fp32": _precompute(root / "hidden_fp32", chat, dtype="fp32", batch_size=1),
        "hidden_bf16": _precompute(root / "hidden_bf16", chat, supervision="hidden", dtype="bf16", batch_size=4),
        "topk": _precompute(root / "topk", chat, supervision="topk", target_probs_topk=8, draft_vocab_size=200,
                            dtype="fp32", batch_size=1),
    }


@pytest.fixture(scope="module")
def samples(chat):
    """The reference tokenization, made independently of the cache."""
    tokenizer = load_tokenizer(target_dir())
    conversations = load_conversations(str(chat))
    return tokenize_all(conversations, ChatTokenizer(tokenizer, SEQ_LENGTH), conversations.skipped)


def _online(target, sample, vocab: DraftVocab):
    """The trainer's online supervision for one sample run alone: the shifted batch, probs, position mask."""
    ids = sample.input_ids[None]  # [1, S]
    batch = target.generate_batch(ids, torch.ones_like(ids), sample.loss_mask[None])
    probs, position_mask = compute_target_distribution(batch.logits, batch.loss_mask, vocab.selected_token_ids,
                                                       vocab.t2d)
    return batch, probs[0], position_mask[0]  # [S, Vd] float32, [S, 1] bool


def _check_common(got: dict, batch, position_mask) -> torch.Tensor:
    """Fields every encoding stores exactly; returns the supervised slots ``[S]`` bool."""
    assert torch.equal(got["input_ids"], batch.input_ids[0])
    assert torch.equal(got["loss_mask"], batch.loss_mask[0])
    assert torch.equal(got["attention_mask"], batch.attention_mask[0])
    assert torch.equal(got["position_mask"], position_mask)
    supervised = got["loss_mask"].bool()
    assert not got["target_probs"][~supervised].any()  # zeros where nothing is supervised
    return supervised


def test_auto_picks_probs_for_a_small_vocab_and_hidden_otherwise(caches):
    assert open_cache(caches["probs"]["path"]).encoding == "probs"
    assert f"auto: probs, since draft vocab {HIDDEN} <= hidden size {HIDDEN}" in caches["probs"]["log"]
    assert open_cache(caches["hidden_fp32"]["path"]).encoding == "hidden"
    assert f"auto: hidden, since hidden size {HIDDEN} < draft vocab {VOCAB} and the draft-vocab probabilities rebuilt from the stored (fp32) final hidden states are within" in \
        caches["hidden_fp32"]["log"]


def test_tokenization_and_counts_match_the_reference(caches, samples):
    reader = open_cache(caches["probs"]["path"])
    assert len(reader) == len(samples)
    skipped = reader.manifest["dataset"]["skipped"]
    assert len(samples) + sum(skipped.values()) == NUM_SAMPLES
    assert max(len(s.input_ids) for s in samples) == SEQ_LENGTH  # at least one chat was truncated
    counts = torch.zeros(reader.manifest["target"]["vocab_size"], dtype=torch.int64)
    for i, s in enumerate(samples):
        raw = reader.get_raw(i)
        assert torch.equal(raw["input_ids"].long(), s.input_ids)
        assert torch.equal(raw["loss_mask"].long(), s.loss_mask)
        count_supervised_tokens(s.input_ids, s.loss_mask, counts.numel(), counts)
    assert reader.manifest["token_counts"] == counts.tolist()
    tokenizer = load_tokenizer(target_dir())
    special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           tokenizer.unk_token_id) if i is not None]  # always kept in the draft vocabulary
    expected = build_draft_vocab(counts, HIDDEN, special)
    assert reader.manifest["draft_vocab"]["selected_token_ids"] == expected.selected_token_ids.tolist()


def test_probs_are_bit_identical_to_the_online_path(caches, samples, reference_target):
    reader = open_cache(caches["probs"]["path"])
    vocab = reader.draft_vocab
    assert vocab.size == HIDDEN
    masked = 0
    for i, s in enumerate(samples):
        got = reader[i]
        batch, probs, position_mask = _online(reference_target, s, vocab)
        supervised = _check_common(got, batch, position_mask)
        assert torch.equal(got["aux_hidden_states"], batch.aux_hidden_states[0])
        assert torch.equal(got["target_probs"][supervised], probs[supervised])
        masked += int(position_mask.sum())
    assert 0 < masked  # some argmaxes fall inside the small vocabulary, and the test saw them


def test_hidden_fp32_matches_the_online_path(caches, samples, reference_target):
    reader = open_cache(caches["hidden_fp32"]["path"])
    assert reader.draft_vocab.size == VOCAB
    for i, s in enumerate(samples):
        got = reader[i]
        batch, probs, position_mask = _online(reference_target, s, reader.draft_vocab)
        supervised = _check_common(got, batch, position_mask)
        assert torch.equal(got["aux_hidden_states"], batch.aux_hidden_states[0])
        torch.testing.assert_close(got["target_probs"][supervised], probs[supervised], rtol=1e-4, atol=1e-6)


def test_hidden_bf16_is_within_bf16_rounding(caches, samples, reference_target):
    reader = open_cache(caches["hidden_bf16"]["path"])
    weight = reference_target.output_projection()[0].float()  # [V, H]
    worst = 0.0
    for i, s in enumerate(samples):
        got = reader[i]
        batch, probs, position_mask = _online(reference_target, s, reader.draft_vocab)
        supervised = _check_common(got, batch, position_mask)
        # aux: the fp32 states rounded to bf16 (the batch of 4 may move the last fp32 bit before rounding)
        torch.testing.assert_close(got["aux_hidden_states"].float(), batch.aux_hidden_states[0],
                                   rtol=2 ** -7, atol=1e-5)
        # the read-time rebuild is exactly softmax(bf16(final_hidden) @ W.T) ...
        ids = s.input_ids[None]
        final = reference_target.forward_capture(ids, torch.ones_like(ids), capture_final_hidden=True).final_hidden
        rows = final[0, 1:][supervised[:-1]].to(torch.bfloat16).float() @ weight.T  # [M', V]
        torch.testing.assert_close(got["target_probs"][supervised], torch.softmax(rows, -1), rtol=1e-4, atol=1e-5)
        # ... which is the online distribution up to bf16 rounding of the lm_head input
        worst = max(worst, float((got["target_probs"][supervised] - probs[supervised]).abs().max()))
    assert worst < 5e-3  # measured 8e-4: bf16 keeps 8 mantissa bits (relative rounding 2^-9)


def test_hidden_cache_serves_any_draft_vocabulary(caches, samples, reference_target):
    path = caches["hidden_fp32"]["path"]
    reader = open_cache(path, draft_vocab=100)
    counts = torch.tensor(reader.manifest["token_counts"], dtype=torch.int64)
    vocab = build_draft_vocab(counts, 100)
    assert torch.equal(reader.selected_token_ids, vocab.selected_token_ids)
    outside = 0
    for i, s in enumerate(samples):
        got = reader[i]
        batch, probs, position_mask = _online(reference_target, s, vocab)
        supervised = _check_common(got, batch, position_mask)
        assert got["target_probs"].shape == (len(s.input_ids), 100)
        torch.testing.assert_close(got["target_probs"][supervised], probs[supervised], rtol=1e-4, atol=1e-6)
        outside += int((supervised & ~position_mask[:, 0]).sum())
    assert outside > 0  # some target argmaxes fall outside the 100 tokens: position_mask drops them


def test_topk_keeps_the_argmax_and_the_renormalised_top_k(caches, samples, reference_target):
    reader = open_cache(caches["topk"]["path"])
    assert reader.manifest["supervision"] == {"encoding": "topk", "topk": 8, "rebuild_max_abs_prob_diff": None}
    for i, s in enumerate(samples):
        got = reader[i]
        batch, probs, position_mask = _online(reference_target, s, reader.draft_vocab)
        supervised = _check_common(got, batch, position_mask)
        kept = position_mask[:, 0]
        assert torch.equal(got["target_probs"][kept].argmax(-1), probs[kept].argmax(-1))
        top_p, top_i = probs[supervised].topk(8, dim=-1)
        expected = torch.zeros_like(probs[supervised]).scatter_(1, top_i, top_p / top_p.sum(-1, keepdim=True))
        torch.testing.assert_close(got["target_probs"][supervised], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_architectures_match_the_online_path(tmp_path, chat, family):
    from draftcache.targets import HFEagle3TargetModel
    from draftcache.targets.loading import load_target_model

    model_dir = save_tiny_target(tmp_path / family, family)
    cache = _precompute(tmp_path / "cache", chat, target=model_dir, num_samples=4, dtype="fp32", batch_size=2,
                        supervision="hidden")
    reader = open_cache(cache["path"])
    assert reader.manifest["target"]["architecture"] == {"qwen3": "Qwen3ForCausalLM",
                                                        "mistral": "MistralForCausalLM"}[family]
    target = HFEagle3TargetModel(load_target_model(str(model_dir), device=torch.device("cpu")))
    conversations = load_conversations(str(chat), num_samples=4)
    references = tokenize_all(conversations, ChatTokenizer(load_tokenizer(str(model_dir)), SEQ_LENGTH),
                              conversations.skipped)
    for i, s in enumerate(references):
        got = reader[i]
        batch, probs, position_mask = _online(target, s, reader.draft_vocab)
        supervised = _check_common(got, batch, position_mask)
        torch.testing.assert_close(got["aux_hidden_states"], batch.aux_hidden_states[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["target_probs"][supervised], probs[supervised], rtol=1e-4, atol=1e-6)
