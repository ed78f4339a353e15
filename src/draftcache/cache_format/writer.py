"""``CacheWriter``: turns records, added in global sample order, into committed shards.

Records are collected until shard ``k`` (global samples ``[b[k], b[k+1])`` of the manifest's
``shard_boundaries``) is full; the shard is then handed to ONE background thread that streams it to
``shard-<k>.safetensors`` (no concatenated copy), fsyncs, commits it with ``os.replace`` and
rewrites ``manifest.json`` atomically with the new entry. At most ``queue_depth`` full shards wait
for that thread; ``add`` blocks beyond that, so host memory stays bounded. An exception in the
thread is re-raised by the next ``add`` / ``write_side_file`` / ``close``.

The caller should hold ``CacheLock(cache_dir)`` for the writer's lifetime.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from draftcache.cache_format.checksum import atomic_write_json
from draftcache.cache_format.container import write_safetensors
from draftcache.cache_format.manifest import Manifest, ShardEntry, shard_stats, validate_manifest
from draftcache.cache_format.record import SampleRecord
from draftcache.cache_format.shard_writer import ShardFileWriter
from draftcache.cache_format.resume import RESUME_KEY_FIELDS, committed_shards, journal_path
from draftcache.cache_format.schema import (
    FORMAT_VERSION,
    LM_HEAD_ENCODINGS,
    MANIFEST_FILE,
    SIDE_FILES,
    quantized_tensors,
    side_filename,
)

__all__ = ["CacheWriter", "write_shard_file", "write_side_file", "append_commit", "check_record"]

logger = logging.getLogger(__name__)

_WRITER_OWNED = ("format_version", "kind", "tool", "complete", "num_shards", "files", "shards", "stats")
_SIDE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CacheWriter:
    """Write a cache directory described by ``manifest`` (see ``new_manifest``).

    A manifest that already lists committed shards (read from the directory on resume) is kept:
    the writer continues after the contiguous prefix of committed shards, and the first ``add``
    must be given ``committed_prefix(manifest)``. Entries after a gap are dropped (they are
    recomputed and their files replaced).

    Use as a context manager: a normal exit calls ``close(complete=True)``, an exception
    ``abort()`` (full shards already queued are still committed). Host memory holds at most
    ``queue_depth`` queued shards, the one being written and the one being collected.
    """

    def __init__(self, cache_dir: str | Path, manifest: Manifest | Mapping[str, Any], *, queue_depth: int = 2):
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1 (shards waiting for the writer thread); got {queue_depth}")
        data = copy.deepcopy(manifest.data if isinstance(manifest, Manifest) else dict(manifest))
        validate_manifest(data)
        if data["complete"]:
            raise ValueError(f"the manifest for {cache_dir} is already complete; there is nothing left to write")
        data["shards"] = [dict(e) for e in committed_shards(data)]
        data["stats"] = shard_stats(data["shards"])
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._meta = Manifest(data)
        self._manifest = self._meta.data  # guarded by self._lock once the thread runs
        self._next_index = sum(e["num_samples"] for e in data["shards"])
        self._shard_index = len(data["shards"])
        self._pending: list[SampleRecord] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self.bytes_written = 0  # bytes of shards and side files written by this writer (progress bars)
        self._count_lock = threading.Lock()  # the thread and write_side_file both count
        self._write_manifest()
        self._thread = threading.Thread(target=self._run, name="draftcache-shard-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def next_index(self) -> int:
        """The global index the next ``add`` must be given."""
        return self._next_index

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        with self._lock:
            return copy.deepcopy(self._manifest)

    def add(self, global_index: int, record: SampleRecord | Mapping[str, torch.Tensor]) -> None:
        """Add sample ``global_index`` (samples must arrive in global order, starting at
        ``next_index``). Blocks while ``queue_depth`` full shards wait to be written.

        ``record`` is a ``SampleRecord`` or a dict with its field names (converted and checked).

        The record's tensors must be on the CPU; the writer keeps references to them until their
        shard is committed, so do not modify them (e.g. reuse a pinned buffer) after ``add``.
        """
        self._check_open()
        if global_index != self._next_index:
            raise ValueError(f"add() got sample {global_index} but the next sample must be {self._next_index}: samples "
                             "are added in global order (on resume, start at committed_prefix(manifest))")
        if global_index >= self._meta.num_samples:
            raise ValueError(f"sample {global_index} is beyond the planned num_samples {self._meta.num_samples}")
        if isinstance(record, Mapping):
            record = SampleRecord(**record)
        check_record(self._meta, global_index, record)
        self._pending.append(record)
        self._next_index += 1
        if len(self._pending) == self._meta.shard_num_samples(self._shard_index):
            records, self._pending = self._pending, []
            self._queue.put((self._shard_index, records))
            self._shard_index += 1
            self._raise_if_failed()

    def write_side_file(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Commit ``<name>.safetensors`` (e.g. ``target_embeddings``: ``weight [V, H]``; ``lm_head``:
        ``weight [V, H]`` and optional ``bias [V]``) and record its size and sha256 in ``files``."""
        self._check_open()
        entry = write_side_file(self.cache_dir, self._meta, name, tensors, on_bytes=self._count)
        with self._lock:
            self._manifest["files"][name] = entry
            self._write_manifest()

    def set_manifest_field(self, dotted_path: str, value: Any) -> None:
        """Set a descriptive field (e.g. ``dataset.skipped``) and rewrite the manifest. Fields that
        shape the shards (``RESUME_KEY_FIELDS``) and the writer's own bookkeeping cannot be set."""
        self._check_open()
        if dotted_path in RESUME_KEY_FIELDS or dotted_path.split(".")[0] in _WRITER_OWNED:
            raise ValueError(f"{dotted_path!r} shapes the shards or is kept by the writer; it cannot be changed "
                             "while writing (start a new cache instead)")
        with self._lock:
            updated = copy.deepcopy(self._manifest)
            *parents, leaf = dotted_path.split(".")
            node = updated
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"{dotted_path!r} is not a field of the manifest (no object at {part!r})")
                node = node[part]
            node[leaf] = copy.deepcopy(value)
            validate_manifest(updated)
            self._manifest.clear()
            self._manifest.update(updated)
            self._write_manifest()

    def close(self, complete: bool = True) -> None:
        """Wait for queued shards and stop the thread. With ``complete`` every planned sample must
        have been added and the required side files written; the manifest is then marked complete.
        Without it, samples of an unfinished shard are discarded (a resumed run recomputes them).
        """
        if self._closed:
            return
        self._closed = True
        missing = self._meta.num_samples - self._next_index
        if self._pending:
            logger.warning("discarding %d sample(s) of unfinished shard %d; a resumed run recomputes them",
                           len(self._pending), self._shard_index)
            self._pending = []
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        if not complete:
            return
        if missing:
            raise ValueError(f"close(complete=True) but only {self._next_index} of {self._meta.num_samples} planned "
                             "samples were added; add the rest or call close(complete=False)")
        with self._lock:
            needed = ["target_embeddings"] + (["lm_head"] if self._meta.encoding in LM_HEAD_ENCODINGS else [])
            absent = [n for n in needed if n not in self._manifest["files"]]
            if absent:
                raise ValueError(f"close(complete=True) but side file(s) {absent} were not written; call "
                                 "write_side_file() for them first")
            self._manifest["complete"] = True
            validate_manifest(self._manifest)
            self._write_manifest()

    def abort(self) -> None:
        """Stop after an error or interrupt: like ``close(complete=False)`` (full shards already
        queued are still committed) but never raises; a failure of the writer thread is logged."""
        try:
            self.close(complete=False)
        except Exception:  # the caller is already handling the error that made it abort
            logger.exception("the shard writer also failed while aborting")

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(complete=True)
        else:
            self.abort()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CacheWriter is closed; create a new one to write more")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the background shard writer failed: {self._error!r}") from self._error

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_written += n

    def _write_manifest(self) -> None:
        atomic_write_json(self.cache_dir / MANIFEST_FILE, self._manifest)


    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so a blocked add() wakes up and sees the error
            try:
                self._write_shard(*item)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc

    def _write_shard(self, index: int, records: list[SampleRecord]) -> None:
        entry = write_shard_file(self.cache_dir, self._meta, index, records, on_bytes=self._count)
        with self._lock:
            self._manifest["shards"].append(entry.to_dict())
            self._manifest["shards"].sort(key=lambda e: e["index"])
            self._manifest["stats"]["num_tokens"] += entry.num_tokens
            self._manifest["stats"]["num_supervised"] += entry.num_supervised
            self._write_manifest()


