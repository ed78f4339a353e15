"""The training loop against real components: a cache written by the real precompute pipeline,
the online co-located target, checkpoints killed and resumed in a real subprocess."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftcache.cache_format import collate_padded, open_cache, validate_manifest
from draftcache.trainer.batching import plan_epoch, split_train_val
from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.trainer.exporting import export_checkpoint
from draftcache.trainer.eagle3.export import load_exported_draft
from draftcache.trainer.eagle3.train import accumulation_group, build_draft, train
from draftcache.trainer.eagle3.setup import build_source
from draftcache.trainer.eagle3.sources import CachedSource, IncompleteCacheError
from draftcache.trainer.eagle3.ttt import simulated_acceptance_length, ttt_forward
from prewarmed import SUBPROCESS_ENV, run_python

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
    """Killed and resumed in subprocesses; the uninterrupted reference is the same command in this
    process (Typer's runner; one thread on each side, so fp32 results are equal across processes)."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    env = SUBPROCESS_ENV
    full = CliRunner().invoke(app, _train_cmd(tiny["cache"], tmp_path / "full")[3:])
    assert full.exit_code == 0, full.stderr
    proc = subprocess.Popen(_train_cmd(tiny["cache"], tmp_path / "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / "step-0000004").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "latest").is_file()
    resumed = run_python(_train_cmd(tiny["cache"], tmp_path / "killed", "--resume"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_training_values_are_rejected_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from draftcache.cli import app

    r = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path / "r"), "--ttt-steps", "0", "--lr", "-1",
                                 "--cached-target-path", str(tmp_path / "c"), "--target-model", "x"])
    assert r.exit_code == 2
    for flag in ("--ttt-steps", "--lr", "--cached-target-path excludes"):
        assert flag in r.stderr


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    r = run_python(["-m", "draftcache.cli", "export", str(tmp_path), "--output",
                    str(tmp_path / "out")])
    assert r.returncode == 1 and "neither a checkpoint" in r.stderr


def test_online_source_describes_its_samples(tiny, tmp_path):
    """What an online run trained on: its target and a fingerprint of the tokenised samples."""
    def describe(chats: Path) -> dict:
        return build_source(_cfg(tmp_path / "unused", target_model=str(tiny["target"]), input_data=str(chats),
                                 seq_length=128), torch.device("cpu")).describe()

    full = describe(tiny["data"])
    assert (full["kind"], full["target_model"], full["num_samples"]) == ("online", str(tiny["target"]), 24)
    assert describe(tiny["data"]) == full
    fewer = describe(write_chats(tmp_path / "fewer.jsonl", 23))
    assert fewer["num_samples"] == 23 and fewer["samples_fingerprint"] != full["samples_fingerprint"]


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


# ---------------------------------------------------------------------------------------------
# Metrics: honest accuracy next to the in-vocabulary figure
# ---------------------------------------------------------------------------------------------


def test_metrics_report_supervised_accuracy_and_the_in_vocabulary_figure(tiny, tmp_path):
    """A 200-token draft vocabulary leaves some target argmaxes out: those count as misses in
    ``acc`` (and ``sim_acceptance_length``), not in ``acc_in_draft_vocab``; both are logged and returned."""
    result = train(_cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), max_steps=4))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert len(r["acc"]) == len(r["acc_in_draft_vocab"]) == 3
        assert r["sim_acceptance_length"] == pytest.approx(simulated_acceptance_length(r["acc"]))
        assert r["sim_acceptance_length_in_draft_vocab"] == pytest.approx(
            simulated_acceptance_length(r["acc_in_draft_vocab"]))
        assert all(a <= b for a, b in zip(r["acc"], r["acc_in_draft_vocab"]))
    # the cache's draft vocabulary misses some supervised targets, so the two figures differ
    reader = open_cache(str(tiny["cache"]))
    outside = sum(int((~reader[i]["position_mask"].squeeze(-1) & reader[i]["loss_mask"].bool()).sum())
                  for i in range(len(reader)))
    assert outside > 0
    assert result.val_acc != result.val_acc_in_draft_vocab
    assert result.val_acceptance_length < result.val_acceptance_length_in_draft_vocab
    assert "val acc in draft vocab" in result.format() and "val sim tau in vocab" in result.format()
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["val_acceptance_length"] == result.val_acceptance_length
    assert saved["val_acceptance_length_in_draft_vocab"] == result.val_acceptance_length_in_draft_vocab


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: a short last group steps inside its epoch
# ---------------------------------------------------------------------------------------------


