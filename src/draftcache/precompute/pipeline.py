"""The precompute loop: pick the draft vocabulary and the encoding, run the frozen target shard by
shard, and hand unpadded records to the background shard writer.

``run_precompute`` takes already-built components (target wrapper, tokenizer, conversations and
their tokenized samples), so tests drive it with tiny real objects; ``main.py`` only loads them.

Order of work, cheapest and most likely to fail first: settings, output directory, draft
vocabulary, encoding (one probe forward), manifest; only then is the directory created and
locked, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import draftcache
from draftcache.cache_format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    RESUME_KEY_FIELDS,
    CacheLock,
    CacheWriter,
    committed_prefix,
    diff_manifest_config,
    read_manifest,
    remove_stale_temporaries,
    shard_filename,
    verify_shard,
)
from draftcache.cache_format.manifest import shard_stats
from draftcache.cache_format.resume import committed_shards, journal_files
from draftcache.cache_format.schema import storage_dtype
from draftcache.data import (
    ChatTokenizer,
    ConversationSet,
    DraftVocab,
    TokenizedSample,
    build_draft_vocab,
    count_supervised_tokens,
    full_vocab,
    set_chat_template,
    tokenize_all,
)
from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.precompute.distributed import DistContext, all_reduce_sum, run_step
from draftcache.precompute.engines import engine_info, weights_fingerprint
from draftcache.precompute.fingerprint import (
    chat_template_fingerprint,
    config_fingerprint,
    tokenizer_fingerprint,
)
from draftcache.precompute.planning import ShardPlan, length_bucketed_batches, plan_shards
from draftcache.precompute.records import SupervisionSpec, batch_to_records
from draftcache.target import HFEagle3TargetModel, TargetForward

__all__ = ["run_precompute", "tokenize_conversations", "check_output_dir", "needs_sharded_resume", "PrecomputeSummary",
           "PrecomputeError"]

# Config keys of final-logit transforms the ``hidden`` rebuild (a plain linear lm_head) cannot reproduce.
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")

# The flag behind each manifest field a resumed run must match, named in the refusal.
_FIELD_FLAGS = {
    "target.fingerprint": "--target-model weights",
    "target.engine.name": "--engine",
    "target.config_fingerprint": "--target-model config",
    "tokenizer.fingerprint": "--target-model tokenizer",
    "tokenizer.chat_template_fingerprint": "--target-model chat template",
    "capture.layer_ids": "--aux-layer-ids",
    "seq_length": "--seq-length",
    "dtype": "--dtype",
    "supervision.encoding": "--supervision",
    "supervision.topk": "--target-probs-topk",
    "draft_vocab.selected_token_ids": "--draft-vocab-size",
    "dataset.input_data": "--input-data",
    "dataset.split": "--split",
    "dataset.shuffle_seed": "--shuffle-seed",
    "dataset.num_samples": "--num-samples",
    "dataset.fingerprint": "--input-data contents",
    "shard_size": "--shard-size",
    "num_samples": "number of usable samples",
}


class PrecomputeError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class PrecomputeSummary:
    """What a run left in the cache (totals over all committed shards) and what this run did."""

    output_dir: str
    encoding: str
    dtype: str
    draft_vocab_size: int
    num_samples: int                 # samples in the cache
    num_tokens: int                  # real tokens in the cache
    num_supervised: int              # supervised positions in the cache
    cache_bytes: int                 # shards + side files, as the manifest records them
    computed_samples: int            # samples this run computed (fewer than num_samples after --resume)
    computed_tokens: int
    resumed_from_sample: int         # 0 for a fresh run
    bytes_written: int               # bytes this run wrote
    wall_seconds: float
    padding_fraction: float          # share of this run's forward token slots spent on padding
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_turns: int = 0           # turns before the first user turn removed from the records read
    dropped_turn_records: int = 0    # records that lost such turns

    @classmethod
    def from_manifest(cls, manifest: dict, *, output_dir, encoding: str, dtype: str, draft_vocab_size: int,
                      computed_samples: int, computed_tokens: int, slots: int, resumed_from_sample: int,
                      bytes_written: int, wall_seconds: float, skipped: dict) -> "PrecomputeSummary":
        """Cache totals from the final manifest (and the dropped-turn counts of its ``dataset``
        section) plus what this run did (``slots``: forward token slots)."""
        files = list(manifest["shards"]) + list(manifest["files"].values())
        dropped = manifest["dataset"].get("dropped_leading_turns") or {}
        return cls(
            output_dir=str(output_dir), encoding=encoding, dtype=dtype, draft_vocab_size=draft_vocab_size,
            num_samples=manifest["num_samples"], num_tokens=manifest["stats"]["num_tokens"],
            num_supervised=manifest["stats"]["num_supervised"], cache_bytes=sum(e["bytes"] for e in files),
            computed_samples=computed_samples, computed_tokens=computed_tokens,
            resumed_from_sample=resumed_from_sample, bytes_written=bytes_written, wall_seconds=wall_seconds,
            padding_fraction=0.0 if slots == 0 else 1.0 - computed_tokens / slots, skipped=skipped,
            dropped_turns=int(dropped.get("turns", 0)), dropped_turn_records=int(dropped.get("records", 0)),
        )

    @property
    def bytes_per_token(self) -> float:
        return self.cache_bytes / max(1, self.num_tokens)

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        skipped_text = (f"{skipped} records: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
                        if skipped else "none")
        dropped_text = "none"
        if self.dropped_turns:
            turns, records = self.dropped_turns, self.dropped_turn_records
            dropped_text = (f"{turns} turn{'s' * (turns != 1)} before the first user turn, in "
                            f"{records} record{'s' * (records != 1)}")
        this_run = f"computed {self.computed_samples} now"
        if self.resumed_from_sample:
            this_run += f", resumed at sample {self.resumed_from_sample}"
        rate = self.computed_tokens / max(self.wall_seconds, 1e-9)
        return "\n".join([
            f"cache       {self.output_dir}",
            f"encoding    {self.encoding}, dtype {self.dtype}, draft vocab {self.draft_vocab_size}",
            f"samples     {self.num_samples} ({this_run})",
            f"tokens      {self.num_tokens} ({self.num_supervised} supervised)",
            f"skipped     {skipped_text}",
            f"dropped     {dropped_text}",
            f"disk        {self.cache_bytes / 1e6:.2f} MB, {self.bytes_per_token:.1f} bytes/token "
            f"({self.bytes_written / 1e6:.2f} MB written now)",
            f"padding     {100 * self.padding_fraction:.1f}% of forward slots",
            f"wall time   {self.wall_seconds:.1f} s ({rate:.0f} tokens/s)",
        ])


def tokenize_conversations(cfg: PrecomputeConfig, tokenizer, conversations: ConversationSet) -> list[TokenizedSample]:
    """Render and tokenize conversations, truncated to ``cfg.seq_length``, until ``cfg.num_samples``
    samples survive (all when None), in ``cfg.num_workers`` processes.

    ``cfg.chat_template`` (when set) is first made the tokenizer's template, so the manifest
    ``run_precompute`` writes fingerprints the template actually used. A lazily loaded
    ``conversations`` is read only as far as needed, so its skip counts describe exactly the
    records read. Refused conversations are counted in ``conversations.skipped`` (or, with
    ``cfg.strict``, the first raises ``BadRecordError`` naming its file and line); a template that
    fails the start-up probe or refuses every conversation raises ``ChatTemplateError``.
    """
    set_chat_template(tokenizer, cfg.chat_template)
    return tokenize_all(conversations, ChatTokenizer(tokenizer, cfg.seq_length), conversations.skipped,
                        strict=cfg.strict, progress=cfg.progress, limit=cfg.num_samples, num_workers=cfg.num_workers)


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """Refuse a directory another live precompute holds (naming its pid), a non-empty directory
    without ``resume``, and with ``resume`` a non-empty directory that is not a cache.

    Cheap and side-effect free apart from removing a stale lock, so it runs before any model loads.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"--output-dir {out} exists and is not a directory; choose another path")
    if not out.is_dir():
        return
    lock = CacheLock(out)
    if lock.path.exists():
        with lock:  # raises CacheLockedError naming the owner while it runs; a dead owner's lock is removed
            pass
    _check_contents(out, resume)


