"""The window-local training shuffle (``plan_epoch(shuffle_block_tokens=)``): blocks of consecutive
(storage-order) samples permuted, then the samples inside each, so the cached reader's windows of
consecutive micro-batches each read a few contiguous stretches of the shards."""

from __future__ import annotations

import json
import random

import pytest

from draftcache.cache_format import open_cache, window_tokens
from draftcache.trainer.batching import cache_block_tokens, plan_epoch, shuffle_blocks, split_train_val

from .pipeline_fixtures import build_tiny_target_dir, precompute_cache, write_chats

BLOCK = 400  # tokens per block in the synthetic plans below


def _lengths(n: int = 300, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 60) for _ in range(n)]


def _train_indices(lengths: list[int]) -> list[int]:
    return split_train_val(len(lengths), 0.1, seed=3)[0]  # sorted, with the held-out samples missing


def _plan(indices, lengths, *, epoch=0, block=BLOCK, **kw):
    kw = {"seed": 11, "batch_tokens": 64, "batch_size": 4, **kw}
    return plan_epoch(indices, lengths, epoch=epoch, shuffle_block_tokens=block, **kw)


@pytest.mark.parametrize("batch_tokens", [64, None])
def test_every_training_sample_once_per_epoch(batch_tokens):
    lengths = _lengths()
    indices = _train_indices(lengths)
    for epoch in range(3):
        plan = _plan(indices, lengths, epoch=epoch, batch_tokens=batch_tokens)
        assert sorted(i for batch in plan for i in batch) == indices
        assert len(shuffle_blocks(indices, lengths, BLOCK)) > 10  # the plan really shuffled blocks


def test_blocks_are_runs_of_consecutive_indices_within_the_token_budget():
    lengths = _lengths()
    indices = _train_indices(lengths)
    blocks = shuffle_blocks(list(reversed(indices)), lengths, BLOCK)  # any input order: storage order out
    assert [i for block in blocks for i in block] == indices
    assert all(sum(lengths[i] for i in block) <= BLOCK for block in blocks)
    # a block ends only where the next sample would not fit
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > BLOCK for a, b in zip(blocks, blocks[1:]))
    assert shuffle_blocks([0, 1, 2], [500, 10, 10], 100) == [[0], [1, 2]]  # a long sample is a block by itself
    with pytest.raises(ValueError, match="shuffle_block_tokens"):
        shuffle_blocks(indices, lengths, 0)


@pytest.mark.parametrize("batch_tokens", [64, None])
def test_one_block_holding_everything_is_the_global_shuffle_bit_for_bit(batch_tokens):
    """So caches that fit one reader window (the embedded default, the small test caches) train exactly as
    before; a SmolLM2 cache of a few hundred chats (bf16 shards ~290 MB) is already two blocks."""
    lengths = _lengths()
    indices = _train_indices(lengths)
    total = sum(lengths[i] for i in indices)
    for epoch in range(3):
        global_plan = plan_epoch(indices, lengths, seed=11, epoch=epoch, batch_tokens=batch_tokens, batch_size=4)
        for block in (total, total + 1, 10**9):
            assert _plan(indices, lengths, epoch=epoch, block=block, batch_tokens=batch_tokens) == global_plan
        assert _plan(indices, lengths, epoch=epoch, block=None, batch_tokens=batch_tokens) == global_plan
        assert _plan(indices, lengths, epoch=epoch, block=total - 1, batch_tokens=batch_tokens) != global_plan


def _blocks_met(plan, blocks, budget: int, lengths) -> list[int]:
    """For each run of consecutive micro-batches of at most ``budget`` tokens (starting at every
    micro-batch): how many blocks its samples come from."""
    block_of = {i: b for b, block in enumerate(blocks) for i in block}
    met = []
    for start in range(len(plan)):
        seen, used = set(), 0
        for batch in plan[start:]:
            tokens = sum(lengths[i] for i in batch)
            if seen and used + tokens > budget:
                break
            seen |= {block_of[i] for i in batch}
            used += tokens
        met.append(len(seen))
    return met


