"""The precompute loop: pick the draft vocabulary and the encoding, run the frozen target shard by
shard, and hand unpadded records to the background shard writer.

``run_precompute`` takes already-built components (target wrapper, tokenizer, conversations and
their tokenized samples), so tests drive it with tiny real objects; ``main.py`` only loads them.

Order of work, cheapest and most likely to fail first: settings, output directory, draft
vocabulary, encoding (rank 0 decides, with one probe forward unless ``--resume`` finds the choice
recorded; every rank uses rank 0's decision), manifest; only then is the directory created and
locked, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import draftcache
from draftcache.cache_format import FORMAT_VERSION, MANIFEST_FILE, SampleBytes, plan_shard_boundaries, read_manifest
from draftcache.cache_format.fp8 import dequantize_rows, quantize_rows
from draftcache.cache_format.manifest import fp8_quantization
from draftcache.cache_format.schema import KIND_SHIFT, quantized_tensors, storage_dtype, supervision_dtype
from draftcache.data import (
    ChatTokenizer,
    ConversationSet,
    DraftVocab,
    TokenizedSample,
    TokenStoreWriter,
    select_draft_vocab,
    sample_lengths,
    set_chat_template,
    share_token_counts,
    special_token_ids,
    tokenize_all,
)
from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.precompute.distributed import DistContext, all_reduce_sum, gather_step, run_step
from draftcache.precompute.engines import engine_info, weights_fingerprint
from draftcache.precompute.fingerprint import (
    chat_template_fingerprint,
    config_fingerprint,
    tokenizer_fingerprint,
)
from draftcache.precompute.forward import Probe, input_device, pad_batch, pad_id_of
from draftcache.precompute.output_dir import PrecomputeError, check_output_dir
from draftcache.precompute.planning import length_bucketed_batches
from draftcache.precompute.records import SupervisionSpec
from draftcache.precompute.summary import PrecomputeSummary
from draftcache.precompute.writer import CacheJob, write_cache
from draftcache.targets import HFDFlashTargetModel, HFEagle3TargetModel
from draftcache.targets.supervision import compute_target_distribution

__all__ = ["run_precompute", "tokenize_conversations", "check_output_dir", "PrecomputeSummary", "PrecomputeError"]

# Config keys of final-logit transforms the ``hidden`` rebuild (a plain linear lm_head) cannot reproduce.
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


def tokenize_conversations(cfg: PrecomputeConfig, tokenizer, conversations: ConversationSet, *,
                           store_dir: Path | None = None) -> Sequence[TokenizedSample]:
    """Render and tokenize conversations, truncated to ``cfg.seq_length``, until ``cfg.num_samples``
    samples survive (all when None), in ``cfg.num_workers`` processes.

    With ``store_dir`` the samples go to a ``TokenStore`` written there (returned, open), so host
    memory does not grow with the dataset; else they are returned as a list.

    ``cfg.chat_template`` (when set) is first made the tokenizer's template, so the manifest
    ``run_precompute`` writes fingerprints the template actually used. A lazily loaded
    ``conversations`` is read only as far as needed, so its skip counts describe exactly the
    records read. Refused conversations are counted in ``conversations.skipped`` (or, with
    ``cfg.strict``, the first raises ``BadRecordError`` naming its file and line); a template that
    fails the start-up probe or refuses every conversation raises ``ChatTemplateError``.
    """
    set_chat_template(tokenizer, cfg.chat_template)
    into = TokenStoreWriter(store_dir) if store_dir is not None else None
    try:
        samples = tokenize_all(conversations, ChatTokenizer(tokenizer, cfg.seq_length), conversations.skipped,
                               strict=cfg.strict, progress=cfg.progress, limit=cfg.num_samples,
                               num_workers=cfg.num_workers, into=into)
    except BaseException:
        if into is not None:
            into.close().close()
        raise
    return into.close() if into is not None else samples


@torch.no_grad()
def run_precompute(
    cfg: PrecomputeConfig,
    *,
    target: HFEagle3TargetModel | HFDFlashTargetModel,
    tokenizer,
    conversations: ConversationSet,
    samples: Sequence[TokenizedSample],
    model_id: str,
    log: Callable[[str], None] = print,
    dist: DistContext | None = None,
) -> PrecomputeSummary:
    """Write (or with ``cfg.resume`` continue) the cache at ``cfg.output_dir``.

    Args:
        target: the frozen target; its device(s) and dtype are used as they are. An
            ``HFDFlashTargetModel`` for ``cfg.method == "dflash"`` (kind ``dflash``: its layers'
            outputs, unshifted, and the ``argmax`` encoding over the full vocabulary; with
            ``--supervision hidden`` also the final hidden states, decided and measured as EAGLE-3's).
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
        if isinstance(target, HFDFlashTargetModel) != (cfg.method == "dflash"):
            problems.append(f"--method {cfg.method} needs {'HFDFlashTargetModel' if cfg.method == 'dflash' else 'HFEagle3TargetModel'}"
                            f", got {type(target).__name__}")
        if cfg.target_layer_ids is not None and list(cfg.target_layer_ids) != target.aux_layer_ids:
            problems.append(f"--target-layer-ids {list(cfg.target_layer_ids)} but the target captures "
                            f"{target.aux_layer_ids}; build HFDFlashTargetModel with the same ids")
        if cfg.aux_layer_ids is not None and list(cfg.aux_layer_ids) != target.aux_layer_ids:
            problems.append(f"--aux-layer-ids {list(cfg.aux_layer_ids)} but the target captures "
                            f"{target.aux_layer_ids}; build HFEagle3TargetModel with the same ids")
        if problems:
            raise ConfigError("invalid precompute settings for this target:\n  - " + "\n  - ".join(problems))

    run_step(ctx, "checking the settings", check)
    # each rank counts a disjoint part of the samples; the sum is the one-process count
    counts = all_reduce_sum(ctx, share_token_counts(samples, target.vocab_size, ctx.rank, ctx.world_size))  # [V] int64

    specials = special_token_ids(tokenizer)
    vocab = run_step(ctx, "choosing the draft vocabulary", lambda: select_draft_vocab(counts, cfg.draft_vocab_size,
                                                                                       specials))
    dtype = storage_dtype(cfg.dtype)
    probe: list[Probe] = []  # rank 0's probe forward, if it ran one

    def choose() -> EncodingChoice:
        """Rank 0 alone decides the encoding; every rank then uses its decision (a per-rank
        measurement near the tolerance, or on mixed GPUs, could disagree)."""
        if cfg.method == "dflash" and cfg.supervision != "hidden":  # the target's argmax alone: no probe
            return EncodingChoice("argmax")
        # EAGLE-3 and DFlash ``hidden`` alike: the rebuild from the stored final hidden states is measured
        # (and decides an fp8 cache's final_hidden storage), once, here
        recorded = _recorded_encoding(cfg, out)
        if recorded is not None:  # --resume: the choice the cache was made with, not measured again
            return recorded
        # the probe forward is the first batch of shard 0 as a hidden cache would cut it, so that
        # shard (rank 0's first) reuses it instead of running it twice
        hidden_bytes = SampleBytes({"dtype": cfg.dtype, "target": {"hidden_size": target.hidden_size},
                                    "capture": {"layer_ids": target.aux_layer_ids},
                                    "supervision": {"encoding": "hidden", "topk": None},
                                    "draft_vocab": {"size": vocab.size}})
        first_shard = plan_shard_boundaries((hidden_bytes(*n) for n in sample_lengths(samples)), cfg.shard_size,
                                            cfg.max_shard_bytes)[1]
        choice, forward = _choose_encoding(cfg, target, samples[:first_shard], vocab, pad_id_of(tokenizer), dtype)
        if forward is not None:
            probe.append(forward)
        return choice

    choice = gather_step(ctx, "choosing the encoding", choose if ctx.is_main else _nothing)[0]
    encoding = choice.encoding
    if choice.why:
        log(choice.why)

    def plan() -> tuple[dict, SupervisionSpec]:
        manifest = _build_manifest(cfg, target=target, tokenizer=tokenizer, conversations=conversations,
                                   model_id=model_id, vocab=vocab, counts=counts,
                                   num_samples=len(samples), special_ids=specials, choice=choice)
        sample_bytes = SampleBytes(manifest)
        sizes = (sample_bytes(*n) for n in sample_lengths(samples))
        manifest["shard_boundaries"] = plan_shard_boundaries(sizes, cfg.shard_size, cfg.max_shard_bytes)
        manifest["num_shards"] = len(manifest["shard_boundaries"]) - 1
        spec = SupervisionSpec(encoding=encoding, vocab=vocab, dtype=supervision_dtype(cfg.dtype),
                               topk=cfg.target_probs_topk if encoding == "topk" else None,
                               quantized=quantized_tensors(manifest), num_layers=len(target.aux_layer_ids),
                               label_aligned=cfg.method == "dflash")
        return manifest, spec

    manifest, spec = run_step(ctx, "planning the shards", plan)
    job = CacheJob(output_dir=out, manifest=manifest, spec=spec, samples=samples, pad_id=pad_id_of(tokenizer),
                   batch_size=cfg.batch_size, resume=cfg.resume, progress=cfg.progress,
                   skipped=conversations.skipped.as_dict(), probe=probe.pop() if probe else None, strict=cfg.strict,
                   max_non_finite=cfg.max_non_finite)
    summary = write_cache(job, target, ctx=ctx, log=log)
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class EncodingChoice:
    """How rank 0 decided a cache's supervision: ``encoding``, a line saying why (logged), the
    measured ``hidden`` rebuild difference (``supervision.rebuild_max_abs_prob_diff``) and, for an
    fp8 cache whose fp8 final hidden states rebuild outside the tolerance but bf16 ones within it,
    why final_hidden is stored bf16 (``quantization.final_hidden_why``; None: fp8 like aux)."""

    encoding: str
    why: str | None = None
    closeness: float | None = None
    final_hidden_bf16_why: str | None = None


def _recorded_encoding(cfg: PrecomputeConfig, out: Path) -> EncodingChoice | None:
    """On ``--resume``, the encoding (measured rebuild closeness, final_hidden storage) the cache in ``out`` records,
    when this run's request allows it (``auto``: ``hidden`` or ``probs``; ``hidden``: ``hidden``);
    None otherwise (no cache yet, an unreadable one, or another request: the resume check proper
    then compares and refuses with every differing field)."""
    if not cfg.resume or not (out / MANIFEST_FILE).is_file():
        return None
    try:
        old = read_manifest(out)
    except (OSError, ValueError):
        return None
    encoding = old["supervision"]["encoding"]
    allowed = {"auto": ("hidden", "probs"), "hidden": ("hidden",)}.get(cfg.encoding_request, ())
    if old["kind"] != cfg.method or encoding not in allowed:
        return None
    return EncodingChoice(encoding, f"resume: supervision {encoding}, as recorded in the cache (not measured again)",
                          old["supervision"].get("rebuild_max_abs_prob_diff") if encoding == "hidden" else None,
                          old.get("quantization", {}).get("final_hidden_why"))


def _logit_transform_in_config(target: HFEagle3TargetModel | HFDFlashTargetModel) -> str | None:
    """A config key naming a final logit transform the ``hidden`` rebuild does not apply, or None."""
    config = getattr(target.model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _LOGIT_TRANSFORM_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in (None, 0, 0.0, 1, 1.0):
                return f"its config sets {key}={value}, a final logit transform the rebuild does not apply"
    return None


_REBUILD_HEAD_ROWS = 8192  # lm_head rows converted to fp32 at once by the rebuild check (128 MB at H = 4096)
_REBUILD_CHECK_ROWS = 256  # supervised rows compared; a transform the rebuild misses shows on any of them
# Largest |rebuilt - target| draft-vocab probability the hidden encoding may differ by. bf16 storage of
# final_hidden moves probabilities by ~1e-3 (embedded target) to 1.4e-2 (SmolLM2-135M, ShareGPT); a
# logit transform the rebuild misses by far more (0.26 for a head scaled by 2). The measured value
# is recorded in the manifest and printed either way.
REBUILD_PROB_TOLERANCE = 5e-2


def _rebuild_closeness(target: HFEagle3TargetModel | HFDFlashTargetModel, samples: Sequence[TokenizedSample],
                       cfg: PrecomputeConfig, vocab: DraftVocab, pad_id: int, dtypes: Sequence[torch.dtype]
                       ) -> tuple[list[float], int, Probe]:
    """Run the first length-bucketed batch of ``samples`` (shard 0's) and compare, at up to
    ``_REBUILD_CHECK_ROWS`` of the positions whose final hidden state the cache stores (supervised
    ``p``; DFlash, label-aligned: ``q - 1`` for supervised ``q``), the draft-vocab distribution
    (DFlash: the full vocabulary) a reader rebuilds from the STORED final hidden states
    (``final_hidden`` in each storage dtype of ``dtypes``, then ``@ W.T (+ b)`` in fp32) with the
    target's softmax at the same positions (from the real logits). Returns (max abs probability
    difference per dtype, rows compared, the probe forward)."""
    indices = length_bucketed_batches([len(s.input_ids) for s in samples], cfg.batch_size)[0]
    ids, am, lm, _ = pad_batch(samples, indices, pad_id, input_device(target))
    out = target.forward_capture(ids, am, capture_final_hidden=True)
    probe = Probe(indices=list(indices), out=out)
    sup = lm.bool()                                                               # [B, T]
    if cfg.method == "dflash":  # the row of supervised q holds the output at q - 1 (records.batch_to_records)
        sup = torch.cat([sup[:, 1:], torch.zeros_like(sup[:, :1])], dim=1)
    real = out.logits[sup][:_REBUILD_CHECK_ROWS].float()                          # [m, V]
    weight, bias = target.output_projection()                                     # [V, H], [V] | None
    ones = torch.ones(real.shape[0], dtype=torch.bool, device=real.device)
    selected, t2d = vocab.selected_token_ids.to(real.device), vocab.t2d.to(real.device)
    want, _ = compute_target_distribution(real, ones, selected, t2d)                       # [m, Vd]
    diffs = []
    for dtype in dtypes:
        stored = out.final_hidden[sup][:_REBUILD_CHECK_ROWS]                      # [m, H]
        if dtype == torch.float8_e4m3fn:  # what a reader dequantizes from the stored fp8 rows and scales
            stored = dequantize_rows(*quantize_rows(stored, 1), torch.float32)
        else:
            stored = stored.to(dtype)                                             # as written to disk
        stored = stored.to(weight.device).float()
        # the head in fp32 a block of rows at a time: a whole fp32 copy is 2.1 GB at 128k x 4096
        rebuilt = torch.cat([stored @ rows.float().T for rows in weight.split(_REBUILD_HEAD_ROWS)], dim=1)  # [m, V]
        if bias is not None:
            rebuilt = rebuilt + bias.float()
        got, _ = compute_target_distribution(rebuilt.to(real.device), ones, selected, t2d)    # [m, Vd]
        diffs.append(float((got - want).abs().max()) if real.shape[0] else 0.0)
    return diffs, int(real.shape[0]), probe


def _choose_encoding(cfg: PrecomputeConfig, target, samples, vocab: DraftVocab, pad_id: int, dtype: torch.dtype
                     ) -> tuple[EncodingChoice, Probe | None]:
    """Resolve ``auto`` / check ``hidden``; returns the choice and the probe forward if any. An fp8
    cache stores final_hidden in fp8 when that rebuilds within the tolerance, else in bf16 when
    that does (aux hidden states stay fp8 either way)."""
    request = cfg.encoding_request
    if request in ("probs", "topk"):
        return EncodingChoice(request), None
    if request == "auto" and target.hidden_size >= vocab.size:
        return EncodingChoice("probs", f"auto: probs, since draft vocab {vocab.size} <= hidden size "
                                       f"{target.hidden_size}"), None
    problem, probe, diff, bf16_why = _logit_transform_in_config(target), None, None, None
    closeness = ""
    if problem is None:
        fp8 = dtype == torch.float8_e4m3fn
        diffs, rows, probe = _rebuild_closeness(target, samples, cfg, vocab, pad_id,
                                                (dtype, torch.bfloat16) if fp8 else (dtype,))
        where = f"max abs difference over {rows} supervised rows"
        stored_as, diff = cfg.dtype, diffs[0]
        if fp8 and diffs[0] > REBUILD_PROB_TOLERANCE and diffs[1] <= REBUILD_PROB_TOLERANCE:
            stored_as, diff = "bf16", diffs[1]
            bf16_why = (f"the draft-vocab probabilities rebuilt from fp8 final hidden states differ from the target's by "
                        f"{diffs[0]:.2e} ({where}), above the tolerance {REBUILD_PROB_TOLERANCE:g}; from bf16 ones by "
                        f"{diffs[1]:.2e}")
        closeness = (f"the draft-vocab probabilities rebuilt from the stored ({stored_as}) final hidden states are "
                     f"within {diff:.2e} of the target's ({where}; recorded as supervision.rebuild_max_abs_prob_diff)"
                     + (f"; final_hidden is stored bf16, aux hidden states fp8, since {bf16_why}" if bf16_why else ""))
        if diff > REBUILD_PROB_TOLERANCE:
            problem = (f"the draft-vocab probabilities rebuilt from the stored ({stored_as}) final hidden states "
                       f"differ from the target's by {diff:.2e} ({where}), above the tolerance "
                       f"{REBUILD_PROB_TOLERANCE:g}" + (f" (bf16 ones by {diffs[1]:.2e})" if fp8 else ""))
    if request == "hidden":
        if problem:
            fix = ("Drop --supervision hidden: the argmax-only DFlash cache trains without the distribution term "
                   "(--distribution-weight), or train online against the target." if cfg.method == "dflash" else
                   "Use --supervision probs (or topk) to store the exact target distribution instead.")
            raise PrecomputeError(f"--supervision hidden refused for this target: {problem}, so logits rebuilt at "
                                  f"read time would be wrong. {fix}")
        return EncodingChoice("hidden", f"hidden: {closeness}", diff, bf16_why), probe
    if problem:
        return EncodingChoice("probs", f"auto: probs, since the hidden encoding cannot rebuild this target's logits "
                                       f"({problem})"), probe
    return EncodingChoice("hidden", f"auto: hidden, since hidden size {target.hidden_size} < draft vocab {vocab.size} "
                                    f"and {closeness}", diff, bf16_why), probe


def _build_manifest(cfg: PrecomputeConfig, *, target: HFEagle3TargetModel, tokenizer, conversations: ConversationSet,
                    model_id: str, vocab: DraftVocab, counts: torch.Tensor, num_samples: int,
                    special_ids: list[int], choice: EncodingChoice) -> dict:
    """The manifest of this run, before its shard boundaries are planned (they need its sizes)."""
    encoding = choice.encoding
    model = target.model
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "draftcache", "version": draftcache.__version__},
        "kind": cfg.method,
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
            "shift": KIND_SHIFT[cfg.method],
        },
        "seq_length": cfg.seq_length,
        "dtype": cfg.dtype,
        "supervision": {"encoding": encoding, "topk": cfg.target_probs_topk if encoding == "topk" else None,
                        "rebuild_max_abs_prob_diff": choice.closeness if encoding == "hidden" else None},
        "draft_vocab": {"size": vocab.size, "selected_token_ids": vocab.selected_token_ids.tolist(),
                        "special_token_ids": list(special_ids)},
        "token_counts": counts.tolist(),
        "dataset": {**conversations.identity(), "skipped": conversations.skipped.as_dict()},
        "num_samples": num_samples,
        "shard_size": cfg.shard_size,
        "max_shard_bytes": cfg.max_shard_bytes,
        "shard_boundaries": [0, num_samples],  # planned by the caller
        "num_shards": 1,
        "files": {},
        "shards": [],
        "stats": {"num_tokens": 0, "num_supervised": 0, "non_finite": 0},
    }
    if cfg.dtype == "fp8":
        manifest["quantization"] = fp8_quantization(choice.final_hidden_bf16_why)
    return manifest


