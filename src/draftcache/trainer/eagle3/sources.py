"""Where supervision comes from: a precompute cache, or a co-located frozen target (online).

Both sources hand the loop micro-batches with the same keys, already shifted (EAGLE-3
convention): ``input_ids``, ``attention_mask``, ``loss_mask``, ``aux_hidden_states`` and either
``target_probs`` + ``position_mask`` (cache) or ``logits`` (online; the TTT loss projects them with
the same ``compute_target_distribution`` the precompute used), plus ``seq_lens``/``position_ids``/
``doc_remaining`` for packed batches.

Each source also says what it serves (``describe()``: recorded in every checkpoint, compared on
``--resume``) and refuses to serve an incomplete cache unless asked (``check_complete``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from draftcache.cache_format import RESUME_KEY_FIELDS, CacheBatchLoader, open_cache
from draftcache.data.vocab import DraftVocab, select_draft_vocab, special_token_ids, supervised_token_counts
from draftcache.trainer.batching import cache_block_tokens

__all__ = ["CachedSource", "OnlineSource", "TargetInfo", "IncompleteCacheError", "cache_identity_fingerprint"]


class IncompleteCacheError(ValueError):
    """Training was asked to read a cache whose precompute has not finished."""


def _dotted(mapping: Mapping[str, Any], path: str) -> Any:
    value: Any = mapping
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def cache_identity_fingerprint(manifest: Mapping[str, Any]) -> str:
    """sha256 over the manifest fields that fix what every sample holds and in which order
    (``RESUME_KEY_FIELDS``: target, tokenizer, capture, supervision, draft vocabulary, dataset,
    plan); equal for a cache at any stage of its precompute, different for another cache."""
    identity = {path: _dotted(manifest, path) for path in RESUME_KEY_FIELDS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class TargetInfo:
    """What the draft needs to know about its target."""

    model_id: str
    hf_config: dict              # the target's HF config as a dict (for rope, max positions, heads)
    aux_layer_ids: list[int]     # decoder-layer output convention
    hidden_size: int
    vocab_size: int


class CachedSource:
    """Micro-batches read from a precompute cache (no target in memory)."""

    def __init__(self, path: str, *, draft_vocab_size: int | None = None, num_workers: int = 0):
        self.path = path
        self.reader = open_cache(path, draft_vocab=draft_vocab_size)
        self.num_workers = num_workers
        m = self.reader.manifest
        t = m["target"]
        self.info = TargetInfo(
            model_id=t["model_id"], hf_config=t.get("config", {}), aux_layer_ids=list(m["capture"]["layer_ids"]),
            hidden_size=int(t["hidden_size"]), vocab_size=int(t["vocab_size"]),
        )
        self.vocab: DraftVocab = self.reader.draft_vocab
        self.lengths = self.reader.sample_lengths().tolist()

    def __len__(self) -> int:
        return len(self.reader)

    def check_complete(self, *, allow_partial: bool = False) -> None:
        """Raise :class:`IncompleteCacheError` when the cache's precompute has not finished (it
        crashed or still runs): training would silently use only its committed prefix."""
        if self.reader.complete or allow_partial:
            return
        total = self.reader.manifest["num_samples"]
        raise IncompleteCacheError(
            f"cache {self.path} is incomplete: {len(self.reader)} of {total} samples are committed (its "
            "precompute-eagle3 run crashed or is still running). Finish it (precompute-eagle3 --resume with the "
            f"same settings), or pass --allow-partial-cache to train on the {len(self.reader)} committed samples."
        )

    def describe(self) -> dict[str, Any]:
        """What this run trains on: the cache, its planned and committed samples, whether it is
        complete, and fingerprints of its target, its dataset and its identity."""
        manifest = self.reader.manifest
        return {
            "kind": "cache",
            "cache_path": str(Path(self.path).resolve()),
            "num_samples": int(manifest["num_samples"]),
            "committed_samples": len(self.reader),
            "complete": bool(self.reader.complete),
            "target_fingerprint": manifest["target"]["fingerprint"],
            "dataset_fingerprint": manifest["dataset"]["fingerprint"],
            "manifest_fingerprint": cache_identity_fingerprint(manifest),
        }

    def target_embeddings(self) -> torch.Tensor:
        return self.reader.target_embeddings()

    def supervised_token_counts(self) -> torch.Tensor:
        """``[V]`` how often each id is a supervised token of the dataset (the manifest's
        ``token_counts``: no shard is read)."""
        return torch.tensor(self.reader.manifest["token_counts"], dtype=torch.int64)

    def special_ids(self) -> list[int]:
        """The tokenizer's bos / eos / pad / unk ids the manifest records."""
        return list(self.reader.manifest.get("draft_vocab", {}).get("special_token_ids") or [])

    def target_lm_head(self) -> torch.Tensor | None:
        return self.reader.target_lm_head()

    def shuffle_block_tokens(self, shuffle: str, world_size: int) -> int | None:
        """``plan_epoch``'s ``shuffle_block_tokens``: ``--shuffle window`` shuffles blocks of about
        one loader window, so each window is read nearly in storage order."""
        return cache_block_tokens(self.reader, shuffle, world_size)

    def loader(self, plan: list[list[int]], packed_tokens: int | None) -> CacheBatchLoader:
        """Raw (stored-representation) batches read by background threads into reused buffers;
        ``supervise`` expands each on the training device before the next one is requested."""
        max_tokens = None if packed_tokens is None else max(packed_tokens, max(self.lengths))
        return CacheBatchLoader(self.path, plan, max_tokens=max_tokens, num_threads=max(2, self.num_workers))

    def supervise(self, raw: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        batch = self.reader.expand_batch(raw, device)
        self.reader.check_finite(raw, batch)  # a NaN/Inf row never reaches the draft
        return batch


class _TokenPlanDataset(Dataset):
    def __init__(self, samples, plan, packed_tokens: int | None, pad_id: int):
        self.samples, self.plan, self.packed_tokens, self.pad_id = samples, plan, packed_tokens, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        docs = [self.samples[i] for i in self.plan[b]]
        ids = [torch.as_tensor(d.input_ids, dtype=torch.long) for d in docs]
        lms = [torch.as_tensor(d.loss_mask, dtype=torch.long) for d in docs]
        if self.packed_tokens is not None:
            lens = torch.tensor([[len(x) for x in ids]])
            row_ids, row_lm = torch.cat(ids)[None], torch.cat(lms)[None]
            pos = torch.cat([torch.arange(len(x)) for x in ids])[None]
            rem = torch.cat([torch.arange(len(x) - 1, -1, -1) for x in ids])[None]
            return {"input_ids": row_ids, "attention_mask": torch.ones_like(row_ids), "loss_mask": row_lm,
                    "seq_lens": lens, "position_ids": pos, "doc_remaining": rem}
        T = max(len(x) for x in ids)
        out_ids = torch.full((len(docs), T), self.pad_id, dtype=torch.long)
        out_lm = torch.zeros((len(docs), T), dtype=torch.long)
        am = torch.zeros((len(docs), T), dtype=torch.long)
        for r, (x, m) in enumerate(zip(ids, lms)):
            out_ids[r, : len(x)], out_lm[r, : len(x)], am[r, : len(x)] = x, m, 1
        return {"input_ids": out_ids, "attention_mask": am, "loss_mask": out_lm}


class OnlineSource:
    """Micro-batches supervised on the fly by a co-located frozen target."""

    def __init__(self, *, target, tokenizer, samples, model_id: str, draft_vocab_size: int | None,
                 num_workers: int = 0):
        self.target, self.tokenizer, self.samples = target, tokenizer, samples
        self.num_workers = num_workers
        V = target.vocab_size
        counts = supervised_token_counts([s.input_ids for s in samples], [s.loss_mask for s in samples], V)
        self.vocab = select_draft_vocab(counts, draft_vocab_size, special_token_ids(tokenizer))
        cfg = target.model.config
        self.info = TargetInfo(model_id=model_id, hf_config=cfg.to_dict(), aux_layer_ids=list(target.aux_layer_ids),
                               hidden_size=target.hidden_size, vocab_size=V)
        self.lengths = [len(s.input_ids) for s in samples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.samples)

    def check_complete(self, *, allow_partial: bool = False) -> None:
        """Online data is tokenised whole before training: never partial."""

    def describe(self) -> dict[str, Any]:
        """What this run trains on: the target, the number of samples and a fingerprint of their
        tokens and loss masks (another input file or chat template changes it)."""
        digest = hashlib.sha256()
        for s in self.samples:
            ids = torch.as_tensor(s.input_ids, dtype=torch.int64)
            digest.update(len(ids).to_bytes(8, "little"))  # sample boundaries are part of the data
            digest.update(ids.numpy().tobytes())
            digest.update(torch.as_tensor(s.loss_mask, dtype=torch.int64).numpy().tobytes())
        return {"kind": "online", "target_model": self.info.model_id, "num_samples": len(self.samples),
                "samples_fingerprint": digest.hexdigest()}

    def target_embeddings(self) -> torch.Tensor:
        return self.target.get_input_embeddings().weight.detach()

    def supervised_token_counts(self) -> torch.Tensor:
        """``[V]`` how often each id is a supervised token of the samples (one ``bincount``)."""
        return supervised_token_counts([s.input_ids for s in self.samples], [s.loss_mask for s in self.samples],
                                       int(self.target_embeddings().shape[0]))

    def special_ids(self) -> list[int]:
        """The tokenizer's bos / eos / pad / unk ids."""
        return special_token_ids(self.tokenizer)

    def target_lm_head(self) -> torch.Tensor | None:
        return self.target.output_projection()[0].detach()

    def shuffle_block_tokens(self, shuffle: str, world_size: int) -> None:
        """Online batches are computed, not read: every ``--shuffle`` is the global shuffle."""
        return None

    def loader(self, plan: list[list[int]], packed_tokens: int | None) -> DataLoader:
        return DataLoader(_TokenPlanDataset(self.samples, plan, packed_tokens, self.pad_id), batch_size=None,
                          shuffle=False, num_workers=self.num_workers)

    @torch.no_grad()
    def supervise(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = self.target.generate_batch(
            batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            position_ids=batch.get("position_ids"), seq_lens=batch.get("seq_lens"),
            doc_remaining=batch.get("doc_remaining"),
        )
        return out.to_trainer_inputs()