# ---------------------------------------------------------------------- shared by CacheWriter and distributed writers
def write_shard_file(cache_dir: str | Path, meta: Manifest, index: int,
                     records: list[SampleRecord] | list[Mapping[str, torch.Tensor]], *,
                     on_bytes: Callable[[int], None] | None = None, check: bool = False) -> ShardEntry:
    """Commit ``shard-<index>.safetensors`` (global samples ``[shard_boundaries[index], ...)``, records in
    global order) through ``ShardFileWriter`` atomically (temporary file, fsync, rename) and return its manifest entry.

    Touches nothing else: recording the entry (``manifest.json`` or a commit journal) is the
    caller's job. With ``check`` every record is checked against ``meta`` first.
    """
    expected = meta.shard_num_samples(index)
    if len(records) != expected:
        raise ValueError(f"shard {index} must hold {expected} samples; got {len(records)}")
    first = meta.shard_first_sample(index)
    records = [SampleRecord(**r) if isinstance(r, Mapping) else r for r in records]
    if check:
        for offset, record in enumerate(records):
            check_record(meta, first + offset, record)
    shard = ShardFileWriter(cache_dir, meta, index, [r.num_tokens for r in records],
                            [r.num_supervised for r in records], on_bytes=on_bytes)
    try:
        for local, record in enumerate(records):
            shard.write(local, record)
    except BaseException:
        shard.abort()
        raise
    return shard.commit()


