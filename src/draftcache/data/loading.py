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
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from draftcache.data.records import (
    BadRecordError,
    Conversation,
    NoConversationsError,
    SkipCounts,
    _Skip,
    normalize_record,
)

__all__ = [
    "DATA_EXTENSIONS",
    "ConversationSet",
    "DataFileError",
    "load_conversations",
]

DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")

# (source, parsed record, problem): problem is set when the record could not even be parsed.
_Row = tuple[str, Any, "_Skip | None"]


class DataFileError(ValueError):
    """A whole input file is unreadable (broken JSON array, corrupt parquet, not UTF-8)."""


@dataclass
class ConversationSet(Sequence[Conversation]):
    """The loaded conversations plus what the cache manifest needs to identify the input.

    Attributes:
        conversations: valid conversations in load order.
        skipped: bad records counted by reason.
        input_data: the absolute path of a local input, or the hub dataset name.
        kind: ``"files"``, ``"saved_dataset"`` or ``"hub"``.
        split: the split read (``"train"`` by default for hub data; as given for files).
        shuffle_seed: the seed given (it reorders only ``datasets``-backed inputs).
        num_samples: the limit given, or None.
        fingerprint: sha256 over the sorted relative paths and bytes of the local files, or None
            for hub data.
        datasets_fingerprint: ``datasets``' own fingerprint of the loaded table when there is one.
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

    def __len__(self) -> int:
        return len(self.conversations)

    @overload
    def __getitem__(self, index: int) -> Conversation: ...
    @overload
    def __getitem__(self, index: slice) -> list[Conversation]: ...
    def __getitem__(self, index):
        return self.conversations[index]

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.conversations)

    def identity(self) -> dict[str, Any]:
        """The fields that identify this input in a cache manifest (JSON-serialisable)."""
        return {
            "input_data": self.input_data,
            "kind": self.kind,
            "split": self.split,
            "shuffle_seed": self.shuffle_seed,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "datasets_fingerprint": self.datasets_fingerprint,
        }


def load_conversations(
    source: str,
    *,
    split: str | None = None,
    strict: bool = False,
    shuffle_seed: int | None = 42,
    num_samples: int | None = None,
    trust_remote_code: bool = False,
) -> ConversationSet:
    """Load and normalise conversations (see the module docstring for inputs and order).

    Bad records are skipped and counted in ``result.skipped``; with ``strict=True`` the first
    one raises :class:`BadRecordError` naming its file and line. Raises ``FileNotFoundError``
    for a missing local path or a directory without data files, :class:`DataFileError` for an
    unreadable file and :class:`NoConversationsError` when nothing valid remains.
    ``trust_remote_code`` is forwarded to ``datasets.load_dataset`` only when True (``datasets``
    >= 4 no longer runs loading scripts and ignores it with an error message).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"input data must be a path or a dataset name; got {source!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None; got {num_samples!r}")

    skipped = SkipCounts()
    local = _local_path(source)
    if local is None:
        dataset, resolved_split = _load_hub(source, split, trust_remote_code)
        rows = _dataset_rows(dataset, f"hub:{source}[{resolved_split}]", shuffle_seed)
        result = ConversationSet([], skipped, source, "hub", resolved_split, shuffle_seed, num_samples,
                                 fingerprint=None, datasets_fingerprint=getattr(dataset, "_fingerprint", None))
    elif _is_saved_dataset(local):
        dataset, label = _load_saved(local, split)
        files = _all_files(local)
        rows = _dataset_rows(dataset, label, shuffle_seed)
        result = ConversationSet([], skipped, str(local), "saved_dataset", split, shuffle_seed, num_samples,
                                 fingerprint=_hash_files(files, local),
                                 datasets_fingerprint=getattr(dataset, "_fingerprint", None),
                                 files=[str(f) for f in files])
    else:
        files = _data_files(local)
        root = local if local.is_dir() else local.parent
        rows = _file_rows(files)
        result = ConversationSet([], skipped, str(local), "files", split, shuffle_seed, num_samples,
                                 fingerprint=_hash_files(files, root), files=[str(f) for f in files])

    with contextlib.closing(rows):
        result.conversations = _collect(rows, skipped=skipped, strict=strict, num_samples=num_samples)
    if not result.conversations:
        raise NoConversationsError(
            f"no valid conversation in {result.input_data!r} ({skipped.summary()}); "
            "each record needs a 'conversations' (ShareGPT) or 'messages' (OpenAI) list with an assistant turn"
        )
    return result


def _collect(rows: Iterable[_Row], *, skipped: SkipCounts, strict: bool, num_samples: int | None) -> list[Conversation]:
    out: list[Conversation] = []
    for source, record, problem in rows:
        try:
            if problem is not None:
                raise problem
            conversation = normalize_record(record, source)
        except _Skip as skip:
            if strict:
                raise BadRecordError(source, skip.reason, skip.detail) from None
            skipped.add(skip.reason, source)
            continue
        out.append(conversation)
        if num_samples is not None and len(out) >= num_samples:
            break
    return out


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
    """One record per non-blank line; a line that is not UTF-8 JSON is an ``invalid_json`` row."""
    for lineno, raw in enumerate(lines, start=1):
        source = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield source, None, _Skip("invalid_json", f"the line is not UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue  # blank lines separate nothing and are not records
        try:
            yield source, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield source, None, _Skip("invalid_json", f"the line is not valid JSON ({exc.msg} at column {exc.colno})")


def _json_file(path: Path) -> Iterator[_Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-encode the file as UTF-8") from None
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _json_array(text, start, path)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(io.BytesIO(raw), path)  # not one JSON value: JSON lines
        return
    yield f"{path}:{text.count(chr(10), 0, start) + 1}", value, None


def _json_array(text: str, pos: int, path: Path) -> Iterator[_Row]:
    """Walk a JSON array element by element so each record is named by the line it starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def broken(p: int, what: str) -> DataFileError:
        return DataFileError(
            f"{path}:{line_at(p)}: the JSON array is not valid JSON ({what}); the rest of the file cannot be read. "
            "Repair the file, or convert it to JSON lines (.jsonl) where a bad line is skipped on its own"
        )

    pos = skip_ws(pos + 1)
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise broken(exc.pos, exc.msg) from None
            yield f"{path}:{line_at(pos)}", value, None
            pos = skip_ws(end)
            if text[pos:pos + 1] == ",":
                pos = skip_ws(pos + 1)
            elif text[pos:pos + 1] == "]":
                pos += 1
                break
            else:
                raise broken(pos, "expected ',' or ']' after an element")
    if skip_ws(pos) != len(text):
        raise broken(skip_ws(pos), "extra data after the closing ']'")


def _parquet_rows(path: Path) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record, None
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
        yield f"{label}#{int(index)}", record, None