def _check_contents(out: Path, resume: bool) -> None:
    entries = sorted(p.name for p in out.iterdir() if p.name != CacheLock(out).path.name)
    if not entries:
        return
    if not resume:
        what = "a cache" if MANIFEST_FILE in entries else f"{len(entries)} file(s) ({', '.join(entries[:3])})"
        raise PrecomputeError(f"--output-dir {out} already holds {what}; pass --resume to continue it, or choose an "
                              "empty directory")
    if MANIFEST_FILE not in entries:
        raise PrecomputeError(f"--resume: {out} holds {', '.join(entries[:3])} but no {MANIFEST_FILE}, so it is not a "
                              "draftcache cache; choose an empty --output-dir (or empty this one)")


@torch.no_grad()
def run_precompute(
    cfg: PrecomputeConfig,
    *,
    target: HFEagle3TargetModel,
    tokenizer,
    conversations: ConversationSet,
    samples: Sequence[TokenizedSample],
    model_id: str,
    log: Callable[[str], None] = print,
    dist: DistContext | None = None,
) -> PrecomputeSummary:
    """Write (or with ``cfg.resume`` continue) the cache at ``cfg.output_dir``.

    Args:
        target: the frozen target; its device and dtype are used as they are.
        tokenizer: the target's tokenizer (fingerprinted, special ids kept in the draft vocabulary).
        conversations: the loaded input (its identity and skip counts go into the manifest).
        samples: ``tokenize_conversations(cfg, tokenizer, conversations)``, in global order
            (the same on every rank).
        model_id: what the manifest names the target (HF name or path).
        dist: this rank's place in a ``torchrun`` job whose process group is joined (see
            ``draftcache.precompute.distributed``); None for one process. Every rank must call
            ``run_precompute`` with the same arguments; each writes its share of the shards and
            rank 0 the manifest, so the cache equals a one-process run's.
    """
    ctx = dist or DistContext()
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    log = log if ctx.is_main else (lambda message: None)

    def check() -> None:
        cfg.validate()
        if not samples:
            raise PrecomputeError(f"no usable samples in {conversations.input_data!r} "
                                  f"({conversations.skipped.summary()}); check the input format")
        if ctx.is_main:
            check_output_dir(out, cfg.resume)
        problems = cfg.target_problems(num_layers=target.num_layers, vocab_size=target.vocab_size)
        if cfg.aux_layer_ids is not None and list(cfg.aux_layer_ids) != target.aux_layer_ids:
            problems.append(f"--aux-layer-ids {list(cfg.aux_layer_ids)} but the target captures "
                            f"{target.aux_layer_ids}; build HFEagle3TargetModel with the same ids")
        if problems:
            raise ConfigError("invalid precompute settings for this target:\n  - " + "\n  - ".join(problems))

    run_step(ctx, "checking the settings", check)
    # each rank counts a disjoint part of the samples; the sum is the one-process count
    counts = all_reduce_sum(ctx, _supervised_token_counts(samples, target.vocab_size, ctx))  # [V] int64

    def plan() -> tuple[dict, SupervisionSpec]:
        if cfg.draft_vocab_size is None:
            vocab = full_vocab(target.vocab_size)
        else:
            vocab = build_draft_vocab(counts, cfg.draft_vocab_size, _special_ids(tokenizer))
        encoding, why, probe = _choose_encoding(cfg, target, samples, vocab, _pad_id(tokenizer))
        if why:
            log(why)
        manifest = _build_manifest(cfg, target=target, tokenizer=tokenizer, conversations=conversations,
                                   model_id=model_id, vocab=vocab, counts=counts, encoding=encoding,
                                   num_samples=len(samples))
        spec = SupervisionSpec(encoding=encoding, vocab=vocab, dtype=storage_dtype(cfg.dtype),
                               topk=cfg.target_probs_topk if encoding == "topk" else None)
        return manifest, spec, probe

    manifest, spec, probe = run_step(ctx, "choosing the draft vocabulary and encoding", plan)

    if ctx.is_distributed or (cfg.resume and needs_sharded_resume(out)):
        from draftcache.precompute.sharded import write_cache_sharded

        return write_cache_sharded(cfg, ctx, out, manifest, spec, target, tokenizer, samples, conversations, t0, log,
                                   probe=probe)
    created = not out.exists()
    try:
        with CacheLock(out):
            _check_contents(out, cfg.resume)  # again, now that no other writer can change it
            if (out / MANIFEST_FILE).exists():
                manifest = _prepare_resume(out, manifest, log)
            return _write_cache(cfg, out, manifest, spec, target, tokenizer, samples, conversations, t0, probe=probe)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # this run created the directory and wrote nothing into it


