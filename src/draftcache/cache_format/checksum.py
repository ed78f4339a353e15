"""File integrity: streamed sha256 and the one commit point every cache file goes through.

Commit protocol (``atomic_write_bytes`` / ``atomic_write_json`` / ``commit_file``): write
``<name>.tmp-<pid>`` in the destination directory, flush, fsync, ``os.replace`` onto the final
name, fsync the directory. A crash leaves either the old file or the new one, plus at worst a
stray temporary that ``remove_stale_temporaries`` deletes on resume. ``os.replace`` gives the
final name a new inode, so a reader that has the old file memory-mapped keeps valid data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CHUNK_BYTES", "sha256_file", "temporary_path", "fsync_dir", "commit_file", "atomic_write_bytes",
           "atomic_write_json", "dumps_json"]

CHUNK_BYTES = 8 << 20  # 8 MiB: large enough to stream at disk speed, small enough to keep memory flat

TMP_MARKER = ".tmp-"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in ``CHUNK_BYTES`` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def temporary_path(path: str | os.PathLike) -> Path:
    """``<path>.tmp-<pid>``: the temporary a file is written to before it is committed."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """Atomically move an already written and fsynced ``tmp_path`` onto ``path`` and fsync the directory."""
    os.replace(tmp_path, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (temporary -> fsync -> ``os.replace`` -> fsync dir)."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (``dumps_json`` layout, trailing newline) to ``path`` atomically."""
    atomic_write_bytes(path, (dumps_json(obj) + "\n").encode("utf-8"))


def dumps_json(obj: Any, indent: int = 2) -> str:
    """JSON that stays readable for large manifests: objects are indented, lists of scalars
    (token counts, vocabulary ids) stay on one line, and each object inside a list (a shard
    entry) takes one line. Key order is the insertion order, so equal inputs give equal text.
    """
    return _dumps(obj, indent, 0)


def _dumps(obj: Any, indent: int, level: int) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        pad = " " * (indent * (level + 1))
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * (indent * level) + "}"
    if isinstance(obj, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in obj):
            pad = " " * (indent * (level + 1))
            items = [pad + json.dumps(v, separators=(", ", ": ")) for v in obj]
            return "[\n" + ",\n".join(items) + "\n" + " " * (indent * level) + "]"
        return json.dumps(list(obj), separators=(",", ":"))
    return json.dumps(obj)
