"""Load chat conversations from local files, a saved ``datasets`` folder or the Hugging Face hub.

Inputs (``source``):

* a ``.jsonl`` file (one record per line), a ``.json`` file (a JSON array of records, a single
  record, or JSON lines), a ``.parquet`` file (one record per row);
* a directory: every ``.json``/``.jsonl``/``.parquet`` file below it (recursively, hidden
  files and folders ignored), read in order of their relative path;
* a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* otherwise a hub dataset name, loaded with ``datasets.load_dataset(name, split=split or "train")``.

Order (the same as NeMo AutoModel): plain files are read in file order and ``shuffle_seed`` is
only recorded; ``datasets``-backed inputs (hub, ``save_to_disk``) are shuffled with
``shuffle_seed`` (not at all when it is None). ``num_samples`` then keeps the first N valid
conversations.

Each record is named by its ``source``: ``/abs/path/data.jsonl:12`` (1-based line; for a JSON
array the line where the element starts; for parquet the 1-based row), ``hub:name[split]#7`` or
``/abs/path/saved[split]#7`` (0-based row of the unshuffled dataset).

Reading is lazy: files are read as records are taken (a JSON array is parsed element by element
from 1 MiB chunks, never held whole). ``load_conversations(..., lazy=True)`` returns a set that
reads nothing until it is iterated, so a consumer that stops early (``tokenize_all(limit=N)``)
leaves the rest of the input unread and the skip counts describe exactly the records read.

A JSON array that ends early (a truncated download: the real ShareGPT split file breaks off
inside a string) yields every complete element; the broken tail is one ``invalid_json`` record
named by the line it starts on. Any other syntax error in an array ends the read with
:class:`DataFileError`, since the elements after it cannot be located.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Union, overload

from draftcache.data.records import (
    Conversation,
    NoConversationsError,
    SkipCounts,
    SkippedRecord,
    normalize_record,
)

__all__ = [
    "DATA_EXTENSIONS",
    "ConversationSet",
    "DataFileError",
    "load_conversations",
]

DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")

# (source, parsed record), or a record that could not even be parsed.
_Row = Union[tuple[str, Any], SkippedRecord]

# Bytes read at a time from a JSON array file.
_READ_CHUNK = 1 << 20
# A parse error this close to the end of the text read so far may only mean "more text needed"
# (a literal, number or escape cut by the chunk boundary).
_LOOKAHEAD = 16


class DataFileError(ValueError):
    """A whole input file is unreadable (broken JSON array, corrupt parquet, not UTF-8)."""


@dataclass
class ConversationSet(Sequence[Conversation]):
    """The conversations of one input plus what the cache manifest needs to identify it.

    A set is either loaded (``lazy=False``: ``conversations`` holds them, the counts are final)
    or lazy: nothing is read until it is iterated, once; each record is read, normalised and
    counted as the iteration reaches it, so after a consumer stops the counts describe exactly
    the records read. A lazy set has no length and no indexing.

    Attributes:
        conversations: valid conversations in load order (empty for a lazy set).
        skipped: bad records counted by reason (so far, for a lazy set).
        input_data: the absolute path of a local input, or the hub dataset name.
        kind: ``"files"``, ``"saved_dataset"`` or ``"hub"``.
        split: the split read (``"train"`` by default for hub data; as given for files).
        shuffle_seed: the seed given (it reorders only ``datasets``-backed inputs).
        num_samples: the sample count asked for, or None. A loaded set holds at most this many
            conversations; a lazy set leaves the limit to its consumer (``tokenize_all(limit=)``).
        fingerprint: sha256 over the sorted relative paths and bytes of the local files, or None
            for hub data.
        datasets_fingerprint: ``datasets``' own fingerprint of the loaded table when there is one.
        dropped_turns: turns before the first user turn removed from the conversations read.
        dropped_turn_records: how many of those conversations lost such turns.
        strict: the first bad record raises ``BadRecordError`` instead of being counted.
        prompts: prompts-only input (records need a user turn, not an assistant one).
        lazy: see above.
    """

    conversations: list[Conversation]
    skipped: SkipCounts
    input_data: str
    kind: str
    split: str | None
    shuffle_seed: int | None
    num_samples: int | None
    fingerprint: str | None
    datasets_fingerprint: str | None = None
    files: list[str] = field(default_factory=list)
    dropped_turns: int = 0
    dropped_turn_records: int = 0
    strict: bool = False
    prompts: bool = False
    lazy: bool = False
    _rows: Iterator[_Row] | None = field(default=None, repr=False, compare=False)

    def _unsized(self) -> TypeError:
        return TypeError("a lazily read ConversationSet has no length or index: iterate it (once)")

    def __len__(self) -> int:
        if self.lazy:
            raise self._unsized()
        return len(self.conversations)

    @overload
    def __getitem__(self, index: int) -> Conversation: ...
    @overload
    def __getitem__(self, index: slice) -> list[Conversation]: ...
    def __getitem__(self, index):
        if self.lazy:
            raise self._unsized()
        return self.conversations[index]

    def __iter__(self) -> Iterator[Conversation]:
        if not self.lazy:
            return iter(self.conversations)
        if self._rows is None:
            raise RuntimeError(f"the lazily read conversations of {self.input_data!r} were already iterated; "
                               "load them again to read them again")
        rows, self._rows = self._rows, None
        return self._take(rows)

    def _take(self, rows: Iterator[_Row]) -> Iterator[Conversation]:
        """Normalise and count each row as it is reached; yield the valid conversations."""
        with contextlib.closing(rows):
            for row in rows:
                item = row if isinstance(row, SkippedRecord) else normalize_record(row[1], row[0], prompts=self.prompts)
                if isinstance(item, SkippedRecord):
                    if self.strict:
                        raise item.error() from None
                    self.skipped.add(item.reason, item.source)
                    continue
                if item.dropped_turns:
                    self.dropped_turns += item.dropped_turns
                    self.dropped_turn_records += 1
                yield item

    def identity(self) -> dict[str, Any]:
        """The fields that identify this input in a cache manifest (JSON-serialisable), plus the
        leading turns dropped from the conversations read (final once reading has stopped)."""
        return {
            "input_data": self.input_data,
            "kind": self.kind,
            "split": self.split,
            "shuffle_seed": self.shuffle_seed,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "datasets_fingerprint": self.datasets_fingerprint,
            "dropped_leading_turns": {"turns": self.dropped_turns, "records": self.dropped_turn_records},
        }


def load_conversations(
    source: str,
    *,
    split: str | None = None,
    strict: bool = False,
    shuffle_seed: int | None = 42,
    num_samples: int | None = None,
    trust_remote_code: bool = False,
    prompts: bool = False,
    lazy: bool = False,
) -> ConversationSet:
    """Load and normalise conversations (see the module docstring for inputs and order).

    Bad records are skipped and counted in ``result.skipped``; with ``strict=True`` the first
    one raises :class:`BadRecordError` naming its file and line. ``prompts=True`` accepts records
    without an assistant turn (evaluation prompts; see ``Conversation.prompt_messages``).

    ``lazy=False`` reads records until ``num_samples`` valid conversations are held (all when
    None). ``lazy=True`` only locates the input (missing paths and bad arguments still fail here)
    and returns a set that reads as it is iterated; ``num_samples`` is then recorded for the
    consumer, which stops reading once it has that many usable samples.

    Raises ``FileNotFoundError`` for a missing local path or a directory without data files,
    :class:`DataFileError` for an unreadable file (from iteration, for a lazy set) and, unless
    ``lazy``, :class:`NoConversationsError` when nothing valid remains.
    ``trust_remote_code`` is forwarded to ``datasets.load_dataset`` only when True (``datasets``
    >= 4 no longer runs loading scripts and ignores it with an error message).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"input data must be a path or a dataset name; got {source!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None; got {num_samples!r}")

    skipped = SkipCounts()
    options = dict(strict=strict, prompts=prompts, lazy=True)
    local = _local_path(source)
    if local is None:
        dataset, resolved_split = _load_hub(source, split, trust_remote_code)
        rows = _dataset_rows(dataset, f"hub:{source}[{resolved_split}]", shuffle_seed)
        result = ConversationSet([], skipped, source, "hub", resolved_split, shuffle_seed, num_samples,
                                 fingerprint=None, datasets_fingerprint=getattr(dataset, "_fingerprint", None),
                                 **options)
    elif _is_saved_dataset(local):
        dataset, label = _load_saved(local, split)
        files = _all_files(local)
        rows = _dataset_rows(dataset, label, shuffle_seed)
        result = ConversationSet([], skipped, str(local), "saved_dataset", split, shuffle_seed, num_samples,
                                 fingerprint=_hash_files(files, local),
                                 datasets_fingerprint=getattr(dataset, "_fingerprint", None),
                                 files=[str(f) for f in files], **options)
    else:
        files = _data_files(local)
        root = local if local.is_dir() else local.parent
        rows = _file_rows(files)
        result = ConversationSet([], skipped, str(local), "files", split, shuffle_seed, num_samples,
                                 fingerprint=_hash_files(files, root), files=[str(f) for f in files], **options)
    result._rows = rows
    if lazy:
        return result

    taking = iter(result)
    try:
        result.conversations = list(islice(taking, num_samples))
    finally:
        taking.close()
    result.lazy = False
    if not result.conversations:
        need = "a user turn" if prompts else "an assistant turn after a user turn"
        raise NoConversationsError(
            f"no valid conversation in {result.input_data!r} ({skipped.summary()}); "
            f"each record needs a 'conversations' (ShareGPT) or 'messages' (OpenAI) list with {need}"
        )
    return result