def needs_sharded_resume(out: Path) -> bool:
    """Whether resuming ``out`` needs the sharded path even in one process: a distributed run left
    commit journals, or its manifest lists shards after a gap (which the sequential writer drops)."""
    if not (out / MANIFEST_FILE).is_file():
        return False
    if journal_files(out):
        return True
    try:
        shards = read_manifest(out)["shards"]
    except (OSError, ValueError, KeyError):
        return False  # the sequential path reports an unreadable manifest
    return len(committed_shards({"shards": shards})) != len(shards)


def _supervised_token_counts(samples: Sequence[TokenizedSample], vocab_size: int,
                             ctx: DistContext | None = None) -> torch.Tensor:
    """``[V]`` int64 counts of supervised target tokens over this rank's samples (every
    ``world_size``-th one from ``rank``; all of them for one process)."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    counts = torch.zeros(vocab_size, dtype=torch.int64)  # [V]
    for s in samples[rank::world]:
        count_supervised_tokens(s.input_ids, s.loss_mask, vocab_size, counts)
    return counts


def _special_ids(tokenizer) -> list[int]:
    ids = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")]
    return [int(i) for i in ids if i is not None]


def _logit_transform_in_config(target: HFEagle3TargetModel) -> str | None:
    """A config key naming a final logit transform the ``hidden`` rebuild does not apply, or None."""
    config = getattr(target.model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _LOGIT_TRANSFORM_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in (None, 0, 0.0, 1, 1.0):
                return f"its config sets {key}={value}, a final logit transform the rebuild does not apply"
    return None


_REBUILD_CHECK_ROWS = 256  # supervised rows compared; a transform the rebuild misses shows on any of them


@dataclass
class _Probe:
    """The forward that decided the encoding: the first length-bucketed batch of shard 0, kept so
    that shard 0 reuses it instead of computing it twice (``indices`` are positions in shard 0)."""

    indices: list[int]
    out: TargetForward


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _rebuild_error(target: HFEagle3TargetModel, samples: Sequence[TokenizedSample], cfg: PrecomputeConfig,
                   pad_id: int) -> tuple[str | None, _Probe]:
    """Run shard 0's first batch and compare ``final_hidden @ W.T (+ b)`` with the real logits at
    supervised positions; (a description of the mismatch or None, the probe forward for reuse)."""
    first = plan_shards(len(samples), cfg.shard_size)[0]
    shard_samples = samples[first.first_sample : first.stop]
    indices = length_bucketed_batches([len(s.input_ids) for s in shard_samples], cfg.batch_size)[0]
    ids, am, lm, _ = _pad_batch(shard_samples, indices, pad_id, target.model.get_input_embeddings().weight.device)
    out = target.forward_capture(ids, am, capture_final_hidden=True)
    probe = _Probe(indices=list(indices), out=out)
    sup = lm.bool()                                            # [B, T]
    real = out.logits[sup][:_REBUILD_CHECK_ROWS].float()       # [m, V]
    weight, bias = target.output_projection()
    rebuilt = out.final_hidden[sup][:_REBUILD_CHECK_ROWS].float() @ weight.float().T  # [m, V]
    if bias is not None:
        rebuilt = rebuilt + bias.float()
    scale = float(real.abs().max().clamp_min(1.0))
    tol = (1e-4 if out.logits.dtype == torch.float32 else 2e-2) * scale
    err = float((rebuilt - real).abs().max())
    if err > tol:
        return f"logits rebuilt from the lm_head input differ from the real logits by {err:.3g} (tolerance {tol:.3g})", probe
    return None, probe


def _choose_encoding(cfg: PrecomputeConfig, target, samples, vocab: DraftVocab,
                     pad_id: int) -> tuple[str, str | None, _Probe | None]:
    """Resolve ``auto`` / check ``hidden``; returns (encoding, why it was chosen, the probe forward if any)."""
    request = cfg.encoding_request
    if request in ("probs", "topk"):
        return request, None, None
    if request == "auto" and target.hidden_size >= vocab.size:
        return "probs", f"auto: probs, since draft vocab {vocab.size} <= hidden size {target.hidden_size}", None
    problem, probe = _logit_transform_in_config(target), None
    if problem is None:
        problem, probe = _rebuild_error(target, samples, cfg, pad_id)
    if request == "hidden":
        if problem:
            raise PrecomputeError(f"--supervision hidden refused for this target: {problem}, so logits rebuilt at "
                                  "read time would be wrong. Use --supervision probs (or topk) to store the exact "
                                  "target distribution instead.")
        return "hidden", None, probe
    if problem:
        return "probs", f"auto: probs, since the hidden encoding cannot rebuild this target's logits ({problem})", probe
    return "hidden", (f"auto: hidden, since hidden size {target.hidden_size} < draft vocab {vocab.size} and the "
                      "logits rebuild exactly"), probe


def _build_manifest(cfg: PrecomputeConfig, *, target: HFEagle3TargetModel, tokenizer, conversations: ConversationSet,
                    model_id: str, vocab: DraftVocab, counts: torch.Tensor, encoding: str, num_samples: int) -> dict:
    model = target.model
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "draftcache", "version": draftcache.__version__},
        "kind": "eagle3",
        "complete": False,
        "target": {
            "model_id": model_id,
            "fingerprint": weights_fingerprint(target),
            "config_fingerprint": config_fingerprint(model.config),
            "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
            "hidden_size": target.hidden_size,
            "vocab_size": target.vocab_size,
            "num_layers": target.num_layers,
            "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "config": json.loads(model.config.to_json_string(use_diff=False)),
            "engine": engine_info(target),
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
        "dataset": {**conversations.identity(), "skipped": conversations.skipped.as_dict()},
        "num_samples": num_samples,
        "shard_size": cfg.shard_size,
        "num_shards": -(-num_samples // cfg.shard_size),
        "files": {},
        "shards": [],
        "stats": {"num_tokens": 0, "num_supervised": 0},
    }


def _prepare_resume(out: Path, manifest: dict, log, journal_entries: Sequence[dict] = ()) -> dict:
    """Check the cache's manifest against this run's, drop damaged files; return the manifest to continue.

    ``journal_entries`` (shards a distributed run recorded in its commit journals) are verified
    like the manifest's own entries and kept when sound. Nothing is changed on disk when the
    configurations differ.
    """
    old = read_manifest(out)
    differences = []
    for key in RESUME_KEY_FIELDS:
        for line in diff_manifest_config(old, manifest, (key,)):
            differences.append(f"{line}  [{_FIELD_FLAGS[key]}]" if key in _FIELD_FLAGS else line)
    if differences:
        raise PrecomputeError(
            f"--resume refused: the cache in {out} was made with a different configuration "
            f"({len(differences)} field(s) differ, cache value != this run's):\n  - " + "\n  - ".join(differences)
            + "\nRerun with the original settings, or write a new cache to another --output-dir."
        )
    for name in remove_stale_temporaries(out):
        log(f"resume: removed stale temporary {name}")
    kept, seen = [], set()
    for entry in [*sorted(old["shards"], key=lambda e: e["index"]), *journal_entries]:
        if entry["index"] in seen:
            continue
        problems = _entry_problems(entry, manifest) or verify_shard(out, entry)
        if problems:
            log(f"resume: {'; '.join(problems)}; the shard will be computed again")
        else:
            kept.append(entry)
            seen.add(entry["index"])
    kept.sort(key=lambda e: e["index"])
    for name, entry in old["files"].items():  # in the order they were written
        problems = verify_shard(out, entry)
        if problems:
            # this one and those after it are written again, in the same order as in a fresh run,
            # so the manifest comes out identical
            log(f"resume: {'; '.join(problems)}; side files from {entry['file']} on will be written again")
            break
        manifest["files"][name] = entry
    manifest["shards"] = kept  # the writer keeps the contiguous prefix and recomputes the rest
    manifest["stats"] = shard_stats(kept)
    return manifest


def _entry_problems(entry: dict, manifest: dict) -> list[str]:
    """Problems with a shard entry's place in this run's layout (not its file; see ``verify_shard``)."""
    index, size, total = entry.get("index"), manifest["shard_size"], manifest["num_samples"]
    if not isinstance(index, int) or not 0 <= index < manifest["num_shards"]:
        return [f"shard entry {entry.get('file')!r}: index {index!r} is outside this cache's "
                f"{manifest['num_shards']} shards"]
    expected = (shard_filename(index), index * size, min(size, total - index * size))
    found = (entry.get("file"), entry.get("first_sample"), entry.get("num_samples"))
    if found != expected:
        return [f"shard entry {index}: (file, first_sample, num_samples) = {found}, expected {expected}"]
    return []


def _write_cache(cfg, out: Path, manifest: dict, spec: SupervisionSpec, target: HFEagle3TargetModel, tokenizer,
                 samples: Sequence[TokenizedSample], conversations: ConversationSet, t0: float,
                 probe: _Probe | None = None) -> PrecomputeSummary:
    start = committed_prefix(manifest)
    plans = [p for p in plan_shards(len(samples), cfg.shard_size) if p.first_sample >= start]
    device = target.model.get_input_embeddings().weight.device
    pad_id = _pad_id(tokenizer)
    progress = _Progress(len(samples), start, cfg.progress)

    writer = CacheWriter(out, manifest)
    try:
        _write_side_files(writer, manifest, target, spec)
        for plan in plans:
            records = _forward_shard(plan, samples, target, spec, pad_id, device, cfg.batch_size, progress, writer,
                                     probe=probe)
            for local, record in enumerate(records):  # global order, as the writer requires
                writer.add(plan.first_sample + local, record)
        writer.close(complete=True)
    except BaseException:
        writer.abort()  # full shards already queued are still committed; --resume continues after them
        raise
    finally:
        progress.close()

    return PrecomputeSummary.from_manifest(
        writer.manifest, output_dir=out, encoding=spec.encoding, dtype=cfg.dtype, draft_vocab_size=spec.vocab.size,
        computed_samples=len(samples) - start, computed_tokens=progress.tokens, slots=progress.slots,
        resumed_from_sample=start, bytes_written=writer.bytes_written, wall_seconds=time.perf_counter() - t0,
        skipped=conversations.skipped.as_dict(),
    )


def _write_side_files(writer: CacheWriter, manifest: dict, target: HFEagle3TargetModel, spec: SupervisionSpec) -> None:
    """``target_embeddings`` (storage dtype) and, for ``hidden``, ``lm_head`` (the target's own dtype,
    so read-time logits use exactly its weights); skipped when a resumed cache already has them."""
    if "target_embeddings" not in manifest["files"]:
        weight = target.get_input_embeddings().weight.detach()  # [V, H]
        writer.write_side_file("target_embeddings", {"weight": weight.to("cpu", spec.dtype).contiguous()})
    if spec.encoding == "hidden" and "lm_head" not in manifest["files"]:
        weight, bias = target.output_projection()  # [V, H], [V] | None
        tensors = {"weight": weight.detach().to("cpu").contiguous()}
        if bias is not None:
            tensors["bias"] = bias.detach().to("cpu").contiguous()
        writer.write_side_file("lm_head", tensors)


def _pad_batch(samples: Sequence[TokenizedSample], indices: list[int], pad_id: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]`` on ``device`` and the real lengths."""
    lengths = [len(samples[i].input_ids) for i in indices]
    ids = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)  # [B, T]
    lm = torch.zeros_like(ids)                                                 # [B, T]; padding 0
    am = torch.zeros_like(ids)                                                 # [B, T]
    for row, i in enumerate(indices):
        n = lengths[row]
        ids[row, :n] = samples[i].input_ids
        lm[row, :n] = samples[i].loss_mask
        am[row, :n] = 1
    return ids.to(device), am.to(device), lm.to(device), lengths


