"""DSpark: the DFlash block drafter plus a Markov head, in vLLM's ``sample_from_anchor`` layout.

Checked here: the labels shift by one against DFlash (every slot predicts, slot 0 the token after
the anchor); the Markov input is teacher-forced with the previous slot's label; on a toy where
only the previous token determines the next one the Markov head learns it and the DFlash draft
cannot; the export carries vLLM's DSpark keys and tensor names and loads back; decoding applies
the Markov step slot by slot as vLLM's ``DSparkSpeculator._sample_sequential`` does and is lossless
on the embedded default.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.export import block_draft_method, export_dflash_draft, load_exported_dflash_draft
from draftcache.trainer.dflash.loss import dflash_block_labels, dflash_loss, markov_prev_tokens, sample_anchors
from draftcache.trainer.dflash.model import DFlashDraftModel, build_dflash_blocks
from draftcache.trainer.dflash.speculative import dflash_propose

from .helpers import train_dflash_toy

V, H, TARGET_H, SEQ, CLASSES = 32, 32, 24, 64, 16



def _config(markov_rank: int = 8, block_size: int = 4, **kw) -> DFlashDraftConfig:
    return DFlashDraftConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                             max_position_embeddings=256, vocab_size=V, target_hidden_size=TARGET_H,
                             num_target_layers=4, target_layer_ids=[1, 2], block_size=block_size, mask_token_id=1,
                             markov_rank=markov_rank, **kw)


def _draft(config: DFlashDraftConfig, seed: int = 0) -> DFlashDraftModel:
    torch.manual_seed(seed)
    draft = DFlashDraftModel(config)
    g = torch.Generator().manual_seed(seed + 1)
    draft.load_target_embeddings(torch.randn(V, H, generator=g) * 0.5, torch.randn(V, H, generator=g) / H ** 0.5)
    return draft


def test_labels_shift_by_one_and_every_slot_counts():
    argmax = torch.arange(100, 120).view(1, 20)
    mask = torch.ones(1, 20, dtype=torch.long)
    anchors, valid = torch.tensor([[3, 17]]), torch.ones(1, 2, dtype=torch.bool)
    dflash, dflash_mask = dflash_block_labels(argmax, mask, anchors, valid, block_size=4, first_slot=1)
    dspark, dspark_mask = dflash_block_labels(argmax, mask, anchors, valid, block_size=4, first_slot=0)
    # DSpark slot k predicts p + k + 1: label target_argmax[p + k]; DFlash slot k predicts p + k
    assert dspark[0, 0].tolist() == [103, 104, 105, 106]
    assert torch.equal(dspark[..., :-1], dflash[..., 1:])
    assert dflash_mask[0, 0].tolist() == [False, True, True, True]
    assert dspark_mask[0, 0].tolist() == [True, True, True, True]
    # anchor 17 of 20 tokens: positions 18, 19 exist, 20 does not
    assert dspark_mask[0, 1].tolist() == [True, True, False, False]


def test_markov_input_is_teacher_forced_with_the_previous_label():
    ids = torch.arange(20).view(1, 20)
    argmax = torch.arange(100, 120).view(1, 20)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 6] = 0  # position 6 unsupervised: slot 2 of the block at 3 (it predicts 6) does not count
    anchors, valid = torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool)
    labels, label_mask = dflash_block_labels(argmax, mask, anchors, valid, block_size=4, first_slot=0)
    prev = markov_prev_tokens(ids, labels, label_mask, anchors)
    # slot 0: the anchor token; slot k: the label of slot k - 1 (the token at p + k on an accepted
    # path), the data token where that label does not count
    assert prev[0, 0].tolist() == [3, 103, 104, 6]


def test_slot_logits_add_the_markov_bias_of_the_previous_token():
    draft = _draft(_config())
    with torch.no_grad():
        draft.markov_head.markov_w2.weight.normal_()
    hidden = torch.randn(5, H)
    prev = torch.tensor([0, 3, 7, 7, 31])
    expected = hidden @ draft.lm_head.weight.T + draft.markov_head.markov_w1.weight[prev] @ draft.markov_head.markov_w2.weight.T
    assert torch.allclose(draft.slot_logits(hidden, prev), expected, atol=1e-5)
    # untrained, markov_w2 is zero: the logits are DFlash's
    fresh = _draft(_config())
    assert torch.equal(fresh.slot_logits(hidden, prev), fresh.compute_logits(hidden))


def _chain_rows(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """Random tokens and features; the target's tokens follow ``argmax[t] = perm[argmax[t - 1]]`` from a
    random start, so only the previous target token tells the next one (nothing the backbone sees does)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(CLASSES, generator=torch.Generator().manual_seed(7))
    argmax = torch.empty(rows, SEQ, dtype=torch.long)
    argmax[:, 0] = torch.randint(0, CLASSES, (rows,), generator=g)
    for t in range(1, SEQ):
        argmax[:, t] = perm[argmax[:, t - 1]]
    return {"input_ids": torch.randint(4, 4 + CLASSES, (rows, SEQ), generator=g),
            "target_hidden": torch.randn(rows, SEQ, 2 * TARGET_H, generator=g),
            "target_argmax": argmax + 4, "loss_mask": torch.ones(rows, SEQ, dtype=torch.long)}


