"""``open_cache`` / ``CacheReader``: random access to the samples of a cache, with the EAGLE-3 shift.

``reader[i]`` returns sample ``i`` (S real tokens, no padding) exactly as the trainer consumes it:

    input_ids          [S]     int64    shift_left_with_zero(stored ids): slot t holds x_{t+1}
    attention_mask     [S]     int64    ones (not shifted)
    loss_mask          [S]     int64    shift_left_with_zero(stored loss_mask)
    aux_hidden_states  [S, F]  storage dtype, NOT shifted (slot t = feature of position t)
    target_probs       [S, Vd] float32  slot t = the target's draft-vocab distribution at position
                                        t+1; zero rows where position t+1 is not supervised and in
                                        the last slot
    position_mask      [S, 1]  bool     t2d[target_argmax(t+1)] & loss_mask(t+1)

For ``hidden`` caches the targets are rebuilt from the stored final hidden states:
``softmax(final_hidden.float() @ W[selected].float().T (+ bias[selected]))``. A trainer can move
that matmul to its GPU by reading ``get_raw(i)`` in its DataLoader workers and calling
``rebuild_targets(raw, device)`` on the device (``reader[i] == rebuild_targets(get_raw(i))``).

Batch level (the trainer's fast path): ``get_raw_batch(indices, max_tokens=...)`` reads the
stored rows of several samples straight into one buffer (a raw batch, see ``batching.py``), and
``expand_batch(raw, device)`` turns it on the device into exactly ``collate_padded`` /
``pack_samples`` of the samples' ``reader[i]``: the dense ``[B, T, Vd]`` targets never exist on
the host.

A ``kind: "dflash"`` cache is never shifted: ``reader[i]`` is sample ``i`` as the DFlash trainer's
row (``expand_dflash_raw`` of that one sample, squeezed: ``input_ids``, ``loss_mask``,
``target_argmax [S]``, ``aux_hidden_states [S, F]``); batches go through ``get_raw_batch`` then
``expand_dflash_raw`` (see ``dflash.py``).

Shards are opened lazily (an LRU of at most ``MAX_OPEN_SHARDS`` open files); opening checks the
file size and header against the manifest, ``verify=True`` also its sha256.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import torch

from draftcache.cache_format.batching import collate_raw, raw_batch_layout
from draftcache.cache_format.dflash import expand_dflash_raw
from draftcache.cache_format.errors import CacheCorruptError
from draftcache.cache_format.manifest import Manifest, read_manifest
from draftcache.cache_format.resume import committed_shards
from draftcache.cache_format.fp8 import scale_name, stored_rows_on
from draftcache.cache_format.schema import (encoding_tensors, expected_shard_tensors, quantized_tensors, read_dtype,
                                            shard_metadata)
from draftcache.cache_format.shard_file import ShardFile
from draftcache.data.vocab import DraftVocab, select_draft_vocab
from draftcache.targets.supervision import compute_target_distribution

__all__ = ["MAX_OPEN_SHARDS", "CacheReader", "open_cache"]

MAX_OPEN_SHARDS = 8  # open file handles per reader (each DataLoader worker has its own reader)
_ALIGN = 64  # byte alignment of each field inside a raw batch buffer
_TOKEN_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", "aux_hidden_states_scale")
_SAMPLE_FIELDS = ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "target_probs", "position_mask")


def open_cache(path: str | os.PathLike, *, draft_vocab: int | Sequence[int] | None = None,
               verify: bool = False) -> "CacheReader":
    """Open the cache directory ``path`` for reading.

    Args:
        draft_vocab: ``None``: the draft vocabulary stored in the manifest. ``hidden`` caches only:
            an int N picks the N most frequent supervised target tokens (``token_counts``), or a
            sequence gives the target ids explicitly. ``probs``/``topk`` caches accept only their
            stored vocabulary.
        verify: check each shard's sha256 when it is first opened (reads the whole file once).
    """
    return CacheReader(path, draft_vocab=draft_vocab, verify=verify)


class CacheReader:
    """Random access to the committed samples of a cache; see the module docstring for ``reader[i]``."""

    def __init__(self, path: str | os.PathLike, *, draft_vocab: int | Sequence[int] | None = None,
                 verify: bool = False):
        self.path = Path(path)
        self._meta = Manifest(read_manifest(self.path))
        self.verify = verify
        self.encoding = self._meta.encoding
        self.kind = self._meta.kind
        self.dtype = read_dtype(self._meta.dtype)  # of the aux_hidden_states a batch hands out
        self._quantized = quantized_tensors(self._meta.data)  # stored fp8 + per-row scale
        self._shards = [dict(e) for e in committed_shards(self._meta.data)]
        # reader index of each shard's first sample: planned ids minus the non-finite samples dropped before it
        self._first = [sum(e["num_samples"] for e in self._shards[:k]) for k in range(len(self._shards))]
        self._len = sum(e["num_samples"] for e in self._shards)
        self.draft_vocab = self._select_vocab(draft_vocab)
        self._open: OrderedDict[int, tuple[ShardFile, list[int], list[int]]] = OrderedDict()
        self._offsets: dict[int, tuple[list[int], list[int]]] = {}  # shard -> (sample, supervised) offsets
        self._verified: set[int] = set()
        self._lm_head: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # device -> W[selected], b[selected]
        self._lengths: torch.Tensor | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest JSON (read-only)."""
        return self._meta.data

    @property
    def selected_token_ids(self) -> torch.Tensor:
        """``[Vd]`` int64 target ids of the draft vocabulary this reader produces targets for."""
        return self.draft_vocab.selected_token_ids

    @property
    def aux_dim(self) -> int:
        """``F = len(layer_ids) * hidden_size``."""
        return self._meta.aux_dim

    @property
    def num_tokens(self) -> int:
        """Real tokens over the committed samples."""
        return sum(e["num_tokens"] for e in self._shards)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the committed shard files (headers included): what one pass over every sample reads."""
        return sum(e["bytes"] for e in self._shards)

    @property
    def complete(self) -> bool:
        return bool(self._meta.data["complete"])

    def __len__(self) -> int:
        """Committed samples (the contiguous prefix of committed shards)."""
        return self._len

    def sample_lengths(self) -> torch.Tensor:
        """``[len(self)]`` int64 token count S_i of every committed sample (read from the shards'
        offsets the first time, a few bytes per shard)."""
        if self._lengths is None:
            parts = []
            for k in range(len(self._shards)):
                offsets = torch.tensor(self._shard(k)[1], dtype=torch.int64)
                parts.append(offsets[1:] - offsets[:-1])
            self._lengths = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._lengths

    def shard_ranges(self) -> list[tuple[int, int]]:
        """``[(first, end)]`` reader indices of every committed shard's samples, in order (equal to
        the planned ``first_sample`` ranges unless the precompute dropped non-finite samples)."""
        return [(first, first + e["num_samples"]) for first, e in zip(self._first, self._shards)]

    def target_embeddings(self) -> torch.Tensor:
        """``[V, H]`` the target's input embeddings (``target_embeddings.safetensors``)."""
        return self._side_file("target_embeddings").read("weight")

    def target_lm_head(self) -> torch.Tensor | None:
        """``[V, H]`` the target's output projection, stored by ``hidden`` and ``dflash`` caches (else None)."""
        if "lm_head" not in self.manifest.get("files", {}):
            return None
        return self._side_file("lm_head").read("weight")

    # ------------------------------------------------------------------ samples
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.kind == "dflash":
            row = expand_dflash_raw(collate_raw([self.get_raw(index)]))
            return {name: value[0] for name, value in row.items() if name != "seq_lens"}
        return self.rebuild_targets(self.get_raw(index))

    def get_raw(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` as stored, UNSHIFTED: ``input_ids [S] int32``, ``loss_mask [S] uint8``,
        ``aux_hidden_states [S, F]``, ``target_argmax [M] int32`` and the encoding's ``[M, ...]``
        rows (``target_probs`` | ``topk_probs``, ``topk_ids`` | ``final_hidden``)."""
        index = self._check_index(index)
        k = bisect.bisect_right(self._first, index) - 1
        shard, offsets, supervised = self._shard(k)
        j = index - self._first[k]
        t0, t1, r0, r1 = offsets[j], offsets[j + 1], supervised[j], supervised[j + 1]
        raw = {
            "input_ids": shard.read("input_ids", t0, t1),  # [S] int32
            "loss_mask": shard.read("loss_mask", t0, t1),  # [S] uint8
            "aux_hidden_states": shard.read("aux_hidden_states", t0, t1),  # [S, F]
            "target_argmax": shard.read("target_argmax", r0, r1),  # [M] int32
        }
        for name in encoding_tensors(self.encoding):
            raw[name] = shard.read(name, r0, r1)  # [M, Vd | k | H]
        # fp8: the per-row scales, dequantized where the rows are used
        if "aux_hidden_states" in self._quantized:
            raw[scale_name("aux_hidden_states")] = shard.read(scale_name("aux_hidden_states"), t0, t1)  # [S, L]
        if "final_hidden" in raw and "final_hidden" in self._quantized:
            raw[scale_name("final_hidden")] = shard.read(scale_name("final_hidden"), r0, r1)  # [M, 1]
        if int(raw["loss_mask"].sum()) != r1 - r0:
            raise CacheCorruptError(f"{shard.name}: sample {index} has {int(raw['loss_mask'].sum())} supervised "
                                    f"positions but {r1 - r0} stored target rows; the shard is damaged")
        if r1 > r0 and int(raw["target_argmax"].max()) >= self._meta.vocab_size:
            raise CacheCorruptError(f"{shard.name}: sample {index} has target_argmax >= vocab_size "
                                    f"{self._meta.vocab_size}; the shard is damaged")
        return raw

    def rebuild_targets(self, raw: dict[str, torch.Tensor], device: torch.device | str | None = None
                        ) -> dict[str, torch.Tensor]:
        """Turn ``get_raw`` output into the training sample (shifted, see the module docstring) on
        ``device`` (default: where ``raw`` is). For ``hidden`` caches this runs the lm_head matmul.

        A batch of one through ``expand_batch``: the shift, the scatter and the logits rebuild
        have one implementation."""
        batch = self.expand_batch(collate_raw([raw]), device)
        return {name: batch[name][0] for name in _SAMPLE_FIELDS}

    def get_raw_batch(self, indices: Sequence[int], *, max_tokens: int | None = None,
                      pad_to_multiple_of: int | None = None,
                      allocate: Callable[[int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Samples ``indices`` as one raw batch: equal to ``collate_raw([get_raw(i) for i in indices],
        max_tokens=..., pad_to_multiple_of=...)`` (fields in ``batching.py``), but every stored row
        is read with ``os.preadv`` straight into its place in ONE buffer: one copy from the page
        cache, no per-sample tensors. The batch's ranges are grouped by shard and read in file
        order, ranges less than ``MAX_READ_GAP`` apart as one request (``ShardFile.read_calls``):
        the small per-token fields of a shard lie side by side, so they cost one request, not one
        per sample and field.

        Args:
            max_tokens: ``None``: one padded row per sample; else packed next-fit rows of at most
                ``max_tokens`` tokens.
            allocate: ``allocate(nbytes)`` returns the contiguous uint8 CPU buffer to fill (at least
                ``nbytes``); the batch's fields are views into it. Default: a new tensor. A loader
                passes a function that hands out a reused (or pinned) buffer.
        """
        one = None if allocate is None else (lambda _b, nbytes: allocate(nbytes))
        return self.get_raw_batches([indices], max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of,
                                    allocate=one)[0]

    def raw_batch_nbytes(self, indices: Sequence[int]) -> int:
        """Bytes of the buffer ``get_raw_batch(indices)`` fills (the stored rows, field-aligned)."""
        return self._plan_raw_batch(indices, None, None)[3]

    def get_raw_batches(self, batches: Sequence[Sequence[int]], *, max_tokens: int | None = None,
                        pad_to_multiple_of: int | None = None,
                        allocate: Callable[[int, int], torch.Tensor] | None = None,
                        executor: Executor | None = None) -> list[dict[str, torch.Tensor]]:
        """``[get_raw_batch(b) for b in batches]`` read in ONE pass per shard: the ranges of all the
        batches are sorted by file offset and near ones merged (``ShardFile.read_calls``), so the
        samples of several batches that lie side by side in a shard are read as one sequential
        stream however the batches order them (a cold disk reads a file in order about twice as
        fast as the same ranges in random order). ``allocate(b, nbytes)`` gives batch ``b``'s buffer.
        With an ``executor`` (a thread pool) the merged ranges, in file order, are submitted to it all
        at once, so as many are in flight as it has threads (each range read front to back by one):
        a disk (NVMe, a virtual or a network one) serves ranges that are not contiguous several
        times faster at a queue depth of 8 than one by one."""
        planned = [self._plan_raw_batch(indices, max_tokens, pad_to_multiple_of) for indices in batches]
        by_shard: dict[int, list[tuple[str, int, int, torch.Tensor]]] = {}  # shard -> its read requests
        raws = []
        names = self._stored_names()
        for b, (places, lengths, counts, total, specs, layout) in enumerate(planned):
            buffer = allocate(b, total) if allocate is not None else torch.empty(total, dtype=torch.uint8)
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < total or buffer.device.type != "cpu":
                raise ValueError(f"allocate({total}) must return a 1-D uint8 CPU tensor of at least {total} bytes; "
                                 f"got {buffer.dtype} {tuple(buffer.shape)} on {buffer.device}")
            raw = {name: buffer[at:at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                   for name, dtype, shape, at in specs}
            token_at = row_at = 0
            for (k, j), length, count in zip(places, lengths, counts):
                offsets, supervised = self._shard_offsets(k)
                t0, r0 = offsets[j], supervised[j]
                requests = by_shard.setdefault(k, [])
                for name in names:
                    if name in _TOKEN_FIELDS:
                        requests.append((name, t0, t0 + length, raw[name][token_at:token_at + length]))
                    else:
                        requests.append((name, r0, r0 + count, raw[name][row_at:row_at + count]))
                token_at += length
                row_at += count
            raws.append(raw)
        shards = sorted(by_shard)
        for first in range(0, len(shards), MAX_OPEN_SHARDS):  # at most that many open, so none is closed
            group = shards[first:first + MAX_OPEN_SHARDS]     # while its reads are in flight (LRU)
            calls = [call for k in group for call in self._shard(k)[0].read_calls(by_shard[k])]
            if executor is None:
                for call in calls:
                    call()
            else:
                for future in [executor.submit(call) for call in calls]:
                    future.result()
        for raw, (places, _, _, _, _, layout) in zip(raws, planned):
            self._check_raw_batch(raw, layout, places)
            raw.update(layout)
            raw["sample_ids"] = torch.tensor([self._first[k] + j for k, j in places], dtype=torch.int64)  # [n]
        return raws

    def _plan_raw_batch(self, indices: Sequence[int], max_tokens: int | None, pad_to_multiple_of: int | None):
        """``(places, lengths, counts, buffer bytes, field specs, layout)`` of one raw batch."""
        places = []  # (shard k, sample j inside it)
        lengths, counts = [], []
        for index in indices:
            index = self._check_index(int(index))
            k = bisect.bisect_right(self._first, index) - 1
            j = index - self._first[k]
            offsets, supervised = self._shard_offsets(k)
            places.append((k, j))
            lengths.append(offsets[j + 1] - offsets[j])
            counts.append(supervised[j + 1] - supervised[j])
            if max_tokens is not None and lengths[-1] > max_tokens:
                raise ValueError(f"sample {index} has {lengths[-1]} tokens, more than max_tokens {max_tokens}; raise "
                                 "the token budget to at least the cache's seq_length")
        layout = raw_batch_layout(lengths, counts, max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of)
        specs, total = [], 0  # (name, dtype, shape, byte offset in the buffer)
        header = self._shard(places[0][0])[0].tensors
        for name in self._stored_names():
            dtype, shape, _ = header[name]
            rows = sum(lengths) if name in _TOKEN_FIELDS else sum(counts)
            specs.append((name, dtype, (rows, *shape[1:]), total))
            total += -(-rows * math.prod(shape[1:]) * dtype.itemsize // _ALIGN) * _ALIGN
        return places, lengths, counts, total, specs, layout

    def check_finite(self, raw: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Raise ``CacheCorruptError`` naming the shard and sample when ``batch`` (``expand_batch`` /
        ``expand_dflash_raw`` of ``raw``, on any device) holds NaN or Inf in its float tensors: a
        draft must never train on them. One fused check on the device (one host sync per batch);
        only a failing batch is searched sample by sample, on the host, in ``raw``."""
        floats = [t for t in batch.values() if t.is_floating_point()]
        if not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
            return
        offsets, rows = raw["sample_offsets"].tolist(), raw["supervised_offsets"].tolist()
        ids = raw.get("sample_ids")
        for j in range(len(offsets) - 1):
            parts = {name: raw[name][offsets[j]:offsets[j + 1]] for name in ("aux_hidden_states",
                                                                              "aux_hidden_states_scale") if name in raw}
            parts.update({name: raw[name][rows[j]:rows[j + 1]] for name in ("target_probs", "topk_probs",
                                                                            "final_hidden", "final_hidden_scale")
                          if name in raw})
            bad = [name for name, t in parts.items() if not bool(torch.isfinite(t.float()).all())]
            if bad:
                where = f"{self.shard_of(int(ids[j]))}: sample {int(ids[j])}" if ids is not None else f"batch sample {j}"
                raise CacheCorruptError(f"{where} holds NaN or Inf in {', '.join(bad)}; refusing to train on it. "
                                        f"Run `draftcache verify {self.path}`; precompute the cache again (the "
                                        "precompute leaves such samples out).")
        raise CacheCorruptError(f"a batch read from {self.path} holds NaN or Inf after expansion (the stored rows are "
                                "finite: the lm_head side file or the expansion overflowed); run `draftcache verify`")

    def expand_batch(self, raw: dict[str, torch.Tensor], device: torch.device | str | None = None
                     ) -> dict[str, torch.Tensor]:
        """Turn a raw batch (``get_raw_batch`` / ``collate_raw``) into the training batch on ``device``
        (default: where ``raw`` is): exactly ``collate_padded`` (or ``pack_samples`` for a packed
        raw batch) of the samples' ``reader[i]``, new tensors that never alias ``raw``.

        One vectorised pass with no host synchronisation beyond reading the small layout tensors
        (keep those on the host: pass the raw batch as the loader yields it). Slot ``t`` of a
        sample receives position ``t+1``'s target; a supervised position 0 has no slot and its row
        is written to a scratch row past the end (one per sample, so every index is unique).
        """
        if self.kind == "dflash":
            raise ValueError("expand_batch builds shifted EAGLE-3 batches; this is a dflash cache: use "
                             "expand_dflash_raw(raw, device)")
        device = torch.device(device) if device is not None else raw["input_ids"].device
        num_rows, width = (int(v) for v in raw["batch_shape"].tolist())
        packed = bool(raw["packed"])
        offsets = raw["sample_offsets"].cpu()  # [n+1]
        lengths = offsets[1:] - offsets[:-1]  # [n]
        num_samples, slots = lengths.numel(), num_rows * width
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        ids, mask, argmax = to(raw["input_ids"]), to(raw["loss_mask"]), to(raw["target_argmax"]).long()
        tokens, rows = ids.numel(), argmax.numel()

        # token g of sample s at local position p lands in flat slot dest[g] = row*T + start + p
        sample_of = torch.repeat_interleave(torch.arange(num_samples, device=device), to(lengths),
                                            output_size=tokens)  # [N]
        local = torch.arange(tokens, device=device) - to(offsets[:-1])[sample_of]  # [N] p
        length_of = to(lengths)[sample_of]  # [N] S of each token's sample
        dest = (to(raw["sample_rows"] * width + raw["sample_starts"]))[sample_of] + local  # [N]
        is_last = local == length_of - 1  # [N] slot S-1 gets the zero fill of the shift

        def shifted(values: torch.Tensor) -> torch.Tensor:  # [N] -> [B*T] int64, slot t = value at t+1
            following = torch.cat([values[1:].long(), values.new_zeros(1, dtype=torch.int64)])
            return torch.zeros(slots, dtype=torch.int64, device=device).index_copy_(
                0, dest, following.masked_fill(is_last, 0))

        out = {
            "input_ids": shifted(ids).view(num_rows, width),
            "attention_mask": torch.zeros(slots, dtype=torch.int64, device=device).index_fill_(0, dest, 1)
            .view(num_rows, width),
            "loss_mask": shifted(mask).view(num_rows, width),
        }
        aux = stored_rows_on(raw, "aux_hidden_states", device)  # [N, F]; fp8 dequantized here, after the copy
        out["aux_hidden_states"] = torch.zeros(slots, aux.shape[1], dtype=aux.dtype, device=device).index_copy_(
            0, dest, aux).view(num_rows, width, aux.shape[1])

        # supervised row r is the r-th token with loss_mask 1; its target goes to slot dest - 1
        row_token = torch.searchsorted(torch.cumsum(mask, 0, dtype=torch.int64),
                                       torch.arange(1, rows + 1, device=device))  # [M] token index g
        row_slot = torch.where(local[row_token] > 0, dest[row_token] - 1,
                               slots + sample_of[row_token])  # [M] position 0 -> its sample's scratch row
        vd = self.draft_vocab.size
        t2d = self.draft_vocab.t2d.to(device)
        target_probs = torch.zeros(slots + num_samples, vd, dtype=torch.float32, device=device)  # [B*T+n, Vd]
        position_mask = torch.zeros(slots + num_samples, dtype=torch.bool, device=device)  # [B*T+n]
        if self.encoding == "hidden":
            logits = self.logits_from_final_hidden(stored_rows_on(raw, "final_hidden", device, torch.float32))
            probs, row_mask = compute_target_distribution(
                logits, torch.ones_like(argmax), self.selected_token_ids, t2d, target_argmax=argmax)
            target_probs.index_copy_(0, row_slot, probs)
            position_mask.index_copy_(0, row_slot, row_mask[:, 0])
        else:
            position_mask.index_copy_(0, row_slot, t2d[argmax])
            if self.encoding == "topk":
                ids_k = to(raw["topk_ids"]).long()  # [M, k]
                vals = to(raw["topk_probs"]).float()  # [M, k]
                target_probs.view(-1).scatter_(0, (row_slot.unsqueeze(1) * vd + ids_k).view(-1), vals.view(-1))
            else:
                target_probs.index_copy_(0, row_slot, to(raw["target_probs"]).float())
        out["target_probs"] = target_probs[:slots].view(num_rows, width, vd)
        out["position_mask"] = position_mask[:slots].view(num_rows, width, 1)
        if packed:
            out["seq_lens"] = _packed_seq_lens(raw["sample_rows"].cpu(), lengths, num_rows, width).to(device)
            out["position_ids"] = torch.zeros(slots, dtype=torch.int64, device=device).index_copy_(
                0, dest, local).view(num_rows, width)
            out["doc_remaining"] = torch.zeros(slots, dtype=torch.int64, device=device).index_copy_(
                0, dest, length_of - 1 - local).view(num_rows, width)
        return out

    # ------------------------------------------------------------------ internals
    def _stored_names(self) -> tuple[str, ...]:
        """The tensors a raw batch reads, in buffer order (token rows, then supervised rows)."""
        names = ("input_ids", "loss_mask", "aux_hidden_states", "target_argmax", *encoding_tensors(self.encoding))
        names = (*names, *(scale_name(n) for n in self._quantized if n in names))
        return names

    def shard_of(self, index: int) -> str:
        """The file holding reader sample ``index`` (for messages)."""
        return self._shards[bisect.bisect_right(self._first, self._check_index(index)) - 1]["file"]

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} is out of range: the cache has {self._len} committed samples")
        return index

    def _check_raw_batch(self, raw: dict[str, torch.Tensor], layout: dict[str, torch.Tensor],
                         places: list[tuple[int, int]]) -> None:
        """The per-sample checks of ``get_raw``, vectorised over a batch (``places[j]`` = (shard, index
        inside it) of the batch's sample j)."""
        def where(j: int) -> str:
            k, local = places[j]
            return f"{self._shards[k]['file']}: sample {self._first[k] + local}"

        prefix = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(raw["loss_mask"], 0, dtype=torch.int64)])
        tokens = layout["sample_offsets"]
        found = prefix[tokens[1:]] - prefix[tokens[:-1]]  # [n] supervised positions per sample
        stored = layout["supervised_offsets"][1:] - layout["supervised_offsets"][:-1]  # [n] stored rows
        bad = torch.nonzero(found != stored).flatten().tolist()
        if bad:
            j = bad[0]
            raise CacheCorruptError(f"{where(j)} has {int(found[j])} supervised positions but {int(stored[j])} stored "
                                    "target rows; the shard is damaged")
        argmax = raw["target_argmax"]
        if argmax.numel() and int(argmax.max()) >= self._meta.vocab_size:
            row = int(torch.nonzero(argmax >= self._meta.vocab_size)[0, 0])
            j = int(torch.searchsorted(layout["supervised_offsets"], row, right=True)) - 1
            raise CacheCorruptError(f"{where(j)} has target_argmax >= vocab_size {self._meta.vocab_size}; the shard "
                                    "is damaged")

    def _shard_offsets(self, k: int) -> tuple[list[int], list[int]]:
        """Sample and supervised offsets of shard ``k``, kept after its file is closed by the LRU."""
        if k not in self._offsets:
            self._shard(k)
        return self._offsets[k]

    def _select_vocab(self, draft_vocab: int | Sequence[int] | None) -> DraftVocab:
        vocab_size = self._meta.vocab_size
        stored = self._meta.selected_token_ids
        if draft_vocab is None:
            return DraftVocab.from_selected(stored, vocab_size)
        if isinstance(draft_vocab, bool) or not isinstance(draft_vocab, (int, Sequence, torch.Tensor)):
            raise TypeError(f"draft_vocab must be None, an int size or a sequence of target ids; got {draft_vocab!r}")
        if self.encoding != "hidden":
            requested = len(stored) if isinstance(draft_vocab, int) else None
            same = (draft_vocab == len(stored)) if isinstance(draft_vocab, int) else (
                sorted(int(i) for i in draft_vocab) == stored)
            if not same:
                what = f"size {draft_vocab}" if requested is not None else f"{len(draft_vocab)} explicit ids"
                raise ValueError(
                    f"this cache stores {self.encoding!r} targets over a fixed draft vocabulary of {len(stored)} tokens; "
                    f"a different draft vocabulary ({what}) cannot be read from it. Only caches precomputed with "
                    "--supervision hidden can change the draft vocabulary at read time; omit draft_vocab or "
                    "precompute a new cache")
            return DraftVocab.from_selected(stored, vocab_size)
        if isinstance(draft_vocab, int):
            counts = torch.tensor(self._meta.data["token_counts"], dtype=torch.int64)
            return select_draft_vocab(counts, draft_vocab, self._meta.data["draft_vocab"]["special_token_ids"])
        return DraftVocab.from_selected(draft_vocab, vocab_size)

    def _shard(self, k: int) -> tuple[ShardFile, list[int], list[int]]:
        """Open shard ``k`` (LRU), checking its header against the manifest entry."""
        cached = self._open.get(k)
        if cached is not None:
            self._open.move_to_end(k)
            return cached
        entry = self._shards[k]
        check_sum = self.verify and k not in self._verified
        shard = ShardFile(self.path / entry["file"], entry["bytes"], entry["sha256"] if check_sum else None)
        self._verified.add(k)
        shard.check(expected_shard_tensors(self.manifest, entry),
                    shard_metadata(entry["first_sample"], entry["num_samples"]))
        offsets = shard.read("sample_offsets").tolist()
        supervised = shard.read("supervised_offsets").tolist()
        for name, values, total in (("sample_offsets", offsets, entry["num_tokens"]),
                                    ("supervised_offsets", supervised, entry["num_supervised"])):
            if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
                shard.close()
                raise CacheCorruptError(f"{shard.name}: {name} are not a non-decreasing range from 0 to {total}; "
                                        "the shard is damaged")
        self._open[k] = (shard, offsets, supervised)
        self._offsets[k] = (offsets, supervised)
        if len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)[1][0].close()
        return self._open[k]

    def _side_file(self, name: str) -> ShardFile:
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise CacheCorruptError(f"{self.path} has no committed {name}.safetensors (the manifest's files.{name} "
                                    "is missing); the precompute did not finish, resume it")
        return ShardFile(self.path / entry["file"], entry["bytes"], entry["sha256"] if self.verify else None)

    def logits_from_final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` stored final hidden states -> ``[..., Vd]`` fp32 target logits over the draft
        vocabulary, with the cache's ``lm_head`` side file (``hidden`` caches; a dflash cache's draft
        vocabulary is the full one), on ``hidden``'s device."""
        weight, bias = self._selected_lm_head(hidden.device)  # [Vd, H] fp32, [Vd] | None
        hidden = hidden.float()
        return hidden @ weight.T if bias is None else hidden @ weight.T + bias

    def _selected_lm_head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = str(device)
        if key not in self._lm_head:
            side = self._side_file("lm_head")
            ids = self.selected_token_ids
            weight = side.read("weight").index_select(0, ids).to(device=device, dtype=torch.float32)  # [Vd, H]
            bias = side.read("bias").index_select(0, ids).to(device=device, dtype=torch.float32) \
                if "bias" in side.tensors else None  # [Vd]
            side.close()
            self._lm_head[key] = (weight, bias)
        return self._lm_head[key]

    def close(self) -> None:
        """Close the open shard files (they reopen on demand)."""
        while self._open:
            self._open.popitem()[1][0].close()

    def __getstate__(self) -> dict[str, Any]:
        # open files and device caches are per process: a DataLoader worker reopens its own
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_lm_head"] = {}
        return state

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _packed_seq_lens(sample_rows: torch.Tensor, lengths: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """``[B, max_docs]`` int64 like ``pack_samples``: each row's document lengths in order, then its
    padding tail as one segment, then zeros (rows sum to ``width``)."""
    docs: list[list[int]] = [[] for _ in range(num_rows)]
    for row, length in zip(sample_rows.tolist(), lengths.tolist()):
        docs[row].append(length)
    for row in docs:
        if sum(row) < width:
            row.append(width - sum(row))
    out = torch.zeros(num_rows, max(len(row) for row in docs), dtype=torch.int64)
    for b, row in enumerate(docs):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return out
