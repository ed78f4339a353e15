"""Looking inside a cache: summary, integrity check, statistics, one decoded sample.

The ``draftcache inspect | verify | stats | show`` commands print what these functions return.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftcache.cache_format.errors import CacheCorruptError, ManifestError
from draftcache.cache_format.manifest import Manifest, read_manifest
from draftcache.cache_format.reader import CacheReader
from draftcache.cache_format.resume import committed_prefix, read_journals, verify_shard
from draftcache.cache_format.schema import LOCK_FILE, SIDE_FILES, expected_shard_tensors, quantized_tensors, shard_metadata
from draftcache.cache_format.shard_file import ShardFile

__all__ = ["VerifyReport", "inspect_cache", "verify_cache", "cache_stats", "show_sample"]

_CHUNK_BYTES = 64 << 20  # verify reads float tensors in chunks of about this size
_FLOAT_TENSORS = ("aux_hidden_states", "target_probs", "topk_probs", "final_hidden", "aux_hidden_states_scale",
                  "final_hidden_scale")
# |row sum - 1| allowed per storage dtype (fp8 caches keep probabilities in bf16)
_PROB_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "fp8": 3e-2}


def _fp8_storage(manifest: dict) -> str:
    """``fp8 (float8_e4m3fn aux_hidden_states, final_hidden, ...)``: which tensors are fp8 and, when
    final_hidden stays bf16, why (the manifest's ``quantization`` block)."""
    q = manifest["quantization"]
    fp8 = [n for n in quantized_tensors(manifest) if n == "aux_hidden_states" or manifest["supervision"]["encoding"]
           == "hidden"]
    text = f"fp8 ({q['values']} {', '.join(fp8)}, one {q['scale_dtype']} scale per row"
    if "final_hidden_dtype" in q and manifest["supervision"]["encoding"] == "hidden":
        text += f"; final_hidden {q['final_hidden_dtype']}: {q['final_hidden_why']}"
    return text + f"; probabilities {q['probs_dtype']})"


def inspect_cache(path: str | os.PathLike) -> str:
    """Manifest summary and the shard table, with disk use and bytes per token."""
    m = Manifest(read_manifest(path))
    d = m.data
    shards = d["shards"]
    disk = sum(s["bytes"] for s in shards) + sum(f["bytes"] for f in d["files"].values())
    tokens = d["stats"]["num_tokens"]
    storage = m.dtype if m.dtype != "fp8" else _fp8_storage(d)
    lines = [
        f"cache        {Path(path)}",
        f"format       v{d['format_version']} {d['kind']}, {'complete' if d['complete'] else 'INCOMPLETE'}",
        f"target       {d['target']['model_id']} ({d['target']['architecture']}, hidden {m.hidden_size}, "
        f"vocab {m.vocab_size}, {d['target']['num_layers']} layers)",
        f"tokenizer    {d['tokenizer']['name_or_path']}",
        f"capture      layer_ids {d['capture']['layer_ids']} (HF hidden_states {d['capture']['hf_hidden_states_index']})",
        (f"supervision  {m.encoding}{f' (k={m.topk})' if m.topk else ''}, dtype {storage}, draft vocab "
         f"{d['draft_vocab']['size']}" if m.kind == "eagle3" else
         f"supervision  {m.encoding}: the target's greedy token per supervised position (unshifted)"
         f"{' and its final hidden state (the distribution, via the lm_head side file)' if m.encoding == 'hidden' else ''}"
         f", dtype {storage}"),
        f"samples      {committed_prefix(d)} committed of {m.num_samples} planned, seq_length {m.seq_length}",
        f"shards       {len(shards)} of {m.num_shards} (shard_size {m.shard_size})",
        f"tokens       {tokens} ({d['stats']['num_supervised']} supervised)",
        f"non-finite   {d['stats'].get('non_finite', 0)} sample(s) dropped (the target produced NaN/Inf for them)",
        f"disk         {_size(disk)}" + (f", {disk / tokens:.0f} bytes/token" if tokens else ""),
        f"dataset      {d['dataset']['input_data']}" + (f", skipped {d['dataset']['skipped']}"
                                                         if d['dataset']['skipped'] else ""),
        "",
        f"{'shard':<26}{'samples':>9}{'tokens':>10}{'supervised':>12}{'size':>12}",
    ]
    lines += [f"{s['file']:<26}{s['num_samples']:>9}{s['num_tokens']:>10}{s['num_supervised']:>12}{_size(s['bytes']):>12}"
              for s in shards]
    lines += [f"{name + ' (side file)':<26}{'':>31}{_size(f['bytes']):>12}" for name, f in d["files"].items()]
    return "\n".join(lines)


@dataclass
class VerifyReport:
    """Outcome of ``verify_cache``: ``ok`` when ``problems`` is empty; ``notes`` are not errors."""

    cache_dir: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"verify {self.cache_dir}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}",
                 f"  checked {len(self.checked)} file(s)"]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        lines += [f"  note    {n}" for n in self.notes]
        return "\n".join(lines)