def _toy_accuracy(markov_rank: int, steps: int = 80) -> torch.Tensor:
    out = train_dflash_toy(_draft(_config(markov_rank=markov_rank)), _chain_rows, steps=steps, num_anchors=32)
    return out.correct / out.counted.clamp_min(1)


def test_the_markov_head_learns_what_only_the_previous_token_tells():
    dspark = _toy_accuracy(markov_rank=8)
    dflash = _toy_accuracy(markov_rank=0)
    print(f"\nDSpark accuracy per slot {dspark.tolist()}, DFlash {dflash.tolist()}")
    assert dspark[1:].min() >= 0.95  # slots 1..3: the previous slot's token (teacher-forced) tells it
    assert dflash[1:].max() <= 0.4   # the same backbone without the Markov head cannot


def test_confidence_head_trains_towards_the_slot_being_right():
    draft = _draft(_config(enable_confidence_head=True))
    batch = _chain_rows(seed=1)
    anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=8, generator=torch.Generator().manual_seed(0))
    plain = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, **batch)
    with_conf = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, confidence_weight=0.5, **batch)
    assert with_conf.loss > plain.loss  # + 0.5 * BCE
    with_conf.loss.backward()
    assert draft.confidence_head.proj.weight.grad.abs().sum() > 0


def test_proposal_applies_the_markov_step_slot_by_slot():
    """vLLM's DSparkSpeculator: one backbone forward, then slot k's token is the argmax of its base
    logits plus ``markov_w2(markov_w1[token of slot k - 1])``, the anchor before slot 0."""
    draft = _draft(_config(block_size=5)).eval()
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.normal_()  # strong enough to change the argmax
        draft.markov_head.markov_w2.weight.normal_()
    context = torch.randn(1, 9, 2 * TARGET_H)
    proposal = dflash_propose(draft, context, anchor_token=5)
    assert len(proposal) == 5  # every slot proposes (sample_from_anchor)
    from draftcache.trainer.dflash.model import DFlashBlocks

    ids = torch.tensor([[[5, 1, 1, 1, 1]]])
    blocks = DFlashBlocks(input_ids=ids, position_ids=(9 + torch.arange(5)).view(1, 1, 5),
                          context_mask=torch.ones(1, 1, 9, dtype=torch.bool), anchor_valid=torch.ones(1, 1, dtype=torch.bool))
    with torch.no_grad():
        base = draft.compute_logits(draft(context, torch.arange(9).view(1, 9), blocks)[0, 0])  # [5, V]
        prev, expected = 5, []
        for k in range(5):
            bias = draft.markov_head.markov_w2.weight @ draft.markov_head.markov_w1.weight[prev]
            prev = int((base[k] + bias).argmax())
            expected.append(prev)
        without = base.argmax(-1).tolist()
    assert proposal == expected
    assert proposal != without  # the Markov step changed something


