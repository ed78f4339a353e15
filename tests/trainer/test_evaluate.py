"""``draftcache eval`` through the real CLI: a draft trained on a tiny real target, real chat prompts."""

from __future__ import annotations

import re

import pytest

from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.trainer.eagle3.train import train
from prewarmed import SUBPROCESS_ENV, run_python

from .pipeline_fixtures import build_tiny_target_dir, precompute_cache, write_chats


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    target = build_tiny_target_dir(root / "target")
    data = write_chats(root / "chats.jsonl", 8)
    cache = precompute_cache(target, data, root / "cache")
    result = train(TrainConfig(output_dir=str(root / "run"), cached_target_path=str(cache), max_steps=2,
                               ttt_steps=2, batch_tokens=None, batch_size=4, val_fraction=0, device="cpu",
                               progress=False))
    return {"target": target, "data": data, "draft": result.export_dir}


def test_eval_reports_emitted_tau_and_engine_counters(exported):
    r = run_python(["-m", "draftcache.cli", "eval", "--draft", exported["draft"],
                    "--target-model", str(exported["target"]), "--input-data", str(exported["data"]),
                    "--num-prompts", "3", "--draft-tokens", "3", "--max-new-tokens", "12", "--device", "cpu"],
                   env=SUBPROCESS_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    tau = float(re.search(r"tau = ([0-9.]+) emitted tokens per verify step", out).group(1))
    drafts, draft_tokens, accepted = map(int, re.search(
        r"engine counters    drafts (\d+), draft tokens (\d+), accepted (\d+), accepted per position", out).groups())
    engine = float(re.search(r"engine mean length ([0-9.]+) \(vLLM's 1 \+ accepted / drafts", out).group(1))
    assert drafts >= 3 and draft_tokens == 3 * drafts
    assert engine == pytest.approx(1 + accepted / drafts, abs=1e-3)
    assert 1.0 <= tau <= engine + 1e-3  # truncation at EOS / max-new-tokens only removes tokens
    assert "lossless           yes" in out
