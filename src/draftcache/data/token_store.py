"""Tokenized samples on disk, so that host memory does not grow with the dataset.

A precompute over 10^6 conversations of 1.5k tokens holds 1.5e9 tokens: as ``TokenizedSample``
tensors (two int64 per token) that is 24 GB on every rank. A ``TokenStore`` keeps them in one
directory instead, written once while tokenizing and read sample by sample (``pread``: nothing
is mapped, so reading the whole store leaves the process's memory where it was):

    input_ids.bin       [T] int32      every sample's token ids, concatenated
    loss_mask.bin       [T] uint8      position-aligned, as ``TokenizedSample.loss_mask``
    offsets.bin         [N + 1] int64  sample i is tokens [offsets[i], offsets[i + 1])
    supervised.bin      [N] int32      loss_mask.sum() of each sample (planning needs only these
                                       and the lengths)
    sources.txt         utf-8          each sample's source, concatenated
    source_offsets.bin  [N + 1] int64  byte offsets into sources.txt

``store[i]`` is a ``TokenizedSample`` with int64 tensors equal to what was appended, so
everything downstream (and every byte of a cache) is the same as with a list of samples.
Whole-store passes (``iter_lengths``, ``supervised_token_counts``) read in fixed-size chunks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from draftcache.data.chat import TokenizedSample

__all__ = ["TokenStore", "TokenStoreWriter", "sample_lengths", "share_token_counts"]

_FILES = ("input_ids.bin", "loss_mask.bin", "offsets.bin", "supervised.bin", "sources.txt", "source_offsets.bin")
_CHUNK_SAMPLES = 1 << 13   # samples per chunk of a whole-store pass
_CHUNK_TOKENS = 1 << 18    # tokens per chunk of a whole-store pass (~3 MB transient)
_BUFFER = 1 << 20


class TokenStoreWriter:
    """Append ``TokenizedSample``s to a new store in ``directory`` (created; must not hold one)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if any((self.directory / name).exists() for name in _FILES):
            raise FileExistsError(f"{self.directory} already holds a token store; use a new directory")
        self._files = {name: open(self.directory / name, "wb", buffering=_BUFFER) for name in _FILES}
        self._tokens = 0
        self._source_bytes = 0
        self._count = 0
        self._write("offsets.bin", np.zeros(1, dtype=np.int64))
        self._write("source_offsets.bin", np.zeros(1, dtype=np.int64))

    def __len__(self) -> int:
        return self._count

    def _write(self, name: str, array: np.ndarray) -> None:
        self._files[name].write(array.tobytes())

    def append(self, sample: TokenizedSample) -> None:
        ids = sample.input_ids.numpy() if hasattr(sample.input_ids, "numpy") else np.asarray(sample.input_ids)
        mask = sample.loss_mask.numpy() if hasattr(sample.loss_mask, "numpy") else np.asarray(sample.loss_mask)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(np.int32).max):
            raise ValueError(f"{sample.source}: token ids must lie in [0, 2**31) to be stored as int32")
        self._write("input_ids.bin", ids.astype(np.int32))
        self._write("loss_mask.bin", mask.astype(np.uint8))
        self._tokens += ids.size
        self._write("offsets.bin", np.array([self._tokens], dtype=np.int64))
        self._write("supervised.bin", np.array([int(mask.sum())], dtype=np.int32))
        source = sample.source.encode("utf-8")
        self._files["sources.txt"].write(source)
        self._source_bytes += len(source)
        self._write("source_offsets.bin", np.array([self._source_bytes], dtype=np.int64))
        self._count += 1

    def close(self) -> "TokenStore":
        """Flush and close the files; the store is then read with ``TokenStore(directory)``."""
        for handle in self._files.values():
            handle.close()
        return TokenStore(self.directory)


