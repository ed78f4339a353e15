"""A deterministic safetensors writer: the same tensors and metadata always give the same bytes.

``safetensors.torch.save`` keeps ``__metadata__`` in a hash map whose order changes from one
process to the next, so two runs over the same records would produce different shard bytes
(and sha256). This module writes the container itself, following the safetensors layout:

    [8 bytes: header length, u64 little-endian][header: JSON, space-padded to a multiple of 8][data]

A tensor may be given as a list of chunks (same dtype and trailing shape) that are written one
after the other as if concatenated along dim 0, so a shard never needs a concatenated copy of
its samples in memory. The header holds ``__metadata__`` first (keys sorted) and then each tensor as
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the start of the data. Tensors
are laid out by decreasing item size (stable in the order given), so each starts at an offset
that is a multiple of its item size. The files load with ``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from draftcache.cache_format.checksum import commit_file, temporary_path

__all__ = ["SAFETENSORS_DTYPES", "safetensors_layout", "write_safetensors"]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Sequence[tuple[str, torch.Tensor | Sequence[torch.Tensor]]],
    metadata: Mapping[str, str],
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Write ``tensors`` (CPU; each a tensor or a non-empty list of chunks concatenated along
    dim 0) and ``metadata`` to ``path`` through the atomic commit protocol.

    Returns ``(file size in bytes, hex sha256 of the file)``; the hash is computed from the
    bytes as they are written, so the file is not read back. ``on_bytes(n)`` is called after each
    chunk of ``n`` bytes reaches the file (progress reporting).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    names = [name for name, _ in tensors]
    if len(set(names)) != len(names) or "__metadata__" in names:
        raise ValueError(f"tensor names must be unique and not '__metadata__'; got {names}")
    chunked = [(name, [t] if torch.is_tensor(t) else list(t)) for name, t in tensors]
    specs = []
    for name, chunks in chunked:
        dtype = _check_chunks(name, chunks)
        first = chunks[0]
        shape = tuple(first.shape) if first.dim() == 0 else (sum(int(c.shape[0]) for c in chunks), *first.shape[1:])
        specs.append((name, dtype, shape))
    prefix, _, size = safetensors_layout(specs, metadata)
    by_name = dict(chunked)
    payload = [chunk.contiguous().reshape(-1).view(torch.uint8)  # [nbytes] raw little-endian bytes
               for name in _data_order(specs) for chunk in by_name[name]]

    digest = hashlib.sha256()
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in [prefix, *(p.numpy() for p in payload)]:
                view = memoryview(chunk)
                f.write(view)
                digest.update(view)
                if on_bytes is not None:
                    on_bytes(view.nbytes)
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, Path(path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def _data_order(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Tensor names in data order: by decreasing item size, stable in the order given."""
    return [specs[i][0] for i in sorted(range(len(specs)), key=lambda i: -specs[i][1].itemsize)]


def safetensors_layout(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
                       ) -> tuple[bytes, dict[str, int], int]:
    """The file ``write_safetensors`` would write for tensors of these ``(name, dtype, shape)``:
    ``(prefix, {name: absolute byte offset of its data}, file size)``, where ``prefix`` is the
    8-byte length and the padded JSON header. Lets a writer pre-size a file and fill each
    tensor's rows in any order (``ShardFileWriter``) with the same bytes as a one-shot write."""
    header: dict[str, object] = {"__metadata__": {str(k): str(metadata[k]) for k in sorted(metadata)}}
    relative: dict[str, int] = {}
    offset = 0
    by_name = {name: (dtype, shape) for name, dtype, shape in specs}
    for name in _data_order(specs):
        dtype, shape = by_name[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= int(d)
        relative[name] = offset
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    return prefix, {name: len(prefix) + at for name, at in relative.items()}, len(prefix) + offset


def _check_chunks(name: str, chunks: list[torch.Tensor]) -> torch.dtype:
    if not chunks:
        raise ValueError(f"tensor {name!r} has no chunks; pass at least one tensor")
    first = chunks[0]
    if first.dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {first.dtype}, which safetensors cannot store")
    for chunk in chunks:
        if chunk.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {chunk.device}; move it to the CPU before writing")
        if chunk.dtype != first.dtype or chunk.shape[1:] != first.shape[1:] or (chunk.dim() == 0 and len(chunks) > 1):
            raise ValueError(f"chunks of tensor {name!r} must share dtype and trailing shape; got {first.dtype} "
                             f"{tuple(first.shape)} and {chunk.dtype} {tuple(chunk.shape)}")
    return first.dtype
