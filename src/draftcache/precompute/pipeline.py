"""The precompute loop: tokenise once, pick the draft vocabulary, run the frozen target shard by
shard, and hand unpadded records to the background shard writer.

``run_precompute`` takes already-built components (target wrapper, tokenizer, conversations), so
tests drive it with tiny real objects; the CLI only loads them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import draftcache
from draftcache.cache_format import (
    FORMAT_VERSION,
    CacheLock,
    CacheWriter,
    committed_prefix,
    diff_manifest_config,
    read_manifest,
    remove_stale_temporaries,
    verify_shard,
    RESUME_KEY_FIELDS,
)
from draftcache.data import (
    ChatTokenizer,
    ConversationSet,
    DraftVocab,
    build_draft_vocab,
    count_supervised_tokens,
    full_vocab,
    tokenize_all,
)
from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.precompute.fingerprint import (
    chat_template_fingerprint,
    config_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from draftcache.precompute.planning import ShardPlan, length_bucketed_batches, plan_shards
from draftcache.precompute.records import STORAGE_DTYPES, SupervisionSpec, batch_to_records
from draftcache.target import HFEagle3TargetModel

__all__ = ["run_precompute", "PrecomputeSummary", "PrecomputeError", "check_output_dir"]

# Config keys of final-logit transforms the ``hidden`` rebuild (a plain linear lm_head) cannot reproduce.
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


class PrecomputeError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class PrecomputeSummary:
    output_dir: str
    encoding: str
    num_samples: int = 0
    num_tokens: int = 0
    num_supervised: int = 0
    bytes_written: int = 0
    wall_seconds: float = 0.0
    resumed_from_sample: int = 0
    padding_fraction: float = 0.0
    skipped: dict = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_written / max(1, self.num_tokens)

    def format(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [
            f"cache       {self.output_dir}",
            f"encoding    {self.encoding}",
            f"samples     {self.num_samples}" + (f" (resumed at sample {self.resumed_from_sample})"
                                                 if self.resumed_from_sample else ""),
            f"tokens      {self.num_tokens} ({self.num_supervised} supervised)",
            f"skipped     {skipped}",
            f"written     {self.bytes_written / 1e6:.2f} MB, {self.bytes_per_token:.1f} bytes/token",
            f"padding     {100 * self.padding_fraction:.1f}% of forward slots",
            f"wall time   {self.wall_seconds:.1f} s",
        ]
        return "\n".join(lines)


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """Refuse to overwrite an existing cache; with ``resume`` require one to continue."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"--output-dir {out} exists and is not a directory; choose another path")
    has_content = out.is_dir() and any(p.name != ".lock" for p in out.iterdir())
    if has_content and not resume:
        what = "a cache" if (out / "manifest.json").exists() else "files"
        raise PrecomputeError(
            f"--output-dir {out} already holds {what}; pass --resume to continue it, or choose an empty directory"
        )


def _special_ids(tokenizer) -> list[int]:
    ids = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")]
    return [int(i) for i in ids if i is not None]