def test_export_has_vllms_dspark_layout_and_loads_back(tmp_path):
    draft = _draft(_config(enable_confidence_head=True))
    out = export_dflash_draft(draft, tmp_path / "dspark")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    assert config["markov_rank"] == 8 and config["sample_from_anchor"] is True and config["markov_head_type"] == "vanilla"
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is True
    assert config["dflash_config"] == {"mask_token_id": 1, "target_layer_ids": [1, 2]}
    assert config["draftcache"]["format"] == "dspark" and block_draft_method(out) == "dspark"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["markov_head.markov_w1.weight"].shape == (V, 8)
    assert tensors["markov_head.markov_w2.weight"].shape == (V, 8)
    assert tensors["confidence_head.proj.weight"].shape == (1, H + 8)
    assert tensors["confidence_head.proj.bias"].shape == (1,)
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in tensors)  # vLLM shares the target's

    class Target(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
            self.embed.weight.data.copy_(draft.embed_tokens.weight)
            self.head.weight.data.copy_(draft.lm_head.weight)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    back = load_exported_dflash_draft(out, Target())
    assert back.config == draft.config
    for name, value in draft.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name

    dflash_dir = export_dflash_draft(_draft(_config(markov_rank=0)), tmp_path / "dflash")
    assert json.loads((dflash_dir / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    assert block_draft_method(dflash_dir) == "dflash"
    assert not any("markov" in k for k in load_file(str(dflash_dir / "model.safetensors")))


def test_tiny_dspark_run_on_the_embedded_default_evaluates_lossless(tmp_path):
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash
    from draftcache.trainer.evaluate import evaluate_draft

    result = train_dflash(DFlashTrainConfig(output_dir=str(tmp_path / "run"), markov_rank=8, block_size=4,
                                            num_anchors=16, max_steps=2, warmup_steps=1, val_fraction=0.0,
                                            device="cpu", progress=False), log=lambda *_: None)
    meta = json.loads((tmp_path / "run" / "result.json").read_text())
    assert meta["steps"] == 2 and len(meta["val_acc"]) == 0
    report = evaluate_draft(draft_dir=result.export_dir, num_prompts=2, max_new_tokens=12, device="cpu")
    assert report.draft_tokens == 4  # K = block_size
    assert report.mismatches == 0
    assert report.stats.num_drafts > 0


def test_cli_refuses_a_confidence_head_on_dflash(tmp_path):
    from typer.testing import CliRunner

    from draftcache.cli import app

    r = CliRunner().invoke(app, ["train", "--method", "dflash", "--confidence-head", "--output-dir",
                                 str(tmp_path / "run")])
    assert r.exit_code == 2
    assert "--confidence-head is a DSpark option" in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()


def test_distribution_term_against_the_targets_logits():
    draft = _draft(_config())
    batch = _chain_rows(seed=2)
    anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=8, generator=torch.Generator().manual_seed(0))
    plain = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, **batch)
    # a target sure of its argmax: the soft cross-entropy is the cross-entropy on the argmax
    sure = torch.nn.functional.one_hot(batch["target_argmax"], V).float() * 1e4
    same = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, target_logits=sure,
                       distribution_weight=0.9, **batch)
    assert torch.allclose(same.loss, plain.loss, rtol=1e-5)
    # an unsure target: a different loss, with gradients
    unsure = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, target_logits=torch.randn(2, SEQ, V),
                         distribution_weight=0.9, **batch)
    assert not torch.allclose(unsure.loss, plain.loss)
    unsure.loss.backward()
    assert draft.markov_head.markov_w2.weight.grad.abs().sum() > 0



