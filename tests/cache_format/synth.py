"""Synthetic caches for the cache_format tests: random logits / hidden states, real files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from draftcache.cache_format import CacheWriter, SampleRecord, new_manifest
from draftcache.data.vocab import DraftVocab, count_supervised_tokens

VOCAB = 64  # V
HIDDEN = 16  # H
LAYER_IDS = [1, 3, 5]
AUX = len(LAYER_IDS) * HIDDEN  # F
SEQ_LENGTH = 24
SELECTED = list(range(0, VOCAB, 2))[:20] + [3, 7, 61]  # Vd = 23, unsorted on purpose
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@dataclass
class Sample:
    """One synthetic sample at full precision, UNSHIFTED."""

    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] int64
    aux: torch.Tensor  # [S, F] fp32
    final_hidden: torch.Tensor  # [S, H] fp32
    logits: torch.Tensor  # [S, V] fp32 = final_hidden @ W.T + b


@dataclass
class SynthCache:
    path: Path
    samples: list[Sample]
    vocab: DraftVocab
    weight: torch.Tensor  # [V, H] lm_head
    bias: torch.Tensor  # [V]
    embeddings: torch.Tensor  # [V, H]
    encoding: str
    dtype: str
    topk: int | None


def make_samples(num_samples: int, seed: int = 0, *, weight: torch.Tensor, bias: torch.Tensor) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_samples):
        seq = int(torch.randint(4, SEQ_LENGTH + 1, (1,), generator=gen))
        mask = torch.zeros(seq, dtype=torch.int64)
        start = int(torch.randint(0, seq - 1, (1,), generator=gen))
        mask[start:] = 1  # one contiguous assistant turn
        if i % 3 == 1:
            mask[start + 1 :: 3] = 0  # several runs
        if i % 5 == 2:
            mask[0] = 1  # position 0 supervised: its target has no slot after the shift
        hidden = torch.randn(seq, HIDDEN, generator=gen)
        samples.append(Sample(
            input_ids=torch.randint(0, VOCAB, (seq,), generator=gen),
            loss_mask=mask,
            aux=torch.randn(seq, AUX, generator=gen),
            final_hidden=hidden,
            logits=hidden @ weight.T + bias,
        ))
    return samples


def draft_distribution(logits: torch.Tensor, vocab: DraftVocab) -> torch.Tensor:
    """``[..., Vd]`` float32 softmax over the draft vocabulary (selected ids ascending)."""
    return torch.softmax(logits.float()[..., torch.sort(vocab.selected_token_ids).values], dim=-1)


def topk_rows(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, ids = probs.topk(k, dim=-1)
    return vals / vals.sum(-1, keepdim=True), ids


def make_record(sample: Sample, encoding: str, vocab: DraftVocab, dtype: torch.dtype, topk: int | None) -> SampleRecord:
    rows = sample.loss_mask.bool()
    logits = sample.logits[rows]  # [M, V]
    fields: dict = {}
    hidden_dtype = dtype
    if dtype == torch.float8_e4m3fn:  # float hidden rows (the writer quantizes them), bf16 probabilities
        dtype, hidden_dtype = torch.bfloat16, torch.float32
    if encoding == "probs":
        fields["target_probs"] = draft_distribution(logits, vocab).to(dtype)
    elif encoding == "topk":
        vals, ids = topk_rows(draft_distribution(logits, vocab), topk)
        fields["topk_probs"], fields["topk_ids"] = vals.to(dtype), ids.to(torch.int32)
    else:
        fields["final_hidden"] = sample.final_hidden[rows].to(hidden_dtype)
    return SampleRecord(input_ids=sample.input_ids.to(torch.int32), loss_mask=sample.loss_mask.to(torch.uint8),
                        aux_hidden_states=sample.aux.to(hidden_dtype), target_argmax=logits.argmax(-1), **fields)


def manifest_for(samples: list[Sample], *, encoding: str = "probs", dtype: str = "fp32", shard_size: int = 4,
                 topk: int | None = None, selected=SELECTED, num_samples: int | None = None) -> dict:
    counts = torch.zeros(VOCAB, dtype=torch.int64)
    for s in samples:
        count_supervised_tokens(s.input_ids, s.loss_mask, VOCAB, counts)
    return new_manifest(
        target={"model_id": "tiny/llama", "fingerprint": "f" * 64, "config_fingerprint": "c" * 64,
                "architecture": "LlamaForCausalLM", "hidden_size": HIDDEN, "vocab_size": VOCAB, "num_layers": 8,
                "torch_dtype": "float32"},
        tokenizer={"name_or_path": "tiny/llama", "fingerprint": "t" * 64, "chat_template_fingerprint": "x" * 64},
        layer_ids=LAYER_IDS, seq_length=SEQ_LENGTH, dtype=dtype, encoding=encoding, topk=topk,
        selected_token_ids=sorted(selected), token_counts=counts,
        dataset={"input_data": "data.jsonl", "split": None, "shuffle_seed": 42, "num_samples": None,
                 "fingerprint": "d" * 64},
        num_samples=len(samples) if num_samples is None else num_samples, shard_size=shard_size,
    )


def write_cache(path: Path, *, num_samples: int = 10, encoding: str = "probs", dtype: str = "fp32",
                shard_size: int = 4, topk: int | None = None, seed: int = 0) -> SynthCache:
    gen = torch.Generator().manual_seed(1000 + seed)
    weight, bias = torch.randn(VOCAB, HIDDEN, generator=gen), torch.randn(VOCAB, generator=gen)
    embeddings = torch.randn(VOCAB, HIDDEN, generator=gen)
    samples = make_samples(num_samples, seed, weight=weight, bias=bias)
    vocab = DraftVocab.from_selected(SELECTED, VOCAB)
    manifest = manifest_for(samples, encoding=encoding, dtype=dtype, shard_size=shard_size, topk=topk)
    with CacheWriter(path, manifest) as writer:
        for i, sample in enumerate(samples):
            writer.add(i, make_record(sample, encoding, vocab, DTYPES[dtype], topk))
        writer.write_side_file("target_embeddings", {"weight": embeddings})
        if encoding == "hidden":
            writer.write_side_file("lm_head", {"weight": weight, "bias": bias})
    return SynthCache(path, samples, vocab, weight, bias, embeddings, encoding, dtype, topk)


def expected_sample(sample: Sample, vocab: DraftVocab) -> dict[str, torch.Tensor]:
    """The reader's contract at full precision, written out with plain torch ops position by
    position from the full-vocab logits (no draftcache function): slot t holds position t+1's
    token, loss mask and draft-vocab softmax; the last slot and unsupervised slots are zero;
    position_mask says the target's full-vocab argmax at t+1 is in the draft vocabulary."""
    seq = sample.input_ids.numel()
    selected = sorted(int(i) for i in vocab.selected_token_ids)
    out = {
        "input_ids": torch.zeros(seq, dtype=torch.int64),
        "attention_mask": torch.ones(seq, dtype=torch.int64),
        "loss_mask": torch.zeros(seq, dtype=torch.int64),
        "aux_hidden_states": sample.aux,
        "target_probs": torch.zeros(seq, len(selected), dtype=torch.float32),
        "position_mask": torch.zeros(seq, 1, dtype=torch.bool),
    }
    for t in range(seq - 1):
        out["input_ids"][t] = sample.input_ids[t + 1]
        out["loss_mask"][t] = sample.loss_mask[t + 1]
        if int(sample.loss_mask[t + 1]) == 1:
            logits = sample.logits[t + 1].float()  # [V]
            out["target_probs"][t] = torch.softmax(logits[selected], dim=-1)
            out["position_mask"][t, 0] = int(logits.argmax()) in selected
    return out