def test_a_window_of_consecutive_batches_draws_from_about_two_blocks():
    """A run of micro-batches holding a block's worth of tokens (what one loader window reads when
    blocks are sized to the window) meets the end of one block and the start of the next (a third
    only when a short block lies between them); a global shuffle spreads it over most blocks."""
    lengths = _lengths(600)
    indices = _train_indices(lengths)
    blocks = shuffle_blocks(indices, lengths, BLOCK)
    met = _blocks_met(_plan(indices, lengths), blocks, BLOCK, lengths)
    assert max(met) <= 3 and sum(met) / len(met) <= 2.2, met
    spread = _blocks_met(_plan(indices, lengths, block=None), blocks, BLOCK, lengths)
    assert sum(spread) / len(spread) > 4, spread


def test_the_plan_is_fixed_by_seed_and_epoch():
    lengths = _lengths()
    indices = _train_indices(lengths)
    assert _plan(indices, lengths, epoch=1) == _plan(indices, lengths, epoch=1)
    assert _plan(indices, lengths, epoch=1) != _plan(indices, lengths, epoch=2)
    assert _plan(indices, lengths, epoch=1, seed=12) != _plan(indices, lengths, epoch=1)
    # the block order changes across epochs too, not only the samples inside the blocks
    firsts = {min(_plan(indices, lengths, epoch=e)[0]) for e in range(6)}
    assert len(firsts) > 3, firsts


def test_ranks_get_equal_shares_of_the_block_plan():
    lengths = _lengths()
    indices = _train_indices(lengths)
    single = _plan(indices, lengths)
    for world in (2, 3, 4):
        shares = [_plan(indices, lengths, rank=r, world_size=world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        dealt = [shares[b % world][b // world] for b in range(len(shares[0]) * world)]
        assert dealt[:len(single)] == single  # the same global plan, dealt round-robin (the rest repeats)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle")
    target = build_tiny_target_dir(root / "target")
    return precompute_cache(target, write_chats(root / "chats.jsonl", 8), root / "cache", draft_vocab_size=200)


def test_cache_blocks_are_sized_to_the_loader_window(tiny_cache):
    reader = open_cache(tiny_cache)
    assert reader.stored_bytes == sum(e["bytes"] for e in reader.manifest["shards"])
    per_token = reader.stored_bytes / reader.num_tokens
    assert window_tokens(reader, 1000 * round(per_token)) in range(990, 1010)
    assert cache_block_tokens(reader, "global", 1) is None
    assert cache_block_tokens(reader, "window", 1) == window_tokens(reader)
    assert cache_block_tokens(reader, "window", 4) == 4 * window_tokens(reader)  # a rank's window spans 4 of the plan's
    with pytest.raises(ValueError, match="window, global"):
        cache_block_tokens(reader, "blocks", 1)


def test_resume_with_another_shuffle_is_refused_naming_it(tiny_cache, tmp_path):
    from typer.testing import CliRunner

    from draftcache.cli import app

    args = ["train", "--cached-target-path", str(tiny_cache), "--output-dir", str(tmp_path / "run"), "--max-steps",
            "1", "--ttt-steps", "1", "--batch-tokens", "0", "--batch-size", "4", "--val-fraction", "0",
            "--device", "cpu", "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.stderr
    config = (tmp_path / "run" / "latest").read_text()
    refused = CliRunner().invoke(app, [*args, "--resume", "--shuffle", "global"])
    assert refused.exit_code == 1
    assert "shuffle: 'window' != 'global'" in refused.stderr, refused.stderr
    assert (tmp_path / "run" / "latest").read_text() == config  # nothing written
    bad = CliRunner().invoke(app, [*args, "--shuffle", "blocks"])
    assert bad.exit_code == 2 and "--shuffle must be one of window, global" in bad.stderr

    # a run from before --shuffle existed shuffled globally: resuming it needs --shuffle global
    state = tmp_path / "run" / config.strip() / "state.json"
    meta = json.loads(state.read_text())
    del meta["config"]["shuffle"]
    state.write_text(json.dumps(meta))
    old = CliRunner().invoke(app, [*args, "--resume"])
    assert old.exit_code == 1 and "shuffle: 'global' != 'window'" in old.stderr, old.stderr
    resumed = CliRunner().invoke(app, [*args, "--resume", "--shuffle", "global"])
    assert resumed.exit_code == 0, resumed.stderr