def verify_cache(path: str | os.PathLike) -> VerifyReport:
    """Check everything the manifest promises: schema and cross-field rules, every committed
    file's size and sha256, shard headers against their entries, offsets, id ranges, NaN/Inf in
    float tensors, probability rows summing to 1, and coverage of the planned shards."""
    report = VerifyReport(str(path))
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        report.problems += exc.problems or [str(exc)]
        return report
    root = Path(path)
    for entry in manifest["shards"]:
        problems = verify_shard(root, entry) or _check_shard_contents(root, manifest, entry)
        report.problems += problems
        if not problems:
            report.checked.append(entry["file"])
    for name, entry in manifest["files"].items():
        problems = verify_shard(root, entry) or _check_side_file(root, manifest, name, entry)
        report.problems += problems
        if not problems:
            report.checked.append(entry["file"])
    committed = {s["index"] for s in manifest["shards"]}
    missing = [i for i in range(manifest["num_shards"]) if i not in committed]
    if missing:
        report.notes.append(f"incomplete: {len(missing)} of {manifest['num_shards']} shards are not committed "
                            f"(first missing: {missing[0]}); resume the precompute with --resume")
    journaled = {e["file"] for e in read_journals(root) if e.get("index") not in committed}
    if journaled:
        report.notes.append(f"{len(journaled)} more shard(s) are recorded in the commit journals (a precompute is "
                            "running, or --resume will verify them and fold them into the manifest)")
    listed = {s["file"] for s in manifest["shards"]} | {f["file"] for f in manifest["files"].values()} | journaled
    for p in sorted(root.iterdir()):
        if re.search(r"\.tmp-\d+$", p.name):
            report.notes.append(f"stale temporary {p.name} (removed by the next --resume)")
        elif p.suffix == ".safetensors" and p.name not in listed:
            report.notes.append(f"{p.name} is not listed in the manifest (uncommitted; readers ignore it)")
    if (root / LOCK_FILE).exists():
        report.notes.append(f"{LOCK_FILE} exists: a writer is running or was killed")
    return report


def _check_shard_contents(root: Path, manifest: dict, entry: dict) -> list[str]:
    name = entry["file"]
    try:
        shard = ShardFile(root / name, entry["bytes"])
        shard.check(expected_shard_tensors(manifest, entry), shard_metadata(entry["first_sample"], entry["num_samples"]))
    except CacheCorruptError as exc:
        return [str(exc)]
    try:
        problems = []
        offsets, supervised = shard.read("sample_offsets"), shard.read("supervised_offsets")
        for label, values, total in (("sample_offsets", offsets, entry["num_tokens"]),
                                     ("supervised_offsets", supervised, entry["num_supervised"])):
            if int(values[0]) != 0 or int(values[-1]) != total or bool((values[1:] < values[:-1]).any()):
                problems.append(f"{name}: {label} are not a non-decreasing range from 0 to {total}")
        if problems:
            return problems
        mask = shard.read("loss_mask")
        if bool((mask > 1).any()):
            problems.append(f"{name}: loss_mask holds values other than 0 and 1")
        sample_ids = torch.repeat_interleave(torch.arange(entry["num_samples"]), offsets[1:] - offsets[:-1])
        per_sample = torch.zeros(entry["num_samples"], dtype=torch.int64).index_add_(0, sample_ids, mask.long())
        if not torch.equal(per_sample, supervised[1:] - supervised[:-1]):
            problems.append(f"{name}: loss_mask sums disagree with supervised_offsets")
        vocab, vd = manifest["target"]["vocab_size"], manifest["draft_vocab"]["size"]
        for tensor, limit in (("input_ids", vocab), ("target_argmax", vocab), ("topk_ids", vd)):
            if tensor in shard.tensors:
                values = shard.read(tensor)
                if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
                    problems.append(f"{name}: {tensor} has values outside [0, {limit})")
        tolerance = _PROB_TOLERANCE[manifest["dtype"]]
        for tensor in _FLOAT_TENSORS:
            if tensor not in shard.tensors:
                continue
            for rows in _chunks(shard, tensor):
                rows = rows.float() if rows.dtype == torch.float8_e4m3fn else rows  # no isfinite on fp8 itself
                if not bool(torch.isfinite(rows).all()):
                    problems.append(f"{name}: {tensor} contains NaN or Inf")
                    break
                if tensor.endswith("_scale") and rows.numel() and not bool((rows > 0).all()):
                    problems.append(f"{name}: {tensor} holds scales <= 0 (every fp8 row scale is positive)")
                    break
                if tensor in ("target_probs", "topk_probs") and rows.numel():
                    error = float((rows.float().sum(-1) - 1).abs().max())
                    if error > tolerance:
                        problems.append(f"{name}: {tensor} rows do not sum to 1 (off by up to {error:.3g}, "
                                        f"tolerance {tolerance} for {manifest['dtype']})")
                        break
        return problems
    finally:
        shard.close()