def write_side_file(cache_dir: str | Path, meta: Manifest, name: str, tensors: Mapping[str, torch.Tensor], *,
                    on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Commit ``<name>.safetensors`` atomically and return its ``files`` entry ``{file, bytes, sha256}``."""
    if not _SIDE_NAME.match(name):
        raise ValueError(f"side file name {name!r} may only contain letters, digits, '_', '.' and '-'")
    if name in SIDE_FILES:
        _check_side_tensors(meta, name, tensors)
    ordered = [(key, tensors[key].detach().cpu().contiguous()) for key in sorted(tensors)]
    size, digest = write_safetensors(Path(cache_dir) / side_filename(name), ordered,
                                     {"format_version": str(FORMAT_VERSION)}, on_bytes=on_bytes)
    return {"file": side_filename(name), "bytes": size, "sha256": digest}


def append_commit(cache_dir: str | Path, rank: int, entry: ShardEntry | Mapping[str, Any]) -> None:
    """Record a committed shard in ``rank-<rank>.commits.jsonl`` (one JSON line, fsynced): the
    journal a distributed rank keeps instead of touching ``manifest.json``, which only the
    manifest owner (rank 0) writes. A torn last line (crash mid-append) is ignored by readers."""
    data = entry.to_dict() if isinstance(entry, ShardEntry) else dict(entry)
    line = (json.dumps(data, separators=(",", ":")) + "\n").encode()
    fd = os.open(journal_path(cache_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_record(meta: Manifest, index: int, record: SampleRecord) -> None:
    """Raise ``ValueError`` naming every way sample ``index``'s record does not fit the cache ``meta``."""
    problems = []
    if not isinstance(record, SampleRecord):
        raise TypeError(f"sample {index}: expected a SampleRecord; got {type(record).__name__}")
    devices = {t.device.type for t in vars(record).values() if torch.is_tensor(t)}
    if devices != {"cpu"}:
        raise ValueError(f"sample {index} has tensors on {sorted(devices - {'cpu'})}; copy them to the CPU first")
    if record.encoding != meta.encoding:
        problems.append(f"it carries the {record.encoding!r} encoding but the cache stores {meta.encoding!r}")
    fp8 = [name for name in ("aux_hidden_states", "final_hidden") if name not in quantized_tensors(meta.data)
           and getattr(record, name) is not None and getattr(record, name).dtype == torch.float8_e4m3fn]
    if fp8:
        problems.append(f"{', '.join(fp8)} are fp8 but the cache stores them as "
                        f"{'bf16' if meta.dtype == 'fp8' else meta.dtype} (see its quantization block)")
    if record.num_tokens > meta.seq_length:
        problems.append(f"it has {record.num_tokens} tokens, more than seq_length {meta.seq_length}")
    if record.aux_hidden_states.shape[1] != meta.aux_dim:
        problems.append(f"aux_hidden_states has width {record.aux_hidden_states.shape[1]}, expected "
                        f"len(layer_ids) * hidden_size = {meta.aux_dim}")
    expected_width = {"probs": len(meta.selected_token_ids), "topk": meta.topk, "hidden": meta.hidden_size,
                      "argmax": 0}[meta.encoding]
    rows = {"probs": record.target_probs, "topk": record.topk_probs, "hidden": record.final_hidden,
            "argmax": None}[meta.encoding]
    if rows is not None and rows.shape[1] != expected_width:
        problems.append(f"its {meta.encoding!r} rows have width {rows.shape[1]}, expected {expected_width}")
    for name, tensor, limit in (("input_ids", record.input_ids, meta.vocab_size),
                                ("target_argmax", record.target_argmax, meta.vocab_size),
                                ("topk_ids", record.topk_ids, len(meta.selected_token_ids))):
        if tensor is not None and tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= limit):
            problems.append(f"{name} has values outside [0, {limit})")
    if problems:
        raise ValueError(f"sample {index} does not fit the cache: " + "; ".join(problems))


def _check_side_tensors(meta: Manifest, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    allowed = SIDE_FILES[name]
    vocab, hidden = meta.vocab_size, meta.hidden_size
    problems = [f"unexpected tensor {k!r} (allowed: {list(allowed)})" for k in tensors if k not in allowed]
    if "weight" not in tensors:
        problems.append("tensor 'weight' is missing")
    elif tuple(tensors["weight"].shape) != (vocab, hidden):
        problems.append(f"weight has shape {tuple(tensors['weight'].shape)}, expected [V, H] = ({vocab}, {hidden})")
    if "bias" in tensors and tuple(tensors["bias"].shape) != (vocab,):
        problems.append(f"bias has shape {tuple(tensors['bias'].shape)}, expected [V] = ({vocab},)")
    if problems:
        raise ValueError(f"side file {name!r}: " + "; ".join(problems))