def _hidden_rebuild_problem(target: HFEagle3TargetModel, logits, final_hidden, loss_mask) -> str | None:
    """Why the lm_head input cannot reproduce this target's logits, or None when it can."""
    config = getattr(target.model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _LOGIT_TRANSFORM_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in (None, 0, 0.0, 1, 1.0):
                return f"its config sets {key}={value}, a final logit transform the rebuild does not apply"
    weight, bias = target.output_projection()
    sup = loss_mask.bool()
    real = logits[sup].float()
    rebuilt = final_hidden[sup].float() @ weight.float().T
    if bias is not None:
        rebuilt = rebuilt + bias.float()
    scale = float(real.abs().max().clamp_min(1.0)) if real.numel() else 1.0
    tol = (1e-4 if logits.dtype == torch.float32 else 2e-2) * scale
    err = float((rebuilt - real).abs().max()) if real.numel() else 0.0
    if err > tol:
        return f"logits rebuilt from the lm_head input differ from the real logits by {err:.3g} (tolerance {tol:.3g})"
    return None


def _pad_batch(samples, indices, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    lengths = [len(samples[i].input_ids) for i in indices]
    T = max(lengths)
    ids = torch.full((len(indices), T), pad_id, dtype=torch.long)
    lm = torch.zeros((len(indices), T), dtype=torch.long)
    am = torch.zeros((len(indices), T), dtype=torch.long)
    for row, i in enumerate(indices):
        n = lengths[row]
        ids[row, :n] = torch.as_tensor(samples[i].input_ids)
        lm[row, :n] = torch.as_tensor(samples[i].loss_mask)
        am[row, :n] = 1
    return ids.to(device), am.to(device), lm.to(device), lengths


def _choose_encoding(cfg: PrecomputeConfig, target, samples, vocab: DraftVocab, device, log) -> tuple[str, str | None]:
    """Resolve ``auto``/``hidden`` with one probe forward; returns (encoding, reason for the choice)."""
    request = cfg.encoding_request
    if request in ("probs", "topk"):
        return request, None
    probe = list(range(min(cfg.batch_size, len(samples))))
    ids, am, lm, _ = _pad_batch(samples, probe, 0, device)
    out = target.forward_capture(ids, am, capture_final_hidden=True)
    problem = _hidden_rebuild_problem(target, out.logits, out.final_hidden, lm)
    if request == "hidden":
        if problem:
            raise PrecomputeError(
                f"--supervision hidden refused for this target: {problem}. "
                "Use --supervision probs (or topk) to store the exact target distribution instead."
            )
        return "hidden", None
    if problem:
        return "probs", f"auto: hidden encoding not exact ({problem})"
    if target.hidden_size < vocab.size:
        return "hidden", f"auto: hidden size {target.hidden_size} < draft vocab {vocab.size} and logits rebuild exactly"
    return "probs", f"auto: draft vocab {vocab.size} <= hidden size {target.hidden_size}"


def _build_manifest(cfg, *, target, tokenizer, conversations, model_id, vocab, counts, encoding,
                    num_samples, skipped) -> dict:
    model = target.model
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "draftcache", "version": draftcache.__version__},
        "kind": "eagle3",
        "complete": False,
        "target": {
            "model_id": model_id,
            "fingerprint": model_fingerprint(model),
            "config_fingerprint": config_fingerprint(model.config),
            "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
            "hidden_size": target.hidden_size,
            "vocab_size": target.vocab_size,
            "num_layers": target.num_layers,
            "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "config": json.loads(model.config.to_json_string(use_diff=False)),
        },
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template_fingerprint": chat_template_fingerprint(tokenizer),
        },
        "capture": {
            "layer_ids": list(target.aux_layer_ids),
            "convention": "decoder_layer_output",
            "hf_hidden_states_index": [i + 1 for i in target.aux_layer_ids],
            "shift": "left_by_one",
        },
        "seq_length": cfg.seq_length,
        "dtype": cfg.dtype,
        "supervision": {"encoding": encoding, "topk": cfg.target_probs_topk if encoding == "topk" else None},
        "draft_vocab": {"size": vocab.size, "selected_token_ids": vocab.selected_token_ids.tolist()},
        "token_counts": counts.tolist(),
        "dataset": {**conversations.identity(), "skipped": dict(skipped)},
        "num_samples": num_samples,
        "shard_size": cfg.shard_size,
        "num_shards": -(-num_samples // cfg.shard_size),
        "files": {},
        "shards": [],
        "stats": {"num_tokens": 0, "num_supervised": 0},
    }


def _prepare_resume(out: Path, manifest: dict, log) -> dict:
    """Check the old manifest against the new config, drop unverifiable shards; return the manifest to continue."""
    old = read_manifest(out)
    differences = diff_manifest_config(old, manifest, RESUME_KEY_FIELDS)
    if differences:
        raise PrecomputeError(
            f"--resume refused: the cache in {out} was made with a different configuration:\n  - "
            + "\n  - ".join(differences)
            + "\nRerun with the original settings, or write a new cache to another --output-dir."
        )
    for name in remove_stale_temporaries(out):
        log(f"resume: removed stale temporary {name}")
    kept = []
    for entry in sorted(old["shards"], key=lambda e: e["index"]):
        problems = verify_shard(out, entry)
        if problems:
            log(f"resume: shard {entry['file']} is damaged ({'; '.join(problems)}); it will be rewritten")
            continue
        kept.append(entry)
    for name, entry in old.get("files", {}).items():
        manifest["files"][name] = entry
    manifest["shards"] = kept
    manifest["stats"] = {
        "num_tokens": sum(e["num_tokens"] for e in kept),
        "num_supervised": sum(e["num_supervised"] for e in kept),
    }
    return manifest