def _full_distribution_loss(draft, batch, anchors, valid, teacher_logits, w):
    """The DSpark loss with the distribution term in plain torch, every ``[N, V]`` tensor at once:
    ``sum_k exp(-k / 7) * ((1 - w) * CE(label) + w * soft-CE(softmax(teacher_logits[p + k]))) / sum_k exp(-k / 7)``."""
    c = draft.config
    b, s = batch["input_ids"].shape
    blocks = build_dflash_blocks(batch["input_ids"], anchors, valid, block_size=c.block_size,
                                 mask_token_id=c.mask_token_id)
    hidden = draft(batch["target_hidden"], torch.arange(s).expand(b, s), blocks)  # [B, A, Bk, H]
    labels, mask = dflash_block_labels(batch["target_argmax"], batch["loss_mask"], anchors, valid,
                                       block_size=c.block_size, first_slot=0)
    prev = markov_prev_tokens(batch["input_ids"], labels, mask, anchors)
    head = draft.markov_head
    logits = (hidden @ draft.lm_head.weight.T + head.markov_w1.weight[prev] @ head.markov_w2.weight.T)[mask]  # [N, V]
    slot = (anchors[:, :, None] + torch.arange(c.block_size)).clamp(max=s - 1)  # p + k: the target's row for slot k
    probs = torch.softmax(teacher_logits[torch.arange(b)[:, None, None], slot][mask].float(), -1)  # [N, V]
    log_probs = F.log_softmax(logits.float(), -1)
    ce = -log_probs.gather(1, labels[mask][:, None])[:, 0]
    soft = -(probs * log_probs).sum(-1)
    weights = torch.exp(-torch.arange(c.block_size, dtype=torch.float32) / 7.0).expand_as(mask)[mask]
    return (((1 - w) * ce + w * soft) * weights).sum() / weights.sum()


@pytest.mark.parametrize("teacher", ["logits", "final_hidden"])
def test_distribution_term_in_chunks_equals_the_full_softmax_formula(teacher):
    """Loss and gradients of the chunked distribution term (the target's logits online; its final hidden
    states through the cache's lm_head, with a bias, from a hidden cache) equal the one-shot formula,
    and the target's logits are only ever built for one chunk of counted slots."""
    draft = _draft(_config())
    with torch.no_grad():
        draft.markov_head.markov_w2.weight.normal_()
    batch = _chain_rows(seed=3)
    batch["loss_mask"][:, ::5] = 0  # some slots not counted
    g = torch.Generator().manual_seed(4)
    final_hidden = torch.randn(2, SEQ, TARGET_H, generator=g)
    lm_head = torch.nn.Linear(TARGET_H, V).requires_grad_(False)
    anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=8, generator=torch.Generator().manual_seed(0))
    params = [p for p in draft.parameters() if p.requires_grad]

    ref = _full_distribution_loss(draft, batch, anchors, valid, lm_head(final_hidden), 0.9)
    ref_grads = torch.autograd.grad(ref, params)

    rows_seen = []

    def recording_lm_head(h):  # [n, H_t] -> [n, V], as CacheReader.logits_from_final_hidden
        rows_seen.append(h[..., 0].numel())
        return lm_head(h)

    given = ({"target_logits": lm_head(final_hidden)} if teacher == "logits" else
             {"target_final_hidden": final_hidden, "target_lm_head": recording_lm_head})
    out = dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, distribution_weight=0.9,
                      logits_chunk_elements=5 * V, **given, **batch)  # 5 slots a chunk, a ragged last one
    grads = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip([(n, p) for n, p in draft.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    if teacher == "final_hidden":
        counted = int(dflash_block_labels(batch["target_argmax"], batch["loss_mask"], anchors, valid, block_size=4,
                                          first_slot=0)[1].sum())
        assert max(rows_seen) == 5 and sum(rows_seen) == 2 * counted  # every chunk again in the backward


def test_distribution_term_refuses_a_missing_or_doubled_target():
    draft = _draft(_config())
    batch = _chain_rows(seed=2)
    anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=4, generator=torch.Generator().manual_seed(0))
    fh = torch.randn(2, SEQ, TARGET_H)
    for given, match in (({}, "exactly one of"), ({"target_logits": torch.randn(2, SEQ, V), "target_final_hidden": fh},
                                                  "exactly one of"), ({"target_final_hidden": fh}, "target_lm_head")):
        with pytest.raises(ValueError, match=match):
            dflash_loss(draft, anchor_positions=anchors, anchor_valid=valid, distribution_weight=0.5, **given, **batch)
