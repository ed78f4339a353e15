"""The DFlash mask token: chosen never on a zero embedding row, and what goes wrong when it is.

Toys (one draft layer, block 2, so slot 1 is the only prediction): the next token is a function
of the ANCHOR alone, or of the target's features at ``p - 1`` alone (the context). A draft whose
mask row is the chosen one learns both at slot 1; one fed the zero pad row (HF's ``padding_idx``
row, what the trainer used to pick) cannot: its masked query is zero, so attention is uniform.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.mask_token import choose_mask_token, tokenizer_special_ids
from draftcache.trainer.dflash.model import DFlashDraftModel
from prewarmed import SUBPROCESS_ENV, run_python

from .helpers import train_dflash_toy

V, H, TARGET_H, SEQ, CLASSES = 32, 32, 24, 64, 16
PAD, SPECIALS = 0, [0, 1, 2, 3]  # ids 0..3 special, 0 the pad (zero row); data uses ids 4..19


def _target_tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.nn.Embedding(V, H, padding_idx=PAD)  # as HF builds it: the pad row is zero
    with torch.no_grad():
        embed.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
        embed.weight[PAD].zero_()
    return embed.weight.detach().clone(), torch.randn(V, H, generator=g) / H ** 0.5


def _toy_rows(kind: str, seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """``rows`` documents of SEQ tokens; ``target_argmax[p]`` (the label of slot 1 at anchor p) is a
    permutation of the anchor token (``anchor``) or the class coded in the features at ``p - 1`` (``context``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 4 + CLASSES, (rows, SEQ), generator=g)
    classes = torch.randint(0, CLASSES, (rows, SEQ), generator=g)
    codes = torch.randn(CLASSES, 2 * TARGET_H, generator=torch.Generator().manual_seed(99))
    hidden = torch.randn(rows, SEQ, 2 * TARGET_H, generator=g)
    perm = torch.randperm(CLASSES, generator=torch.Generator().manual_seed(7)) + 4
    if kind == "anchor":
        argmax = perm[ids - 4]
    else:
        hidden = hidden + 3 * codes[classes]
        argmax = torch.cat([torch.full((rows, 1), 4), classes[:, :-1] + 4], dim=1)  # argmax[p] from features at p-1
    return {"input_ids": ids, "target_hidden": hidden, "target_argmax": argmax,
            "loss_mask": torch.ones(rows, SEQ, dtype=torch.long)}


def _slot1_accuracy(kind: str, mask_token_id: int, steps: int = 100) -> float:
    config = DFlashDraftConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                               max_position_embeddings=256, vocab_size=V, target_hidden_size=TARGET_H,
                               num_target_layers=4, target_layer_ids=[1, 2], block_size=2,
                               mask_token_id=mask_token_id)
    torch.manual_seed(0)
    draft = DFlashDraftModel(config)
    draft.load_target_embeddings(*_target_tables())
    out = train_dflash_toy(draft, lambda seed: _toy_rows(kind, seed=seed), steps=steps, num_anchors=64)
    return float(out.correct[1] / out.counted[1])


def _choose(**kw):
    embed, _ = _target_tables()
    counts = torch.zeros(V, dtype=torch.int64)
    counts[4 : 4 + CLASSES] = 100
    return choose_mask_token(embeddings=embed, supervised_counts=counts, rms_norm_eps=1e-6, special_ids=SPECIALS,
                             **kw)


@pytest.mark.parametrize("kind", ["anchor", "context"])
def test_slot_one_learns_the_anchor_and_the_context_with_the_chosen_mask(kind):
    chosen = _choose()
    assert chosen.token_id == 1 and chosen.rule == "unused_special_token" and chosen.row_rms > 0
    learnt = _slot1_accuracy(kind, chosen.token_id)
    print(f"\n{kind}: slot-1 accuracy {learnt:.3f} with mask {chosen.token_id}")
    assert learnt >= 0.95


def test_the_zero_pad_row_cannot_read_the_context():
    """What the trainer used to choose: with the pad row every masked query is zero, attention is
    uniform over the context, and the feature at ``p - 1`` is lost (chance is 1/16)."""
    zero_row = _slot1_accuracy("context", PAD)
    print(f"\ncontext: slot-1 accuracy {zero_row:.3f} with the zero pad row")
    assert zero_row <= 0.3


def test_the_rule_order_and_refusals():
    embed, _ = _target_tables()
    counts = torch.zeros(V, dtype=torch.int64)
    counts[4 : 4 + CLASSES] = 100
    assert _choose(tokenizer_mask_id=3).rule == "tokenizer_mask_token"
    assert _choose(tokenizer_mask_id=PAD).token_id == 1  # a mask token on a zero row is passed over
    assert _choose(given=20).rule == "given"
    # no usable special: the lowest unused ordinary token with a non-zero row
    alone = choose_mask_token(embeddings=embed, supervised_counts=counts, rms_norm_eps=1e-6, special_ids=[PAD])
    assert (alone.token_id, alone.rule) == (1, "unused_token")
    with pytest.raises(ValueError, match=r"--mask-token-id 0: the target's embedding row of that token is zero"):
        _choose(given=PAD)
    with pytest.raises(ValueError, match=r"--mask-token-id 32 is not a token id"):
        _choose(given=V)
    every = torch.ones(V, dtype=torch.int64)
    with pytest.raises(ValueError, match="pass --mask-token-id"):
        choose_mask_token(embeddings=embed, supervised_counts=every, rms_norm_eps=1e-6, special_ids=SPECIALS)


def test_the_embedded_targets_mask_row_is_not_zero_and_is_recorded(tmp_path):
    """``train --method dflash`` on the embedded default (the real CLI): the exported mask token's
    embedding row is non-zero, and the choice and its reason are recorded."""
    from safetensors.torch import load_file

    from draftcache.defaults import default_target_path
    from draftcache.targets.loading import load_tokenizer

    out = tmp_path / "run"
    r = run_python(["-m", "draftcache.cli", "train", "--method", "dflash", "--output-dir", str(out),
                    "--max-steps", "1", "--block-size", "4", "--num-anchors", "8", "--batch-tokens", "256",
                    "--val-fraction", "0", "--quiet"], env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "export" / "config.json").read_text())
    mask_id = config["dflash_config"]["mask_token_id"]
    recorded = config["draftcache"]["mask_token"]
    assert recorded["token_id"] == mask_id and recorded["why"] and recorded["rule"] == "unused_special_token"
    weights = load_file(os.path.join(default_target_path(), "model.safetensors"))
    row = weights["model.embed_tokens.weight"][mask_id]
    assert row.pow(2).mean() > 1e-6 and mask_id != 0  # id 0 is the embedded target's <|pad|>: a zero row
    assert mask_id in tokenizer_special_ids(load_tokenizer(default_target_path()))
    assert f"mask token {mask_id}" in r.stdout


def test_a_zero_row_mask_token_id_is_refused_naming_the_flag(tmp_path):
    """Refused once the target's embeddings are read, before training: the CLI in this process."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    r = CliRunner().invoke(app, ["train", "--method", "dflash", "--output-dir", str(tmp_path / "run"), "--max-steps",
                                 "1", "--mask-token-id", "0", "--quiet"])
    assert r.exit_code == 1 and "--mask-token-id 0: the target's embedding row of that token is zero" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
