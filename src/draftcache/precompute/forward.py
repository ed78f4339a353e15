"""Run one shard's samples through the frozen target, batch by batch, and hand each sample's host
records on as soon as they are safe to read.

Host memory is two batches of records at most: the one whose device-to-host copy overlaps the
next forward, and the one being written. On CUDA the forward runs under ``torch.cuda.device``
of the target's input device and the copy-done event is recorded on THAT device's current
stream (recording on the process's current device, cuda:0, would let a ``--device cuda:1``
batch reach the writer before its non-blocking copy ends).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from draftcache.data import TokenizedSample, sample_lengths
from draftcache.precompute.planning import ShardPlan, length_bucketed_batches
from draftcache.precompute.records import SupervisionSpec, batch_to_records
from draftcache.targets import HFEagle3TargetModel, TargetForward

__all__ = ["Probe", "Progress", "pad_batch", "pad_id_of", "input_device", "shard_records"]


@dataclass
class Probe:
    """A forward already run (the one that decided the encoding): ``indices`` are global sample
    indices; the shard holding exactly this batch reuses ``out`` instead of computing it twice.
    ``take`` hands ``out`` over and forgets it, so whoever still holds the probe holds no tensors
    (its logits are ``[B, T, V]``: 2 GB at batch 4 x 2048 tokens x 128k vocabulary in bf16)."""

    indices: list[int]
    out: TargetForward | None

    def take(self) -> TargetForward | None:
        out, self.out = self.out, None
        return out


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def input_device(target: HFEagle3TargetModel) -> torch.device:
    """Where the target's inputs go: its input embedding's device (the first device of a split model)."""
    return target.model.get_input_embeddings().weight.device


def pad_batch(samples: Sequence[TokenizedSample], indices: Sequence[int], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]`` on ``device`` and the real lengths."""
    rows = [samples[i] for i in indices]  # once each: a TokenStore reads them from disk
    lengths = [len(s.input_ids) for s in rows]
    ids = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)  # [B, T]
    lm = torch.zeros_like(ids)                                                 # [B, T]; padding 0
    am = torch.zeros_like(ids)                                                 # [B, T]
    for row, sample in enumerate(rows):
        n = lengths[row]
        ids[row, :n] = sample.input_ids
        lm[row, :n] = sample.loss_mask
        am[row, :n] = 1
    return ids.to(device), am.to(device), lm.to(device), lengths


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def shard_records(plan: ShardPlan, samples: Sequence[TokenizedSample], target: HFEagle3TargetModel,
                  spec: SupervisionSpec, *, pad_id: int, batch_size: int, progress: "Progress",
                  probe: Probe | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(local index in the shard, host record)`` for every sample of ``plan``, in
    length-bucketed batch order; a record is yielded only once its copy to the host is done."""
    device = input_device(target)
    shard_samples = samples[plan.first_sample : plan.stop]
    lengths = [n for n, _ in sample_lengths(shard_samples)]
    pending = None  # (event, indices, records) of the previous batch, whose copy may be in flight
    with _device_context(device):
        for indices in length_bucketed_batches(lengths, batch_size):
            ids, am, lm, lens = pad_batch(shard_samples, indices, pad_id, device)
            out = None
            if probe is not None and probe.out is not None and [plan.first_sample + i for i in indices] == probe.indices:
                out = probe.take()  # the encoding probe already ran exactly this batch
            if out is None:
                out = target.forward_capture(ids, am, capture_final_hidden=spec.encoding == "hidden")
            batch = batch_to_records(logits=out.logits, aux_hidden_states=out.aux_hidden_states,
                                     final_hidden=out.final_hidden, input_ids=ids, loss_mask=lm, lengths=lens,
                                     spec=spec)
            copies_on = out.logits.device  # batch_to_records queues its device-to-host copies there
            del out
            event = None
            if copies_on.type == "cuda":
                # Wait for this batch's copies only after the next forward has been queued, so the
                # copies overlap it. Recorded on the stream the copies were queued on (that of
                # the logits' device), not on the process's current device.
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(copies_on))
            if pending is not None:
                yield from _ready(pending)
            pending = (event, indices, batch)
            progress.forwarded(len(indices), sum(lens), ids.numel())
        if pending is not None:
            yield from _ready(pending)


def _ready(pending) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    event, indices, batch = pending
    if event is not None:
        event.synchronize()
    yield from zip(indices, batch)


class Progress:
    """The tqdm bar (samples, tokens/s, MB written as they are written) and this run's token and slot counts."""

    def __init__(self, total: int, initial: int, enabled: bool, bytes_written: Callable[[], int] = lambda: 0):
        self.bar = tqdm(total=total, initial=initial, unit="sample", desc="precompute", disable=not enabled)
        self.t0 = time.perf_counter()
        self.tokens = 0  # real tokens forwarded by this run
        self.slots = 0   # token slots forwarded, padding included
        self._bytes_written = bytes_written

    def forwarded(self, samples: int, tokens: int, slots: int) -> None:
        self.tokens += tokens
        self.slots += slots
        self.refresh()
        self.bar.update(samples)

    def refresh(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", written=f"{self._bytes_written() / 1e6:.1f}MB", refresh=False)

    def close(self) -> None:
        self.bar.close()