# ---- locating inputs -------------------------------------------------------------------------

def _local_path(source: str) -> Path | None:
    """The resolved local path, None for a hub name, FileNotFoundError for a missing local path."""
    path = Path(os.path.expanduser(source))
    if path.exists():
        return path.resolve()
    looks_local = (
        source.startswith(("/", "./", "../", "~")) or source in (".", "..") or source.lower().endswith(DATA_EXTENSIONS)
    )
    if looks_local:
        raise FileNotFoundError(
            f"input data {source!r} does not exist (resolved to {path.absolute()}); check the path. "
            "A Hugging Face dataset name looks like 'org/name' without a file extension."
        )
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _all_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and _visible(p.relative_to(root))),
                  key=lambda p: p.relative_to(root).as_posix())


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise ValueError(
                f"unsupported input file type {path.suffix or '(none)'!r} for {path}; "
                f"expected one of {', '.join(DATA_EXTENSIONS)}"
            )
        return [path]
    files = [p for p in _all_files(path) if p.suffix.lower() in DATA_EXTENSIONS]
    if not files:
        raise FileNotFoundError(
            f"input directory {path} holds no {', '.join(DATA_EXTENSIONS)} file (hidden files are ignored); "
            "point --input-data at a data file or a directory of them"
        )
    return files