def test_accumulation_groups_end_inside_their_epoch():
    # 10 micro-batches in groups of 3: [0, 1, 2] [3, 4, 5] [6, 7, 8] [9]
    groups = [accumulation_group(i, 10, 3) for i in range(10)]
    assert [size for size, _ in groups] == [3] * 9 + [1]
    assert [i for i, (_, last) in enumerate(groups) if last] == [2, 5, 8, 9]
    assert [accumulation_group(i, 4, 4) for i in range(4)] == [(4, False)] * 3 + [(4, True)]
    assert accumulation_group(0, 1, 8) == (1, True)


def _reference_weights(cache: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Plain accumulation written from the definition: per epoch, groups of grad_accum micro-batches
    (the last one shorter), the mean of their losses backpropagated, one clipped AdamW step each."""
    source = CachedSource(str(cache))
    torch.manual_seed(cfg.seed)
    model = build_draft(source, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    train_idx, _ = split_train_val(len(source), cfg.val_fraction, cfg.seed)
    for epoch in range(cfg.epochs):
        plan = plan_epoch(train_idx, source.lengths, seed=cfg.seed, epoch=epoch, batch_tokens=None,
                          batch_size=cfg.batch_size)
        for start in range(0, len(plan), cfg.grad_accum):
            group = plan[start : start + cfg.grad_accum]
            for indices in group:
                batch = collate_padded([source.reader[i] for i in indices])
                (ttt_forward(model, **batch, ttt_steps=cfg.ttt_steps).loss / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accum_steps_on_the_short_last_group_and_leaks_nothing_into_the_next_epoch(tiny, tmp_path):
    # 19 training samples in batches of 2 = 10 micro-batches per epoch: groups of 3, 3, 3 and 1
    cfg = _cfg(tmp_path / "run", cached_target_path=str(tiny["cache"]), epochs=2, grad_accum=3,
               warmup_steps=0, min_lr_ratio=1.0)  # constant lr: the reference needs no schedule
    result = train(cfg)
    assert result.steps == 8
    trained = load_file(str(tmp_path / "run" / "step-0000008" / "draft.safetensors"))
    expected = _reference_weights(tiny["cache"], cfg)
    assert trained.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


class _CrashingSource(CachedSource):
    """The real cache source, except that the run dies when micro-batch ``crash_at`` is requested."""

    def __init__(self, path: str, crash_at: int):
        super().__init__(path)
        self.crash_at, self.served = crash_at, 0

    def loader(self, plan, packed_tokens):
        for raw in super().loader(plan, packed_tokens):
            if self.served == self.crash_at:
                raise RuntimeError("simulated crash")
            self.served += 1
            yield raw


def test_resume_with_grad_accum_after_a_short_group_is_bit_exact(tiny, tmp_path):
    """Killed in epoch 1 after the short group that ended epoch 0; resumed, it equals an uninterrupted run."""
    # 24 samples in batches of 5 = 5 micro-batches per epoch: groups of 3 and 2, 4 steps in 2 epochs
    kw = dict(cached_target_path=str(tiny["cache"]), epochs=2, grad_accum=3, batch_size=5, save_every=1,
              val_fraction=0)
    assert train(_cfg(tmp_path / "full", **kw)).steps == 4
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies fetching epoch 1's 4th micro-batch
        train(_cfg(tmp_path / "killed", **kw), source=_CrashingSource(str(tiny["cache"]), crash_at=8))
    assert (tmp_path / "killed" / "latest").read_text().strip() == "step-0000003"
    state = json.loads((tmp_path / "killed" / "step-0000003" / "state.json").read_text())["state"]
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 3)
    train(_cfg(tmp_path / "killed", resume=True, **kw))
    a = load_file(str(tmp_path / "full" / "step-0000004" / "draft.safetensors"))
    b = load_file(str(tmp_path / "killed" / "step-0000004" / "draft.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Incomplete caches and what a run trained on
# ---------------------------------------------------------------------------------------------


def _partial_copy(cache: Path, dest: Path, keep_shards: int) -> Path:
    """``cache`` as a crashed precompute leaves it: only the first ``keep_shards`` shards committed."""
    shutil.copytree(cache, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["shards"][keep_shards:]:
        (dest / entry["file"]).unlink()
    manifest["shards"] = manifest["shards"][:keep_shards]
    manifest["stats"] = {key: sum(e[key] for e in manifest["shards"]) for key in ("num_tokens", "num_supervised")}
    manifest["complete"] = False
    validate_manifest(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dest


def test_incomplete_cache_is_refused_through_the_cli_before_anything_is_written(tiny, tmp_path):
    partial = _partial_copy(tiny["cache"], tmp_path / "partial", keep_shards=2)
    out = tmp_path / "run"
    r = run_python(["-m", "draftcache.cli", "train", "--cached-target-path", str(partial),
                    "--output-dir", str(out), "--device", "cpu", "--quiet"],
                   env=SUBPROCESS_ENV)
    assert r.returncode == 1
    assert (f"error: cache {partial} is incomplete: 16 of 24 samples are committed (its precompute-eagle3 run "
            "crashed or is still running). Finish it (precompute-eagle3 --resume with the same settings), or pass "
            "--allow-partial-cache to train on the 16 committed samples.") in r.stderr
    assert not out.exists()


def test_partial_cache_training_is_recorded_and_a_grown_cache_refuses_resume(tiny, tmp_path):
    cache = _partial_copy(tiny["cache"], tmp_path / "cache", keep_shards=2)
    with pytest.raises(IncompleteCacheError, match="16 of 24 samples are committed"):
        train(_cfg(tmp_path / "run", cached_target_path=str(cache), max_steps=2))
    logged = []
    train(_cfg(tmp_path / "run", cached_target_path=str(cache), max_steps=2, save_every=1, allow_partial_cache=True),
          log=logged.append)
    assert logged[0] == "training on an incomplete cache (--allow-partial-cache): 16 of 24 samples committed"
    # the share of step time spent waiting for cached batches, logged at the end
    assert len(logged) == 2 and re.fullmatch(r"data wait: \d+\.\d% of training step time spent waiting for batches",
                                             logged[1]), logged
    meta = json.loads((tmp_path / "run" / "step-0000002" / "state.json").read_text())
    recorded = meta["extra"]["data_source"]
    manifest = json.loads((tiny["cache"] / "manifest.json").read_text())
    assert {k: recorded[k] for k in ("kind", "cache_path", "num_samples", "committed_samples", "complete")} == {
        "kind": "cache", "cache_path": str(cache.resolve()), "num_samples": 24, "committed_samples": 16,
        "complete": False}
    assert recorded["target_fingerprint"] == manifest["target"]["fingerprint"]
    assert recorded["dataset_fingerprint"] == manifest["dataset"]["fingerprint"]
    assert len(recorded["manifest_fingerprint"]) == 64

    # the precompute finishes: the same cache now holds every sample, so the split would change
    shutil.copy(tiny["cache"] / "shard-000002.safetensors", cache / "shard-000002.safetensors")
    shutil.copy(tiny["cache"] / "manifest.json", cache / "manifest.json")
    with pytest.raises(ValueError) as err:
        train(_cfg(tmp_path / "run", cached_target_path=str(cache), max_steps=2, resume=True,
                   allow_partial_cache=True))
    message = str(err.value)
    assert "data committed_samples: 16 != 24" in message and "data complete: False != True" in message
    assert "manifest_fingerprint" not in message  # same cache identity, more samples
    assert "on the data it was trained on" in message
