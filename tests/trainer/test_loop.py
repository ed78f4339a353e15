"""The training loop against real components: a cache written by the real precompute pipeline,
the online co-located target, checkpoints killed and resumed in a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftcache.cache_format import collate_padded, open_cache
from draftcache.trainer.config import TrainConfig
from draftcache.trainer.exporting import export_checkpoint
from draftcache.trainer.export import load_exported_draft
from draftcache.trainer.loop import build_draft, train
from draftcache.trainer.setup import build_source
from draftcache.trainer.sources import CachedSource
from draftcache.trainer.ttt import ttt_forward

from .pipeline_fixtures import build_tiny_target_dir, precompute_cache, write_chats


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    target = build_tiny_target_dir(root / "target")
    data = write_chats(root / "chats.jsonl", 24)
    cache = precompute_cache(target, data, root / "cache", draft_vocab_size=200)
    return {"root": root, "target": target, "data": data, "cache": cache}


def _cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), epochs=1, ttt_steps=3, batch_tokens=None, batch_size=2, lr=1e-3,
                warmup_steps=2, val_fraction=0.2, log_every=1, eval_every=1000, save_every=1000, device="cpu",
                progress=False, export=False)
    base.update(kw)
    return TrainConfig(**base)


def test_cached_and_online_paths_give_the_same_loss_and_gradients(tiny):
    """The same padded batch through the cache and through the co-located target: same numerics."""
    cached = CachedSource(str(tiny["cache"]))
    online = build_source(_cfg(tiny["root"] / "unused", target_model=str(tiny["target"]),
                               input_data=str(tiny["data"]), seq_length=128, draft_vocab_size=200),
                          torch.device("cpu"))
    assert torch.equal(online.vocab.selected_token_ids, cached.vocab.selected_token_ids)
    indices = [3, 4]
    cached_batch = collate_padded([cached.reader[i] for i in indices])
    # the trainer's fast path (stored rows read in threads, expanded in one pass) gives the same batch
    fast = cached.supervise(next(iter(cached.loader([indices], None))), torch.device("cpu"))
    assert fast.keys() == cached_batch.keys()
    for key in cached_batch:
        torch.testing.assert_close(fast[key], cached_batch[key], rtol=0, atol=0, msg=key)
    online_batch = online.supervise(online.loader([indices], None).dataset[0], torch.device("cpu"))
    torch.manual_seed(0)
    draft = build_draft(cached, _cfg("unused"), torch.device("cpu"))
    losses, grads = [], []
    for batch in (cached_batch, online_batch):
        draft.zero_grad(set_to_none=True)
        out = ttt_forward(draft, **batch, ttt_steps=3)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    assert "logits" in online_batch and "target_probs" in cached_batch
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_from_cache_logs_per_step_metrics_and_exports(tiny, tmp_path):
    result = train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), export=True, save_every=3))
    assert result.steps == 10  # 19 training samples (5 held out) in batches of 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    import json

    records = [json.loads(x) for x in lines]
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 11))
    assert all(len(r["acc"]) == 3 and 1.0 <= r["sim_acceptance_length"] <= 4.0 for r in train_recs)
    assert records[-1]["split"] == "val" and result.val_loss is not None
    draft = load_exported_draft(result.export_dir)
    assert draft.config.draft_vocab_size == 200
    assert torch.equal(draft.d2t, open_cache(str(tiny["cache"])).draft_vocab.d2t)
    # the checkpoint exports to the same weights as the run's own export
    again = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    a, b = load_file(str(Path(result.export_dir) / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_dir_is_refused_without_resume(tiny, tmp_path):
    train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), max_steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), max_steps=1))


def _train_cmd(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "draftcache.cli", "train", "--cached-target-path", str(cache), "--output-dir",
            str(out), "--epochs", "3", "--ttt-steps", "2", "--batch-tokens", "0", "--batch-size", "2",
            "--save-every", "2", "--log-every", "1", "--val-fraction", "0", "--device", "cpu", "--quiet", *extra]


def test_killed_training_resumes_to_the_same_weights(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_train_cmd(tiny["cache"], tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(_train_cmd(tiny["cache"], tmp_path / "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / "step-0000004").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "latest").is_file()
    resumed = subprocess.run(_train_cmd(tiny["cache"], tmp_path / "killed", "--resume"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_training_values_are_rejected_by_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "draftcache.cli", "train", "--output-dir", str(tmp_path / "r"),
                        "--ttt-steps", "0", "--lr", "-1", "--cached-target-path", str(tmp_path / "c"),
                        "--target-model", "x"], capture_output=True, text=True)
    assert r.returncode == 2
    for flag in ("--ttt-steps", "--lr", "--cached-target-path excludes"):
        assert flag in r.stderr


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "draftcache.cli", "export", str(tmp_path), "--output",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "neither a checkpoint" in r.stderr


def test_lm_head_warm_start_from_the_target_rows(tiny):
    online = build_source(_cfg(tiny["root"] / "unused", target_model=str(tiny["target"]),
                               input_data=str(tiny["data"]), seq_length=128, draft_vocab_size=200),
                          torch.device("cpu"))
    draft = build_draft(online, _cfg("unused", init_lm_head=True), torch.device("cpu"))
    weight = online.target.output_projection()[0]
    assert torch.equal(draft.lm_head.weight, weight[online.vocab.selected_token_ids])
    with pytest.raises(ValueError, match="hidden"):  # a probs cache does not store the lm_head
        build_draft(CachedSource(str(tiny["cache"])), _cfg("unused", init_lm_head=True), torch.device("cpu"))


def test_resume_with_different_settings_is_refused_naming_them(tiny, tmp_path):
    train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), max_steps=2, save_every=1))
    with pytest.raises(ValueError) as err:
        train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), max_steps=2, resume=True,
                   seed=5, batch_size=3, eval_every=7))
    message = str(err.value)
    assert "seed: 0 != 5" in message and "batch_size: 2 != 3" in message
    assert "eval_every" not in message  # logging cadence does not shape the run