def _hash_files(files: list[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root``, its size and its bytes, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- plain files -----------------------------------------------------------------------------

def _file_rows(files: list[Path]) -> Iterator[_Row]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with open(path, "rb") as f:
                yield from _json_lines(f, path)
        elif suffix == ".json":
            yield from _json_file(path)
        else:
            yield from _parquet_rows(path)


def _json_lines(lines: Iterable[bytes], path: Path) -> Iterator[_Row]:
    """One record per non-blank line; a line that is not UTF-8 JSON is an ``invalid_json`` record."""
    for lineno, raw in enumerate(lines, start=1):
        source = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield SkippedRecord(source, "invalid_json", f"the line is not UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue  # blank lines separate nothing and are not records
        try:
            yield source, json.loads(text)
        except json.JSONDecodeError as exc:
            yield SkippedRecord(source, "invalid_json", f"the line is not valid JSON ({exc.msg} at column {exc.colno})")


def _text_chunks(path: Path) -> Iterator[str]:
    """The file's text, decoded from UTF-8 (a BOM dropped) ``_READ_CHUNK`` bytes at a time."""
    size = _READ_CHUNK
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset = 0  # bytes read before this chunk
    with open(path, "rb") as f:
        while True:
            raw = f.read(size)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise DataFileError(f"{path}: not UTF-8 text (bad byte at offset {offset - pending + exc.start}); "
                                    "re-encode the file as UTF-8") from None
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _json_file(path: Path) -> Iterator[_Row]:
    chunks = _text_chunks(path)
    text = ""
    for chunk in chunks:
        text += chunk
        if text.strip():
            break
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _JsonArray(path, chunks, text).rows(start)
        return
    text += "".join(chunks)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(io.BytesIO(text.encode("utf-8")), path)  # not one JSON value: JSON lines
        return
    yield f"{path}:{text.count(chr(10), 0, start) + 1}", value


class _JsonArray:
    """Walk a JSON array element by element, reading the file in chunks, so each record is named
    by the line it starts on and only about one element is held in memory at a time."""

    def __init__(self, path: Path, chunks: Iterator[str], text: str) -> None:
        self.path = path
        self.chunks = chunks
        self.buf = text            # the text from the last compaction point on
        self.eof = False
        self.line = 1              # line number at buf[counted]
        self.counted = 0
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if not self.eof:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.eof = True
            else:
                self.buf += chunk
        return not self.eof

    def line_at(self, p: int) -> int:
        self.line += self.buf.count("\n", self.counted, p)
        self.counted = p
        return self.line

    def compact(self, p: int) -> int:
        """Forget the text before ``p``; return ``p``'s new index (0)."""
        self.line_at(p)
        self.buf = self.buf[p:]
        self.counted = 0
        return 0

    def skip_ws(self, p: int) -> int:
        while True:
            while p < len(self.buf) and self.buf[p] in " \t\r\n":
                p += 1
            if p < len(self.buf) or not self.more():
                return p

    def broken(self, p: int, what: str) -> DataFileError:
        return DataFileError(
            f"{self.path}:{self.line_at(p)}: the JSON array is not valid JSON ({what}); the rest of the file cannot be "
            "read. Repair the file, or convert it to JSON lines (.jsonl) where a bad line is skipped on its own"
        )

    def truncated(self, p: int, what: str) -> SkippedRecord:
        return SkippedRecord(f"{self.path}:{self.line_at(p)}", "invalid_json",
                             f"the file ends inside the JSON array ({what}): it is truncated, so this last element is lost")

    def element(self, p: int) -> tuple[Any, int] | SkippedRecord:
        """Decode the element at ``p``: (value, end), or the truncated tail as a skipped record."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, p)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - _LOOKAHEAD
                if cut and self.more():
                    continue  # the chunk boundary cut the element: read on
                rest = self.buf[exc.pos:].strip()
                if self.eof and (exc.msg.startswith("Unterminated string")
                                 or (len(rest) <= _LOOKAHEAD and not any(c in rest for c in "]}"))):
                    return self.truncated(p, exc.msg)
                raise self.broken(exc.pos, exc.msg) from None
            if end == len(self.buf) and self.more():
                continue  # a number may go on in the next chunk
            return value, end

    def rows(self, start: int) -> Iterator[_Row]:
        p = self.skip_ws(start + 1)
        if self.buf[p:p + 1] == "]":
            p += 1
        else:
            while True:
                if p >= _READ_CHUNK:
                    p = self.compact(p)
                if p >= len(self.buf):  # "[" or "," at the very end
                    yield self.truncated(p, "expected an element")
                    return
                decoded = self.element(p)
                if isinstance(decoded, SkippedRecord):
                    yield decoded
                    return
                value, end = decoded
                yield f"{self.path}:{self.line_at(p)}", value
                p = self.skip_ws(end)
                if self.buf[p:p + 1] == ",":
                    p = self.skip_ws(p + 1)
                elif self.buf[p:p + 1] == "]":
                    p += 1
                    break
                elif p >= len(self.buf):
                    yield self.truncated(p, "no closing ']'")
                    return
                else:
                    raise self.broken(p, "expected ',' or ']' after an element")
        p = self.skip_ws(p)
        if p != len(self.buf):
            raise self.broken(p, "extra data after the closing ']'")


def _parquet_rows(path: Path) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable parquet file after row {row} ({exc}); rewrite or remove it") from None


# ---- datasets-backed inputs ------------------------------------------------------------------

def _load_hub(name: str, split: str | None, trust_remote_code: bool) -> tuple[Any, str]:
    import datasets

    resolved = split or "train"
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    dataset = datasets.load_dataset(name, split=resolved, **extra)
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"hub dataset {name!r} split {resolved!r} loaded as {type(dataset).__name__}, expected a Dataset")
    return dataset, resolved


def _load_saved(path: Path, split: str | None) -> tuple[Any, str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ValueError(f"saved dataset {path} has no split {name!r}; available: {sorted(loaded)}. Pass --split")
        return loaded[name], f"{path}[{name}]"
    return loaded, str(path)


def _dataset_rows(dataset: Any, label: str, shuffle_seed: int | None) -> Iterator[_Row]:
    """Rows of a ``datasets.Dataset``, in ``dataset.shuffle(seed=shuffle_seed)`` order when a seed
    is given, each named by its index in the unshuffled dataset."""
    import numpy as np

    if shuffle_seed is None:
        order = range(len(dataset))
        rows: Iterable[Any] = dataset
    else:
        # The permutation datasets' own shuffle(seed=...) draws; kept to name the original row.
        order = np.random.default_rng(shuffle_seed).permutation(len(dataset))
        rows = dataset.select(order, keep_in_memory=True)
    for index, record in zip(order, rows):
        yield f"{label}#{int(index)}", record
