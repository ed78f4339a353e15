"""DFlash caches end to end on the embedded default target: ``precompute-eagle3 --method dflash``
(real CLI) -> ``draftcache inspect | verify | stats | show`` -> ``train --method dflash
--cached-target-path``, and the parity of cached and online supervision (fp32)."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import torch

from draftcache.cache_format import open_cache, read_manifest
from draftcache.data import ChatTokenizer, load_conversations, tokenize_all
from draftcache.defaults import default_data_path, default_target_path
from draftcache.targets import HFDFlashTargetModel, default_dflash_layer_ids
from draftcache.targets.loading import load_target_model, load_tokenizer
from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors
from draftcache.trainer.dflash.model import DFlashDraftModel
from draftcache.trainer.dflash.train import CachedDFlashBatches, OnlineDFlashBatches
from prewarmed import SUBPROCESS_ENV, run_python

NUM_SAMPLES = 48
LAYERS = [1, 4, 6]
TRAIN = ["--max-steps", "3", "--save-every", "3", "--log-every", "1", "--eval-every", "3", "--block-size", "4",
         "--num-anchors", "16", "--batch-tokens", "256", "--val-fraction", "0.1", "--lr", "1e-3", "--quiet"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", module, *args], env=SUBPROCESS_ENV, timeout=300)


def _invoke(app, args) -> tuple[int, str, str]:
    """``app ARGS`` in this process (Typer's runner): the same app and exit codes as the subprocess,
    without a fresh interpreter's torch import per call. Returns ``(exit_code, stdout, stderr)``;
    the subprocess runs above keep the real process boundary where a test needs it."""
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _cli(*args: str) -> tuple[int, str, str]:
    """``draftcache ARGS`` in this process."""
    from draftcache.cli import app

    return _invoke(app, args)


def _precompute(*args: str) -> tuple[int, str, str]:
    """``precompute-eagle3 ARGS`` in this process."""
    from draftcache.precompute.cli import app

    return _invoke(app, args)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An fp32 dflash cache of the embedded default's first NUM_SAMPLES chats, layers LAYERS."""
    out = tmp_path_factory.mktemp("dflash_cache") / "cache"
    r = _run("draftcache.precompute", "--method", "dflash", "--output-dir", str(out), "--dtype", "fp32",
             "--num-samples", str(NUM_SAMPLES), "--target-layer-ids", ",".join(map(str, LAYERS)),
             "--shard-size", "20", "--batch-size", "3", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def online():
    """The embedded target (fp32) and its tokenized chats, as ``train --method dflash`` builds them."""
    model = load_target_model(default_target_path(), device=torch.device("cpu"))
    tokenizer = load_tokenizer(default_target_path())
    conversations = load_conversations(default_data_path())
    samples = tokenize_all(conversations, ChatTokenizer(tokenizer, 2048), conversations.skipped, strict=False,
                           progress=False)[:NUM_SAMPLES]
    return model, tokenizer, samples


def test_manifest_says_dflash_unshifted_argmax(cache):
    m = read_manifest(cache)
    assert m["kind"] == "dflash" and m["complete"]
    assert m["capture"] == {"layer_ids": LAYERS, "convention": "decoder_layer_output",
                            "hf_hidden_states_index": [i + 1 for i in LAYERS], "shift": "none"}
    assert m["supervision"]["encoding"] == "argmax" and m["dtype"] == "fp32"
    assert set(m["files"]) == {"target_embeddings", "lm_head"}  # the draft reuses both
    assert m["num_shards"] == 3 and m["num_samples"] == NUM_SAMPLES


def test_default_layer_ids_follow_the_draft_depth(tmp_path):
    out = tmp_path / "c"
    code, _, err = _precompute("--method", "dflash", "--output-dir", str(out), "--num-samples", "4",
                               "--draft-layers", "3", "--quiet")
    assert code == 0, err[-3000:]
    assert read_manifest(out)["capture"]["layer_ids"] == default_dflash_layer_ids(8, 3) == [1, 3, 5]


def test_cached_rows_equal_the_online_batches(cache, online):
    """Same packed rows from the cache as from the co-located target: ids, masks, boundaries,
    features (fp32), and the target's greedy token wherever the loss reads it."""
    model, tokenizer, samples = online
    reader = open_cache(cache)
    make_online = OnlineDFlashBatches(HFDFlashTargetModel(model, LAYERS), samples, tokenizer.pad_token_id or 0,
                                      torch.device("cpu"))
    make_cached = CachedDFlashBatches(reader, torch.device("cpu"))
    for indices in ([0], [1, 2, 3], [19, 20, 21, 40], list(range(30, 38))):  # across shard boundaries too
        a, b = make_online(indices), make_cached(indices)
        for key in ("input_ids", "loss_mask", "seq_lens"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(b["target_hidden"], a["target_hidden"], rtol=1e-5, atol=1e-5)
        # the loss reads target_argmax[t] only where t + 1 is supervised in the same document
        starts = torch.repeat_interleave(torch.cumsum(a["seq_lens"][0], 0) - a["seq_lens"][0], a["seq_lens"][0])
        local = torch.arange(a["input_ids"].shape[1]) - starts
        read = torch.zeros_like(a["loss_mask"][0], dtype=torch.bool)
        read[:-1] = a["loss_mask"][0, 1:].bool() & (local[1:] >= 1)
        assert read.any()
        assert torch.equal(a["target_argmax"][0][read], b["target_argmax"][0][read])


def test_cached_loss_and_grads_equal_online(cache, online):
    """The parity the trainer relies on: on the same batches and anchors, the loss and every
    gradient from the cache equal those from the co-located target (fp32, tiny target)."""
    model, tokenizer, samples = online
    reader = open_cache(cache)
    config = DFlashDraftConfig.from_target_config(model.config, target_layer_ids=LAYERS, mask_token_id=0,
                                                  num_hidden_layers=2, block_size=4)
    sources = {"online": OnlineDFlashBatches(HFDFlashTargetModel(model, LAYERS), samples, tokenizer.pad_token_id or 0,
                                             torch.device("cpu")),
               "cache": CachedDFlashBatches(reader, torch.device("cpu"))}
    torch.manual_seed(0)
    draft = DFlashDraftModel.from_target(config, model)
    for indices in ([0, 1, 2], [20, 21, 22, 23, 24]):
        result = {}
        for name, make in sources.items():
            batch = make(indices)
            anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=16, seq_lens=batch["seq_lens"],
                                            generator=torch.Generator().manual_seed(7))
            draft.zero_grad(set_to_none=True)
            out = dflash_loss(draft, target_hidden=batch["target_hidden"], input_ids=batch["input_ids"],
                              target_argmax=batch["target_argmax"], loss_mask=batch["loss_mask"],
                              anchor_positions=anchors, anchor_valid=valid, seq_lens=batch["seq_lens"])
            out.loss.backward()
            grads = {k: p.grad.clone() for k, p in draft.named_parameters() if p.grad is not None}
            result[name] = (out, grads)
        (a, ga), (b, gb) = result["online"], result["cache"]
        assert a.num_blocks == b.num_blocks > 0 and torch.equal(a.counted, b.counted)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        assert ga.keys() == gb.keys() and "fc.weight" in ga
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


def test_inspect_verify_stats_show_understand_dflash(cache):
    code, out, _ = _cli("inspect", str(cache))
    assert code == 0 and "v2 dflash, complete" in out
    assert "supervision  argmax: the target's greedy token per supervised position" in out
    code, out, _ = _cli("verify", str(cache))
    assert code == 0 and "OK" in out and "checked 5 file(s)" in out
    code, out, _ = _cli("stats", str(cache))
    assert code == 0 and f"samples            {NUM_SAMPLES}" in out
    assert "target greedy      equals the data token at" in out
    code, out, _ = _cli("show", str(cache), "0")
    raw = open_cache(cache).get_raw(0)
    agree = int((raw["target_argmax"] == raw["input_ids"][raw["loss_mask"].bool()]).sum())
    assert code == 0
    assert f"({agree} of {int(raw['loss_mask'].sum())} equal the data)" in out


def test_verify_names_a_damaged_dflash_shard(cache, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    shard = copy / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = _cli("verify", str(copy))
    assert code != 0 and "shard-000001.safetensors" in out + err


def test_resume_with_another_method_is_refused_naming_it(cache, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    code, _, err = _precompute("--output-dir", str(copy), "--dtype", "fp32", "--num-samples", str(NUM_SAMPLES),
                               "--shard-size", "20", "--resume", "--quiet")
    assert code == 1
    assert 'kind: "dflash" != "eagle3"  [--method]' in err, err[-2000:]
    assert 'supervision.encoding: "argmax" != "hidden"' in err


def test_dflash_flags_refused_for_the_wrong_method(tmp_path):
    """Flag checks run before any model loads: the precompute CLI in this process (Typer's runner)."""
    code, _, err = _precompute("--output-dir", str(tmp_path / "a"), "--target-layer-ids", "1,2")
    assert code == 2 and "--target-layer-ids is for --method dflash" in err
    code, _, err = _precompute("--method", "dflash", "--output-dir", str(tmp_path / "b"), "--draft-vocab-size", "100")
    assert code == 2 and "--draft-vocab-size is for EAGLE-3 caches" in err
    code, _, err = _precompute("--method", "dflash", "--output-dir", str(tmp_path / "c"), "--target-layer-ids", "1,9")
    assert code == 2 and "--target-layer-ids [9] out of range" in err
    assert not (tmp_path / "c").exists()


def test_train_from_cache_matches_online_training(cache, tmp_path):
    """``train --method dflash --cached-target-path`` through the real CLI: the same steps, losses
    and weights as online training on the same chats (fp32 cache; --input-data limited to them)."""
    data = tmp_path / "chats.jsonl"
    lines = open(default_data_path()).read().splitlines()  # the embedded chats: one JSON record a line
    data.write_text("\n".join(lines[:NUM_SAMPLES]) + "\n")
    common = [*TRAIN, "--draft-layers", "3", "--target-layer-ids", ",".join(map(str, LAYERS))]
    r = _run("draftcache.cli", "train", "--method", "dflash", "--cached-target-path", str(cache),
             "--output-dir", str(tmp_path / "cached"), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"data wait: \d+\.\d% of training step time spent waiting for batches", r.stdout + r.stderr)
    r = _run("draftcache.cli", "train", "--method", "dflash", "--input-data", str(data),
             "--output-dir", str(tmp_path / "online"), *common)
    assert r.returncode == 0, r.stderr[-3000:]

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    cached, online_ = metrics("cached"), metrics("online")
    assert [(m["step"], m["split"]) for m in cached] == [(m["step"], m["split"]) for m in online_]
    for a, b in zip(cached, online_):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    # the prefetching cache reader is timed: the share of step time spent waiting for a batch
    assert all(0 <= m["data_wait_share"] < 1 for m in cached if m["split"] == "train")
    config = json.loads((tmp_path / "cached" / "export" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == LAYERS
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "cached" / "export" / "model.safetensors"))
    wb = load_file(str(tmp_path / "online" / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5, msg=k)


def test_train_refuses_an_eagle3_cache_and_other_layers(cache, tmp_path):
    eagle = tmp_path / "eagle"
    code, _, err = _precompute("--output-dir", str(eagle), "--num-samples", "4", "--quiet")
    assert code == 0, err[-2000:]
    code, _, err = _cli("train", "--method", "dflash", "--cached-target-path", str(eagle),
                        "--output-dir", str(tmp_path / "x"), *TRAIN)
    assert code == 1 and "is a 'eagle3' cache" in err
    code, _, err = _cli("train", "--method", "dflash", "--cached-target-path", str(cache),
                        "--output-dir", str(tmp_path / "y"), "--target-layer-ids", "1,2,3", *TRAIN)
    assert code == 1 and "but the cache holds layers [1, 4, 6]" in err


def test_train_names_a_damaged_shard_without_a_traceback(cache, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    shard = copy / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    r = _run("draftcache.cli", "train", "--method", "dflash", "--cached-target-path", str(copy),
             "--output-dir", str(tmp_path / "run"), *TRAIN)
    assert r.returncode == 1 and "shard-000000.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_mask_token_from_the_manifest_equals_online_and_reads_no_shard(cache, online, monkeypatch):
    """The cache path decides from the manifest's ``token_counts`` and side files (a shard read
    fails here); the online path from one bincount over the same chats; both choose the same
    token, never the zero pad row."""
    from draftcache.cache_format.reader import CacheReader
    from draftcache.trainer.dflash.train import DFlashTrainConfig, cached_mask_token, online_mask_token

    model, tokenizer, samples = online
    cfg = DFlashTrainConfig(output_dir="unused")
    reader = open_cache(cache)

    def no_shard(self, k):
        raise AssertionError(f"the mask choice read shard {k}")

    monkeypatch.setattr(CacheReader, "_shard", no_shard)
    cached = cached_mask_token(cfg, reader, embeddings=reader.target_embeddings())
    direct = online_mask_token(cfg, tokenizer=tokenizer, samples=samples,
                               embeddings=model.get_input_embeddings().weight, hf_config=model.config)
    assert cached == direct
    assert cached.token_id != tokenizer.pad_token_id and cached.row_rms > 0


@pytest.fixture(scope="module")
def hidden_cache(tmp_path_factory):
    """An fp32 dflash cache with ``--supervision hidden``: the argmax plus the target's final hidden state."""
    out = tmp_path_factory.mktemp("dflash_hidden_cache") / "cache"
    r = _run("draftcache.precompute", "--method", "dflash", "--supervision", "hidden", "--output-dir", str(out),
             "--dtype", "fp32", "--num-samples", "12", "--target-layer-ids", ",".join(map(str, LAYERS)),
             "--shard-size", "5", "--batch-size", "3", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_hidden_dflash_cache_gives_the_targets_distribution(hidden_cache, cache, online, tmp_path):
    """``--supervision hidden`` on a dflash cache: recorded in the manifest, and the distribution rebuilt
    from its final hidden states with the lm_head side file equals the online target's logits wherever
    the loss reads them; so the DSpark loss with the distribution term is the same from the cache as
    online. The argmax-only cache refuses --distribution-weight, naming --supervision hidden."""
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash

    assert read_manifest(hidden_cache)["supervision"]["encoding"] == "hidden"
    model, tokenizer, samples = online
    reader = open_cache(hidden_cache)
    make_online = OnlineDFlashBatches(HFDFlashTargetModel(model, LAYERS), samples, tokenizer.pad_token_id or 0,
                                      torch.device("cpu"), keep_distribution=True)
    make_cached = CachedDFlashBatches(reader, torch.device("cpu"), keep_distribution=True)
    indices = [3, 4, 5, 6]  # across a shard boundary
    a, b = make_online(indices), make_cached(indices)
    starts = torch.repeat_interleave(torch.cumsum(a["seq_lens"][0], 0) - a["seq_lens"][0], a["seq_lens"][0])
    local = torch.arange(a["input_ids"].shape[1]) - starts
    read = torch.zeros_like(a["loss_mask"][0], dtype=torch.bool)
    read[:-1] = a["loss_mask"][0, 1:].bool() & (local[1:] >= 1)
    assert read.any()
    assert "target_logits" not in b  # the cache hands out [1, T, H_t] final hidden states, not [1, T, V] logits
    rebuilt = reader.logits_from_final_hidden(b["target_final_hidden"][0][read])
    torch.testing.assert_close(rebuilt, a["target_logits"][0][read], rtol=1e-4, atol=1e-4)

    config = DFlashDraftConfig.from_target_config(model.config, target_layer_ids=LAYERS, mask_token_id=1,
                                                  block_size=4, markov_rank=8)
    torch.manual_seed(0)
    draft = DFlashDraftModel.from_target(config, model)
    anchors, valid = sample_anchors(a["loss_mask"], num_anchors=16, seq_lens=a["seq_lens"],
                                    generator=torch.Generator().manual_seed(0))
    losses = [dflash_loss(draft, target_hidden=x["target_hidden"], input_ids=x["input_ids"],
                          target_argmax=x["target_argmax"], loss_mask=x["loss_mask"], anchor_positions=anchors,
                          anchor_valid=valid, seq_lens=x["seq_lens"], target_logits=x.get("target_logits"),
                          target_final_hidden=x.get("target_final_hidden"),
                          target_lm_head=reader.logits_from_final_hidden, distribution_weight=0.9).loss
              for x in (a, b)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="--supervision hidden"):
        train_dflash(DFlashTrainConfig(output_dir=str(tmp_path / "run"), cached_target_path=str(cache),
                                       markov_rank=8, distribution_weight=0.9, progress=False))


def test_dspark_trains_with_the_distribution_term_from_a_hidden_cache(hidden_cache, tmp_path):
    """``train --method dspark --distribution-weight 0.9`` from a ``hidden`` cache (the target's logits
    rebuilt per chunk of counted slots from the final hidden states): it trains, validates and exports,
    and the distribution term moves the loss (the same run with weight 0 scores differently)."""
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash

    def run(weight: float, name: str):
        return train_dflash(DFlashTrainConfig(output_dir=str(tmp_path / name), cached_target_path=str(hidden_cache),
                                              markov_rank=8, distribution_weight=weight, block_size=4, num_anchors=16,
                                              batch_tokens=256, max_steps=2, warmup_steps=1, val_fraction=0.2,
                                              log_every=1, device="cpu", progress=False), log=lambda *_: None)

    soft, hard = run(0.9, "soft"), run(0.0, "hard")
    assert soft.steps == 2 and soft.export_dir is not None
    assert all(map(math.isfinite, (soft.train_loss, soft.val_loss, hard.val_loss)))
    assert abs(soft.val_loss - hard.val_loss) > 1e-3