def _check_side_file(root: Path, manifest: dict, name: str, entry: dict) -> list[str]:
    if name not in SIDE_FILES:
        return []
    vocab, hidden = manifest["target"]["vocab_size"], manifest["target"]["hidden_size"]
    try:
        side = ShardFile(root / entry["file"], entry["bytes"])
        side.check({"weight": (None, (vocab, hidden))}, {})
        if "bias" in side.tensors:
            side.check({"bias": (None, (vocab,))}, {})
        weight_ok = all(bool(torch.isfinite(rows).all()) for rows in _chunks(side, "weight"))
        side.close()
    except CacheCorruptError as exc:
        return [str(exc)]
    return [] if weight_ok else [f"{entry['file']}: weight contains NaN or Inf"]


def _chunks(shard: ShardFile, name: str):
    dtype, shape, _ = shard.tensors[name]
    row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        yield shard.read(name, start, min(start + step, shape[0]))


def cache_stats(path: str | os.PathLike) -> str:
    """Samples, tokens, supervised fraction, a length histogram and how often the target's argmax
    lies in the draft vocabulary (the fraction of supervised positions that train the draft)."""
    reader = CacheReader(path)
    lengths = reader.sample_lengths()
    if lengths.numel() == 0:
        return f"{path}: no committed samples yet"
    t2d = reader.draft_vocab.t2d
    supervised = in_draft = agree = 0
    for entry in reader.manifest["shards"][: len(reader.shard_ranges())]:  # the committed prefix
        shard = ShardFile(Path(path) / entry["file"], entry["bytes"])
        argmax = shard.read("target_argmax").long()  # [M]
        if reader.kind == "dflash":  # row of supervised q = the target's greedy token for q: compare with the data
            agree += int((argmax == shard.read("input_ids").long()[shard.read("loss_mask").bool()]).sum())
        shard.close()
        supervised += argmax.numel()
        in_draft += int(t2d[argmax].sum())
    tokens = int(lengths.sum())
    seq_length = reader.manifest["seq_length"]
    edges = [seq_length * i // 8 for i in range(9)]
    counts = torch.histc(lengths.float(), bins=8, min=0, max=seq_length).long().tolist()
    lines = [
        f"samples            {len(reader)}" + (f" ({reader.manifest['stats']['non_finite']} non-finite dropped)"
                                               if reader.manifest["stats"].get("non_finite") else ""),
        "storage            " + (_fp8_storage(reader.manifest) if reader.manifest["dtype"] == "fp8"
                                     else reader.manifest["dtype"]),
        f"tokens             {tokens} (mean {tokens / len(reader):.1f}, min {int(lengths.min())}, "
        f"max {int(lengths.max())} of seq_length {seq_length})",
        f"supervised         {supervised} ({supervised / tokens:.1%} of tokens)",
        f"draft vocab        {reader.draft_vocab.size} tokens cover {in_draft / max(supervised, 1):.1%} of the "
        "target's argmax at supervised positions" if reader.kind == "eagle3" else
        f"target greedy      equals the data token at {agree / max(supervised, 1):.1%} of supervised positions "
        "(the draft learns the target's choice, not the data's)",
        "length histogram",
    ]
    width = max(counts) or 1
    lines += [f"  {edges[i]:>6}-{edges[i + 1]:<6} {c:>7} {'#' * round(40 * c / width)}" for i, c in enumerate(counts)]
    return "\n".join(lines)


def show_sample(path: str | os.PathLike, index: int) -> str:
    """Sample ``index`` decoded with the tokenizer named in the manifest (from local files only),
    supervised spans in ``[[...]]``; token ids when the tokenizer cannot be loaded."""
    reader = CacheReader(path)
    raw = reader.get_raw(index)
    ids, mask = raw["input_ids"].tolist(), raw["loss_mask"].tolist()
    name = reader.manifest["tokenizer"]["name_or_path"]
    decode, note = _decoder(name)
    parts, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            text = decode(ids[start:t])
            parts.append(f"[[{text}]]" if mask[start] else text)
            start = t
    header = f"sample {index}: {len(ids)} tokens, {sum(mask)} supervised (in [[...]]){note}"
    if reader.kind == "dflash":  # the target's greedy tokens for the supervised positions
        greedy = raw["target_argmax"].tolist()
        agree = sum(g == t for g, t in zip(greedy, (t for t, keep in zip(ids, mask) if keep)))
        header += (f"\ntarget greedy at the supervised positions ({agree} of {len(greedy)} equal the data): "
                   f"{decode(greedy)!r}")
    return header + "\n" + "".join(parts)


def _decoder(name: str):
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # any failure to load: show ids instead
        return (lambda ids: " ".join(map(str, ids)) + " "), f"; tokenizer {name!r} not available locally ({type(exc).__name__}), showing ids"
    return (lambda ids: tokenizer.decode(ids)), ""


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
