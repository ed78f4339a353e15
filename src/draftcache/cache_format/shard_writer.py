"""``ShardFileWriter``: one shard written in place as its samples arrive, in any order.

The shard's safetensors header depends only on each sample's token count ``S_j`` and supervised
count ``M_j`` (and the manifest), which are known before the target runs. So the file is
created at its final size up front (header and offsets written, the rest a hole), and each
sample's rows are written with ``pwrite`` straight to their place as soon as its batch is on the
host. Host memory is one batch of records, whatever the shard size; the bytes are exactly those
of a one-shot ``write_safetensors`` of the same records (same layout function).

``commit()`` checks that every sample arrived, fsyncs, hashes the file (one sequential read,
from the page cache), and only then commits it with ``os.replace``; ``abort()`` removes the
temporary. Until the commit the file is ``shard-<k>.safetensors.tmp-<pid>``, which a resumed run
deletes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from draftcache.cache_format.checksum import commit_file, temporary_path
from draftcache.cache_format.container import safetensors_layout
from draftcache.cache_format.manifest import Manifest, ShardEntry
from draftcache.cache_format.record import SampleRecord
from draftcache.cache_format.fp8 import quantize_rows, scale_name
from draftcache.cache_format.schema import quantized_tensors, shard_filename, shard_metadata, shard_tensor_specs

__all__ = ["ShardFileWriter"]

_READ_CHUNK = 8 << 20
_TOKEN_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", "aux_hidden_states_scale")  # [S, ...] rows per sample


class ShardFileWriter:
    """Write shard ``index`` of the cache ``meta`` describes: global samples
    ``[meta.shard_first_sample(index), ...)`` with ``num_tokens[j]`` tokens and
    ``num_supervised[j]`` supervised positions each (``j`` = position inside the shard).

    ``on_bytes(n)`` is called after every ``n`` bytes written (progress bars).
    """

    def __init__(self, cache_dir: str | Path, meta: Manifest, index: int, num_tokens: Sequence[int],
                 num_supervised: Sequence[int], *, on_bytes: Callable[[int], None] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
        n = meta.shard_num_samples(index)
        if len(num_tokens) != n or len(num_supervised) != n:
            raise ValueError(f"shard {index} holds {n} samples; got {len(num_tokens)} token counts and "
                             f"{len(num_supervised)} supervised counts")
        self.index = index
        self.first_sample = meta.shard_first_sample(index)
        self.path = Path(cache_dir) / shard_filename(index)
        self._meta = meta
        self._on_bytes = on_bytes
        self._tokens = torch.tensor([0, *num_tokens], dtype=torch.int64).cumsum(0)  # [n+1] sample_offsets
        self._rows = torch.tensor([0, *num_supervised], dtype=torch.int64).cumsum(0)  # [n+1] supervised_offsets
        self._token_at = self._tokens.tolist()
        self._row_at = self._rows.tolist()
        self._written = [False] * n
        self._skipped: list[int] = []  # local ids left out (non-finite), dropped by commit()
        self._left = n
        total_tokens, total_rows = self._token_at[-1], self._row_at[-1]
        specs = shard_tensor_specs(meta.data, n, total_tokens, total_rows)
        self._quantized = quantized_tensors(meta.data)
        self._groups = {name: shape[1] for name, _, shape in specs if name.endswith("_scale")}
        self._dtypes = {name: dt for name, dt, _ in specs}
        self._row_bytes = {name: dt.itemsize * (shape[1] if len(shape) > 1 else 1) for name, dt, shape in specs}
        prefix, self._offsets, self.nbytes = safetensors_layout(specs, shard_metadata(self.first_sample, n))
        self._tmp = temporary_path(self.path)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies
        try:
            os.ftruncate(self._fd, self.nbytes)
            self._pwrite(prefix, 0)
            self._pwrite(self._tokens, self._offsets["sample_offsets"])
            self._pwrite(self._rows, self._offsets["supervised_offsets"])
        except BaseException:
            self.abort()
            raise

    @property
    def num_samples(self) -> int:
        return len(self._written)

    def write(self, local: int, record: SampleRecord | Mapping[str, torch.Tensor]) -> None:
        """Write sample ``first_sample + local`` (CPU tensors, ``SampleRecord`` fields); its token
        and supervised counts must be those announced."""
        if isinstance(record, Mapping):
            record = SampleRecord(**record)
        if not 0 <= local < len(self._written) or self._written[local]:
            raise ValueError(f"shard {self.index}: sample {self.first_sample + local} is outside the shard or was "
                             "already written")
        want = (self._token_at[local + 1] - self._token_at[local], self._row_at[local + 1] - self._row_at[local])
        if (record.num_tokens, record.num_supervised) != want:
            raise ValueError(f"shard {self.index}: sample {self.first_sample + local} has (tokens, supervised) = "
                             f"{(record.num_tokens, record.num_supervised)}, but the shard was sized for {want}")
        values = {name: getattr(record, name) for name in self._dtypes if hasattr(record, name)}
        for name in self._quantized:
            if name in self._dtypes and values[name].dtype != self._dtypes[name]:  # float rows: quantize here
                values[name], values[scale_name(name)] = quantize_rows(values[name], self._groups[scale_name(name)])
        for name, dtype in self._dtypes.items():
            if name.endswith("_offsets"):
                continue
            start = self._token_at[local] if name in _TOKEN_FIELDS else self._row_at[local]
            self._pwrite(values[name].to(dtype), self._offsets[name] + start * self._row_bytes[name])
        self._written[local] = True
        self._left -= 1

    def skip(self, local: int) -> None:
        """Leave sample ``first_sample + local`` out of the shard (the target produced NaN/Inf for it):
        ``commit`` then writes the shard without it and lists it in the entry's ``non_finite``."""
        if not 0 <= local < len(self._written) or self._written[local]:
            raise ValueError(f"shard {self.index}: sample {self.first_sample + local} is outside the shard or was "
                             "already written")
        self._written[local] = True
        self._skipped.append(local)
        self._left -= 1

    def commit(self) -> ShardEntry:
        """fsync, hash and commit the file; return its manifest entry (recording it is the caller's job)."""
        if self._left:
            missing = [self.first_sample + j for j, done in enumerate(self._written) if not done]
            raise ValueError(f"shard {self.index}: {len(missing)} sample(s) were never written (first: {missing[0]})")
        try:
            if self._skipped:
                self._compact()
            os.fsync(self._fd)
            digest = hashlib.sha256()
            position = 0
            while position < self.nbytes:
                chunk = os.pread(self._fd, min(_READ_CHUNK, self.nbytes - position), position)
                if not chunk:
                    raise OSError(f"{self._tmp}: short read while hashing at byte {position} of {self.nbytes}")
                digest.update(chunk)
                position += len(chunk)
            os.close(self._fd)
            self._fd = -1
            commit_file(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return ShardEntry(file=self.path.name, index=self.index, first_sample=self.first_sample,
                          num_samples=self.num_samples - len(self._skipped), num_tokens=self._token_at[-1],
                          num_supervised=self._row_at[-1], bytes=self.nbytes, sha256=digest.hexdigest(),
                          non_finite=tuple(sorted(self.first_sample + j for j in self._skipped)))

    def _compact(self) -> None:
        """Rewrite the temporary without the skipped samples: a new file sized for the kept ones,
        their rows copied from the first (rare: only a shard with non-finite samples pays it)."""
        skipped = set(self._skipped)
        keep = [j for j in range(len(self._written)) if j not in skipped]
        tokens = [self._token_at[j + 1] - self._token_at[j] for j in keep]
        rows = [self._row_at[j + 1] - self._row_at[j] for j in keep]
        new_tokens = torch.tensor([0, *tokens], dtype=torch.int64).cumsum(0)  # [n'+1]
        new_rows = torch.tensor([0, *rows], dtype=torch.int64).cumsum(0)      # [n'+1]
        specs = shard_tensor_specs(self._meta.data, len(keep), int(new_tokens[-1]), int(new_rows[-1]))
        prefix, offsets, nbytes = safetensors_layout(specs, shard_metadata(self.first_sample, len(keep)))
        tmp = temporary_path(self.path.with_name(self.path.name + ".compact"))
        old_fd, old_tmp, old_offsets = self._fd, self._tmp, self._offsets
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, nbytes)
            self._fd = fd
            self._pwrite(prefix, 0)
            self._pwrite(new_tokens, offsets["sample_offsets"])
            self._pwrite(new_rows, offsets["supervised_offsets"])
            for name in self._dtypes:
                if name.endswith("_offsets"):
                    continue
                at = self._token_at if name in _TOKEN_FIELDS else self._row_at
                size, dst = self._row_bytes[name], offsets[name]
                for j in keep:
                    nbytes_j = (at[j + 1] - at[j]) * size
                    if nbytes_j:
                        self._pwrite(os.pread(old_fd, nbytes_j, old_offsets[name] + at[j] * size), dst)
                    dst += nbytes_j
        except BaseException:
            os.close(fd)
            self._fd = old_fd
            Path(tmp).unlink(missing_ok=True)
            raise
        os.close(old_fd)
        Path(old_tmp).unlink(missing_ok=True)
        self._tmp, self._offsets, self.nbytes = tmp, offsets, nbytes
        self._token_at, self._row_at = new_tokens.tolist(), new_rows.tolist()

    def abort(self) -> None:
        """Close and remove the temporary file (a no-op after ``commit``)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            Path(self._tmp).unlink(missing_ok=True)

    def _pwrite(self, data: bytes | torch.Tensor, position: int) -> None:
        if torch.is_tensor(data):
            data = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        view = memoryview(data)
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self._fd, view[done:], position + done)
        if self._on_bytes is not None:
            self._on_bytes(view.nbytes)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.abort()