def _forward_shard(plan: ShardPlan, samples, target: HFEagle3TargetModel, spec: SupervisionSpec, pad_id: int,
                   device: torch.device, batch_size: int, progress: "_Progress", writer: CacheWriter,
                   probe: _Probe | None = None) -> list[dict]:
    """Run one shard's samples through the target in length-bucketed batches; return their records
    in shard order. At most one shard of records is held here (``shard_size`` bounds host memory)."""
    shard_samples = samples[plan.first_sample : plan.stop]
    lengths = [len(s.input_ids) for s in shard_samples]
    records: list[dict | None] = [None] * plan.num_samples
    pending = None  # (event, indices, records) of the previous batch, whose device-to-host copy may be in flight
    reuse = probe if probe is not None and plan.index == 0 else None
    for indices in length_bucketed_batches(lengths, batch_size):
        ids, am, lm, lens = _pad_batch(shard_samples, indices, pad_id, device)
        if reuse is not None and list(indices) == reuse.indices:
            out, reuse = reuse.out, None  # the encoding probe already ran exactly this batch
        else:
            out = target.forward_capture(ids, am, capture_final_hidden=spec.encoding == "hidden")
        batch = batch_to_records(logits=out.logits, aux_hidden_states=out.aux_hidden_states,
                                 final_hidden=out.final_hidden, input_ids=ids, loss_mask=lm, lengths=lens, spec=spec)
        event = None
        if device.type == "cuda":
            # Wait for this batch's copies only after the next forward has been queued, so the
            # copies overlap it; the last batch of the shard is waited for after the loop.
            event = torch.cuda.Event()
            event.record()
        if pending is not None:
            _collect(pending, records)
        pending = (event, indices, batch)
        progress.update(len(indices), sum(lens), ids.numel(), writer.bytes_written)
    if pending is not None:
        _collect(pending, records)
    return records


def _collect(pending, records: list) -> None:
    event, indices, batch = pending
    if event is not None:
        event.synchronize()
    for i, record in zip(indices, batch):
        records[i] = record


class _Progress:
    """The tqdm bar (samples, tokens/s, MB written) and this run's token and slot counts."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, unit="sample", desc="precompute", disable=not enabled)
        self.t0 = time.perf_counter()
        self.tokens = 0  # real tokens forwarded by this run
        self.slots = 0   # token slots forwarded, padding included

    def update(self, samples: int, tokens: int, slots: int, bytes_written: int) -> None:
        self.tokens += tokens
        self.slots += slots
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", written=f"{bytes_written / 1e6:.1f}MB", refresh=False)
        self.bar.update(samples)

    def close(self) -> None:
        self.bar.close()