class TokenStore(Sequence[TokenizedSample]):
    """The samples of the store in ``directory`` (or the range ``[start, stop)`` of them: slicing
    gives a view, not a copy). Holds one open file per array and nothing per sample."""

    def __init__(self, directory: str | os.PathLike, start: int = 0, stop: int | None = None,
                 _fds: dict[str, int] | None = None):
        self.directory = Path(directory)
        if _fds is None:
            missing = [name for name in _FILES if not (self.directory / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{self.directory} is not a token store (missing {missing})")
            _fds = {name: os.open(self.directory / name, os.O_RDONLY) for name in _FILES}
        self._fds = _fds
        total = os.fstat(_fds["offsets.bin"]).st_size // 8 - 1
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise IndexError(f"token store range [{start}, {stop}) is outside its {total} samples")
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a TokenStore slice must be contiguous (step 1)")
            return TokenStore(self.directory, self.start + first, self.start + max(first, last), self._fds)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample {index} is outside this store's {n} samples")
        i = self.start + index
        a, b = self._read("offsets.bin", np.int64, i, 2)
        s, e = self._read("source_offsets.bin", np.int64, i, 2)
        ids = self._read("input_ids.bin", np.int32, int(a), int(b - a)).astype(np.int64)
        mask = self._read("loss_mask.bin", np.uint8, int(a), int(b - a)).astype(np.int64)
        source = os.pread(self._fds["sources.txt"], int(e - s), int(s)).decode("utf-8")
        import torch

        return TokenizedSample(torch.from_numpy(ids), torch.from_numpy(mask), source)

    def __iter__(self) -> Iterator[TokenizedSample]:
        for i in range(len(self)):
            yield self[i]

    def _read(self, name: str, dtype, first: int, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        data = os.pread(self._fds[name], count * size, first * size)
        if len(data) != count * size:
            raise OSError(f"{self.directory / name} is truncated (wanted {count} items at {first})")
        return np.frombuffer(data, dtype=dtype)

    def iter_lengths(self) -> Iterator[tuple[int, int]]:
        """``(num_tokens, num_supervised)`` of every sample in order, read a chunk at a time."""
        for first in range(self.start, self.stop, _CHUNK_SAMPLES):
            count = min(_CHUNK_SAMPLES, self.stop - first)
            lengths = np.diff(self._read("offsets.bin", np.int64, first, count + 1))
            supervised = self._read("supervised.bin", np.int32, first, count)
            yield from zip(lengths.tolist(), supervised.tolist())

    def supervised_token_counts(self, vocab_size: int) -> "torch.Tensor":
        """``[V]`` int64 counts of the supervised ids of these samples (``data.supervised_token_counts``
        over them), one chunk of tokens at a time."""
        import torch

        counts = np.zeros(vocab_size, dtype=np.int64)
        a, b = (int(x) for x in self._read("offsets.bin", np.int64, self.start, 1).tolist() +
                self._read("offsets.bin", np.int64, self.stop, 1).tolist())
        for first in range(a, b, _CHUNK_TOKENS):
            count = min(_CHUNK_TOKENS, b - first)
            ids = self._read("input_ids.bin", np.int32, first, count)
            mask = self._read("loss_mask.bin", np.uint8, first, count).astype(bool)
            counts += np.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
        return torch.from_numpy(counts)

    def close(self) -> None:
        """Close the files (shared by every view of the store)."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def sample_lengths(samples: Sequence[TokenizedSample]) -> Iterator[tuple[int, int]]:
    """``(num_tokens, num_supervised)`` of every sample, in order: from a ``TokenStore`` a chunk at
    a time (what planning shards needs, without the samples)."""
    if isinstance(samples, TokenStore):
        return samples.iter_lengths()
    return ((len(s.input_ids), int(s.loss_mask.sum())) for s in samples)


def share_token_counts(samples: Sequence[TokenizedSample], vocab_size: int, rank: int, world_size: int
                       ) -> "torch.Tensor":
    """``[V]`` int64 supervised-token counts of rank ``rank``'s contiguous share of ``samples``
    (``world_size`` shares); summed over the ranks they are the counts of all samples."""
    n = len(samples)
    share = samples[rank * n // world_size : (rank + 1) * n // world_size]
    if isinstance(share, TokenStore):
        return share.supervised_token_counts(vocab_size)
    from draftcache.data.vocab import supervised_token_counts

    return supervised_token_counts([s.input_ids for s in share], [s.loss_mask for s in share], vocab_size)
