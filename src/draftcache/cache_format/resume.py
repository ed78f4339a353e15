"""Resuming an interrupted precompute: trust only what the manifest lists.

Typical use by the precompute pipeline, while holding ``CacheLock(cache_dir)``::

    old = read_manifest(cache_dir)
    if diff := diff_manifest_config(old, new, RESUME_KEY_FIELDS):
        raise SystemExit("cannot resume, the configuration changed:\\n" + "\\n".join(diff))
    remove_stale_temporaries(cache_dir)
    for entry in old["shards"]:
        if problems := verify_shard(cache_dir, entry):   # drop shards that fail the check
            ...
    start = committed_prefix(old)                        # first sample to compute
    writer = CacheWriter(cache_dir, old)                 # keeps appending after the prefix
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from draftcache.cache_format.checksum import TMP_MARKER, sha256_file

__all__ = ["RESUME_KEY_FIELDS", "remove_stale_temporaries", "verify_shard", "committed_prefix",
           "committed_shards", "diff_manifest_config", "JOURNAL_SUFFIX", "journal_path", "journal_files",
           "read_journals"]

# Every manifest field that shapes the shard contents or their order: a resumed run must match
# all of them, or its new shards would not line up with the committed ones.
RESUME_KEY_FIELDS: tuple[str, ...] = (
    "format_version",
    "kind",
    "target.fingerprint",
    "target.config_fingerprint",
    "target.engine.name",
    "tokenizer.fingerprint",
    "tokenizer.chat_template_fingerprint",
    "capture.layer_ids",
    "capture.convention",
    "seq_length",
    "dtype",
    "quantization.scales",
    "supervision.encoding",
    "supervision.topk",
    "draft_vocab.selected_token_ids",
    "dataset.input_data",
    "dataset.split",
    "dataset.shuffle_seed",
    "dataset.num_samples",
    "dataset.fingerprint",
    "shard_size",
    "max_shard_bytes",
    "num_samples",
    "shard_boundaries",
)

#: Suffix of the per-rank commit journals (``rank-<R>.commits.jsonl``) a distributed precompute
#: keeps next to its shards until rank 0 has folded them into ``manifest.json``.
JOURNAL_SUFFIX = ".commits.jsonl"
_JOURNAL = re.compile(r"^rank-(\d+)" + re.escape(JOURNAL_SUFFIX) + "$")

_TEMPORARY = re.compile(re.escape(TMP_MARKER) + r"\d+$")
_MISSING = object()


def remove_stale_temporaries(cache_dir: str | os.PathLike) -> list[str]:
    """Delete the ``*.tmp-<pid>`` files an interrupted writer left in ``cache_dir``; return their names.

    Call it while holding ``CacheLock`` and before creating a writer: every temporary is then stale.
    """
    removed = []
    for path in sorted(Path(cache_dir).iterdir()):
        if path.is_file() and _TEMPORARY.search(path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def verify_shard(cache_dir: str | os.PathLike, entry: Mapping[str, Any], *, checksum: bool = True) -> list[str]:
    """Problems with one committed file (a shard or ``files`` entry) against its manifest entry:
    missing, size mismatch, checksum mismatch (sha256 only when ``checksum``). Empty when sound.
    """
    path = Path(cache_dir) / entry["file"]
    if not path.is_file():
        return [f"{entry['file']}: missing (the manifest lists it as committed)"]
    size = path.stat().st_size
    if size != entry["bytes"]:
        return [f"{entry['file']}: size mismatch: {size} bytes on disk, manifest records {entry['bytes']} (truncated or "
                "overwritten)"]
    if checksum:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return [f"{entry['file']}: checksum mismatch: sha256 {digest} on disk, manifest records {entry['sha256']}"]
    return []


def committed_shards(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The shard entries of the contiguous prefix ``0, 1, 2, ...`` of committed shards."""
    prefix = []
    for expected, entry in enumerate(sorted(manifest["shards"], key=lambda e: e["index"])):
        if entry["index"] != expected:
            break
        prefix.append(entry)
    return prefix


def committed_prefix(manifest: Mapping[str, Any]) -> int:
    """Number of samples covered by the contiguous prefix of committed shards starting at shard 0:
    the global index of the first sample a resumed run must compute."""
    return sum(entry["num_samples"] for entry in committed_shards(manifest))


def diff_manifest_config(old: Mapping[str, Any], new: Mapping[str, Any], fields: Iterable[str] = RESUME_KEY_FIELDS
                         ) -> list[str]:
    """``"<dotted.path>: <old> != <new>"`` for every field in ``fields`` whose value differs
    (a missing field reads as ``<missing>``; long lists are summarised with their first difference)."""
    out = []
    for field in fields:
        a, b = _lookup(old, field), _lookup(new, field)
        if a is _MISSING and b is _MISSING:
            continue
        if a is _MISSING or b is _MISSING or a != b or type(a) is not type(b):
            out.append(f"{field}: {_show(a)} != {_show(b)}{_first_difference(a, b)}")
    return out


def _lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _show(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(json.dumps(v) for v in value[:3])}, ... ({len(value)} items)]"
    return json.dumps(value)


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list) and (len(a) > 8 or len(b) > 8):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f" (first difference at index {i}: {json.dumps(x)} != {json.dumps(y)})"
        return f" (lengths {len(a)} != {len(b)})"
    return ""


def journal_path(cache_dir: str | os.PathLike, rank: int) -> Path:
    """``<cache_dir>/rank-<rank>.commits.jsonl``: where rank ``rank`` records the shards it committed."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0; got {rank}")
    return Path(cache_dir) / f"rank-{rank}{JOURNAL_SUFFIX}"


def journal_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The commit journals in ``cache_dir``, by rank."""
    found = [(int(m.group(1)), p) for p in Path(cache_dir).iterdir() if (m := _JOURNAL.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def read_journals(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every shard entry recorded in the commit journals, in journal then line order. Lines that do
    not parse as a JSON object (the torn tail of an append cut short by a crash) are skipped; the
    entries are not verified here (use ``verify_shard``)."""
    entries = []
    for path in journal_files(cache_dir):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and {"file", "index", "bytes", "sha256"} <= entry.keys():
                entries.append(entry)
    return entries