@torch.no_grad()
def run_precompute(
    cfg: PrecomputeConfig,
    *,
    target: HFEagle3TargetModel,
    tokenizer,
    conversations: ConversationSet,
    model_id: str,
    log=print,
) -> PrecomputeSummary:
    """Write (or continue) the cache at ``cfg.output_dir``. Returns what was done."""
    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.resume)
    out.mkdir(parents=True, exist_ok=True)
    device = next(target.model.parameters()).device
    storage = STORAGE_DTYPES[cfg.dtype]

    with CacheLock(out):
        skipped = conversations.skipped
        samples = tokenize_all(conversations, ChatTokenizer(tokenizer, cfg.seq_length), skipped, strict=cfg.strict,
                               progress=cfg.progress)
        if not samples:
            raise PrecomputeError(
                f"no usable conversations in {conversations.identity().get('input_data')!r} "
                f"(skipped: {skipped.as_dict() or 'none'}); check the input format"
            )
        V = target.vocab_size
        counts = torch.zeros(V, dtype=torch.int64)
        for s in samples:
            count_supervised_tokens(torch.as_tensor(s.input_ids), torch.as_tensor(s.loss_mask), V, counts)
        if cfg.draft_vocab_size is None:
            vocab = full_vocab(V)
        else:
            if cfg.draft_vocab_size > V:
                raise ConfigError(f"--draft-vocab-size {cfg.draft_vocab_size} exceeds the target vocabulary ({V})")
            vocab = build_draft_vocab(counts, cfg.draft_vocab_size, _special_ids(tokenizer))
        if cfg.target_probs_topk > vocab.size:
            raise ConfigError(f"--target-probs-topk {cfg.target_probs_topk} exceeds the draft vocabulary ({vocab.size})")

        encoding, why = _choose_encoding(cfg, target, samples, vocab, device, log)
        if why:
            log(why)
        manifest = _build_manifest(cfg, target=target, tokenizer=tokenizer, conversations=conversations,
                                   model_id=model_id, vocab=vocab, counts=counts, encoding=encoding,
                                   num_samples=len(samples), skipped=skipped.as_dict())
        if cfg.resume and (out / "manifest.json").exists():
            manifest = _prepare_resume(out, manifest, log)
        start = committed_prefix(manifest)
        summary = PrecomputeSummary(output_dir=str(out), encoding=encoding, resumed_from_sample=start,
                                    skipped=skipped.as_dict())
        spec = SupervisionSpec(encoding=encoding, vocab=vocab, dtype=storage,
                               topk=cfg.target_probs_topk if encoding == "topk" else None)

        writer = CacheWriter(out, manifest)
        if "target_embeddings" not in manifest["files"]:
            writer.write_side_file("target_embeddings", {"weight": target.get_input_embeddings().weight.detach()
                                                         .to("cpu", storage).contiguous()})
        if encoding == "hidden" and "lm_head" not in manifest["files"]:
            weight, bias = target.output_projection()
            side = {"weight": weight.detach().to("cpu").contiguous()}
            if bias is not None:
                side["bias"] = bias.detach().to("cpu").contiguous()
            writer.write_side_file("lm_head", side)

        plans = [p for p in plan_shards(len(samples), cfg.shard_size) if p.stop > start]
        total_tokens = sum(len(s.input_ids) for s in samples[start:])
        bar = tqdm(total=len(samples), initial=start, unit="sample", desc="precompute", disable=not cfg.progress)
        slots = real = 0
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            for plan in plans:
                s_slots, s_real = _run_shard(plan, samples, target, spec, writer, pad_id, device, cfg.batch_size,
                                             summary, bar, t0)
                slots += s_slots
                real += s_real
            writer.close(complete=True)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        summary.padding_fraction = 0.0 if slots == 0 else 1.0 - real / slots
        summary.bytes_written = writer.bytes_written
        summary.wall_seconds = time.perf_counter() - t0
        del total_tokens
        return summary


def _run_shard(plan: ShardPlan, samples, target, spec, writer, pad_id, device, batch_size, summary, bar, t0):
    """Forward one shard's samples in length-bucketed batches; add them to the writer in global order."""
    shard_samples = samples[plan.first_sample : plan.stop]
    lengths = [len(s.input_ids) for s in shard_samples]
    batches = length_bucketed_batches(lengths, batch_size)
    done: dict[int, dict] = {}
    pending = None  # (event, indices, records): the previous batch, whose host copy may still be in flight
    slots = 0
    for indices in batches:
        ids, am, lm, lens = _pad_batch(shard_samples, indices, pad_id, device)
        out = target.forward_capture(ids, am, capture_final_hidden=spec.encoding == "hidden")
        records = batch_to_records(logits=out.logits, aux_hidden_states=out.aux_hidden_states,
                                   final_hidden=out.final_hidden, input_ids=ids, loss_mask=lm, lengths=lens,
                                   spec=spec)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        slots += ids.numel()
        if pending is not None:
            _finish(pending, done)
        pending = (event, indices, records)
        del out
    if pending is not None:
        _finish(pending, done)
    next_global = plan.first_sample
    for local in range(plan.num_samples):
        rec = done.pop(local)
        writer.add(plan.first_sample + local, rec)
        n = int(rec["input_ids"].numel())
        summary.num_samples += 1
        summary.num_tokens += n
        summary.num_supervised += int(rec["target_argmax"].numel())
        next_global += 1
    bar.update(plan.num_samples)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix(tok_s=f"{summary.num_tokens / elapsed:.0f}", written=f"{writer.bytes_written / 1e6:.1f}MB")
    return slots, sum(lengths)


def _finish(pending, done: dict) -> None:
    event, indices, records = pending
    if event is not None:
        event.synchronize()
    for i, rec in zip(indices, records):
        done[i] = rec
