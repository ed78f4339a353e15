"""Reader: samples/s and GB/s from cache to training batches, divided by a raw sequential read of
the same shard files in the same run. Goal: the loader >= 1.0 with a cold page cache (``--cold``),
for every encoding, in bf16 and fp8.

Throughput counts the STORED bytes of the samples delivered into training batches (input ids,
loss mask, aux hidden states, target argmax and the encoding's rows; the trainer consumes the
stored representation and expands the dense ``[B, T, Vd]`` targets on its device). The raw read
(the ratio's denominator) reads every shard file whole, in order, into one reused shard-sized
buffer (64 MiB ``preadv`` calls): the bytes land in memory a consumer could use, with no parsing.
The ratio against an 8 MiB-chunk read into one cache-resident buffer (``dd bs=8M``) is printed
too. Each path's timed pass directly follows both raw reads, and each ratio is the median of
those pairs over ``--repeats`` (page-cache speed drifts on a shared machine). Everything is measured warm (files in the page cache; each path has an
untimed pass first) unless ``--cold`` evicts the shard files from the page cache before every
timed pass (``posix_fadvise(POSIX_FADV_DONTNEED)`` after an fsync: no root needed; the share of
pages still resident after an eviction is printed).

Paths measured, on the training plan the trainer makes (``plan_epoch``: shuffled samples, packed
``--batch-tokens`` rows, or ``--batch-size`` padded batches):

* ``loader``: ``CacheBatchLoader`` raw batches (windows of ``--window-mb`` read in one sorted
  pass per shard, reused buffers), the fast path; its second epoch is timed (untimed passes over
  both epochs of both plans first grow its buffers and open its readers, as every epoch after the
  first would; one loader reads both plans, so their buffers are the same). Measured side by side on
  both training plans: ``global plan`` (every sample shuffled at once: ``draftcache train
  --shuffle global``) and ``window plan`` (blocks of consecutive samples of about one window's
  stored bytes shuffled, then the samples inside each block: ``window_tokens``, the trainers'
  default for a cache); each gets its ratio against the same raw read. The other paths read the
  global plan. Per plan, ``runs_per_window`` counts the stretches of consecutive samples a window
  reads (each a seek; a shard boundary splits a stretch but is not counted), ``MB_per_run`` their
  mean stored size: the disk-independent side of the comparison.
* ``loader + expand_batch on cpu``: the same plus ``reader.expand_batch`` to the dense batch on
  the CPU (on a GPU trainer this expansion runs on the device); timed on the first
  ``--dense-batches`` batches and scaled to the epoch.
* ``DataLoader workers, get_raw_batch``: map-style dataset of raw batches in worker processes
  (fresh buffers, shared-memory transport).
* ``get_raw + collate_raw``: per-sample reads, then concatenation.
* ``reader[i] + pack/collate (old trainer path)``: dense float32 targets per sample on the host,
  then ``pack_samples`` / ``collate_padded`` (what ``trainer/eagle3/sources.py`` does today); timed on
  the first ``--dense-batches`` batches, since a ``hidden`` cache runs the lm_head on the CPU here.

The caches are written with ``CacheWriter`` from random tensors of the real shapes (throughput
does not depend on values): ``--hidden-size`` 2048 (Llama-3.2-1B), aux ``3H``, each of ``--dtypes``
(bf16, and fp8: one byte a hidden value plus a float32 scale per row), chat lengths
log-normal (median 512, sigma 0.8, at most 2048 tokens), 65% supervised.

    python benchmarks/reader_throughput.py                    # ~2 min, three encodings
    python benchmarks/reader_throughput.py --cold --workers 0 --repeats 3
    python benchmarks/reader_throughput.py --cold --workers 0 --window-mb 32   # several windows at modest size
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ChatLengths, evict_files, gb, line, median, resident_fraction  # noqa: E402

from draftcache.cache_format import (  # noqa: E402
    IO_DEPTH, WINDOW_BYTES, CacheBatchLoader, CacheWriter, SampleRecord, collate_padded, collate_raw, new_manifest,
    open_cache, pack_samples, window_tokens,
)
from draftcache.trainer.batching import plan_epoch  # noqa: E402

_DATA_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", "target_argmax", "target_probs", "topk_probs",
                "topk_ids", "final_hidden", "aux_hidden_states_scale", "final_hidden_scale")


def write_cache(path: Path, *, encoding: str, num_samples: int, hidden: int, vocab: int, draft_vocab: int, topk: int,
                lengths: ChatLengths, shard_size: int, dtype: str = "bf16", seed: int = 0) -> None:
    """A cache of ``num_samples`` samples with the real tensor shapes (random values)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    drawn = lengths.draw(num_samples, rng)
    longest = max(drawn)
    aux = torch.randn(longest, 3 * hidden, generator=gen).bfloat16()  # sliced per sample: values do not matter
    rows = {"hidden": {"final_hidden": torch.randn(longest, hidden, generator=gen).bfloat16()},
            "probs": {"target_probs": torch.rand(longest, draft_vocab, generator=gen).bfloat16()},
            "topk": {"topk_probs": torch.rand(longest, topk, generator=gen).bfloat16(),
                     "topk_ids": torch.randint(0, draft_vocab, (longest, topk), generator=gen, dtype=torch.int32)}
            }[encoding]
    manifest = new_manifest(
        target={"model_id": "benchmark", "fingerprint": "0" * 64, "config_fingerprint": "0" * 64,
                "architecture": "LlamaForCausalLM", "hidden_size": hidden, "vocab_size": vocab, "num_layers": 16,
                "torch_dtype": "bfloat16"},
        tokenizer={"name_or_path": "benchmark", "fingerprint": "0" * 64, "chat_template_fingerprint": "0" * 64},
        layer_ids=[1, 7, 12], seq_length=lengths.max_tokens, dtype=dtype, encoding=encoding,
        topk=topk if encoding == "topk" else None, selected_token_ids=range(draft_vocab),
        token_counts=[1] * draft_vocab + [0] * (vocab - draft_vocab),
        dataset={"input_data": "synthetic", "split": None, "shuffle_seed": 42, "num_samples": None,
                 "fingerprint": "0" * 64},
        num_samples=num_samples, shard_size=shard_size)
    with CacheWriter(path, manifest) as writer:
        for i, seq in enumerate(drawn):
            mask = torch.zeros(seq, dtype=torch.uint8)
            start = max(1, round(seq * 0.35))
            mask[start:] = 1  # the last 65% supervised (assistant turns)
            m = seq - start
            writer.add(i, SampleRecord(
                input_ids=torch.randint(0, vocab, (seq,), generator=gen, dtype=torch.int32), loss_mask=mask,
                aux_hidden_states=aux[:seq], target_argmax=torch.randint(0, draft_vocab, (m,), generator=gen,
                                                                          dtype=torch.int32),
                **{name: t[:m] for name, t in rows.items()}))
        writer.write_side_file("target_embeddings", {"weight": torch.zeros(vocab, hidden, dtype=torch.bfloat16)})
        if encoding == "hidden":
            writer.write_side_file("lm_head", {"weight": torch.randn(vocab, hidden, generator=gen).bfloat16()})


class RawRead:
    """Read every shard file in order into one reused, already paged-in buffer: the whole file at
    its place in a shard-sized buffer (``chunk=None``, 64 MiB calls), or ``chunk`` bytes at a time
    into the same small buffer (``dd bs=8M``: the buffer stays in the CPU caches, so this is an
    upper bound that delivers nothing a consumer could keep)."""

    def __init__(self, files: list[Path], chunk: int | None = None):
        self.files, self.chunk = files, chunk
        size = chunk or max(f.stat().st_size for f in files)
        self.buffer = torch.from_numpy(np.zeros(size, dtype=np.uint8))  # zero-filled: no page faults when timed
        self.view = memoryview(self.buffer.numpy())

    def __call__(self) -> None:
        step = self.chunk or (64 << 20)
        for path in self.files:
            fd = os.open(path, os.O_RDONLY)
            try:
                position = 0
                while True:
                    at = 0 if self.chunk else position
                    n = os.preadv(fd, [self.view[at:at + step]], position)
                    if n <= 0:
                        break
                    position += n
            finally:
                os.close(fd)


def stored_bytes(raw: dict[str, torch.Tensor]) -> int:
    return sum(raw[name].nbytes for name in _DATA_FIELDS if name in raw)


class _RawBatches(Dataset):
    """Map-style: item b = ``get_raw_batch(plan[b])`` (each worker opens its own reader)."""

    def __init__(self, path: Path, plan, max_tokens):
        self.path, self.plan, self.max_tokens, self.reader = path, plan, max_tokens, None

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if self.reader is None:
            self.reader = open_cache(self.path)
        return self.reader.get_raw_batch(self.plan[b], max_tokens=self.max_tokens)


def contiguous_runs(samples: list[int]) -> int:
    """Runs of consecutive sample indices (= stretches of consecutive shard rows) among ``samples``."""
    ordered = sorted(samples)
    return 1 + sum(b != a + 1 for a, b in zip(ordered, ordered[1:]))


def measure_cache(path: Path, encoding: str, args) -> None:
    reader = open_cache(path)
    files = [path / e["file"] for e in reader.manifest["shards"]]
    file_bytes = sum(f.stat().st_size for f in files)
    lengths = reader.sample_lengths().tolist()
    n = len(reader)
    block_tokens = window_tokens(reader, args.window_bytes)
    plans = [plan_epoch(list(range(n)), lengths, seed=0, epoch=e, batch_tokens=args.batch_tokens,
                        batch_size=args.batch_size) for e in range(2)]
    block_plans = [plan_epoch(list(range(n)), lengths, seed=0, epoch=e, batch_tokens=args.batch_tokens,
                              batch_size=args.batch_size, shuffle_block_tokens=block_tokens) for e in range(2)]
    by_plan = {"global": plans, "window": block_plans}
    # the trainer packs each planned micro-batch into one row (pack_samples with max(budget, its total))
    max_tokens = None if args.batch_tokens is None else max(args.batch_tokens, max(lengths))
    per_sample = [stored_bytes(reader.get_raw(i)) for i in range(n)]
    epoch_bytes = [sum(per_sample[i] for batch in plan for i in batch) for plan in plans]
    print(line(f"cache {encoding}", samples=n, tokens=sum(lengths), shards=len(files), file_MB=file_bytes / 1e6,
               stored_MB=sum(per_sample) / 1e6, batches=len(plans[1]), window_MiB=args.window_bytes / 2**20,
               windows=sum(per_sample) / args.window_bytes, block_tokens=block_tokens,
               layout=f"packed {args.batch_tokens}" if max_tokens else f"padded x{args.batch_size}"))

    def timed_pass(fn) -> float:
        if args.cold:
            evict_files(files)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for kind, kind_plans in by_plan.items():
        batches = CacheBatchLoader(path, kind_plans[1], window_bytes=args.window_bytes, pin_memory=False).windows()
        windows = [[i for b in w for i in kind_plans[1][b]] for w in batches]  # the samples each window reads
        runs = sum(contiguous_runs(w) for w in windows)
        print(line(f"  {kind} plan", windows=len(windows), runs_per_window=runs / len(windows),
                   MB_per_run=sum(per_sample) / runs / 1e6))

    if args.cold:
        evict_files(files)
        print(line("  eviction check", resident_pct=100 * resident_fraction(files)))
    raw_read, raw_chunked = RawRead(files), RawRead(files, chunk=8 << 20)
    raw_read()  # warm-up (and page cache fill when warm)
    raw_chunked()
    results: dict[str, list[tuple[float, float, float]]] = {}  # name -> [(seconds, raw s, 8 MiB raw s)]

    def raw_pair() -> tuple[float, float]:
        """Both raw reads, timed right before a path's pass (page-cache speed drifts on a shared VM)."""
        return timed_pass(raw_read), timed_pass(raw_chunked)

    def record(name: str, seconds: float, raw: tuple[float, float]) -> None:
        results.setdefault(name, []).append((seconds, *raw))

    # one loader per setting reads both plans (set_plan before each pass): the same buffers, so
    # host memory is what one loader holds, not one per plan
    loaders = {(t, d): CacheBatchLoader(path, plans[0], max_tokens=max_tokens, num_threads=t, prefetch=args.prefetch,
                                        window_bytes=args.window_bytes, io_depth=d, pin_memory=False)
               for t in args.loader_threads for d in args.io_depths}
    for loader in loaders.values():
        for kind_plans in by_plan.values():  # warm-up epochs: buffers grow to both plans' batches, paged in
            for plan in kind_plans:
                loader.set_plan(plan)
                for _ in loader:
                    pass
    workers = None
    if args.workers:
        workers = DataLoader(_RawBatches(path, plans[1], max_tokens), batch_size=None, num_workers=args.workers,
                             persistent_workers=True, prefetch_factor=2)
        for _ in workers:  # warm-up epoch (worker start-up)
            pass

    for _ in range(args.repeats):
        for (threads, depth), loader in loaders.items():
            for kind, kind_plans in by_plan.items():
                loader.set_plan(kind_plans[1])
                raw_s = raw_pair()
                record(f"loader ({threads} threads, io depth {depth}, {kind} plan)",
                       timed_pass(lambda: [None for _ in loader]), raw_s)
        if workers is not None:
            raw_s = raw_pair()
            record(f"DataLoader {args.workers} workers, get_raw_batch", timed_pass(lambda: [None for _ in workers]),
                   raw_s)
        raw_s = raw_pair()
        record("get_raw + collate_raw", timed_pass(lambda: [
            collate_raw([reader.get_raw(i) for i in batch], max_tokens=max_tokens) for batch in plans[1]]), raw_s)

    # dense batches on the CPU, timed on a prefix of the plan and scaled to the epoch (a hidden cache
    # runs the lm_head matmul here): the expansion of the fast path, and the old path where
    # reader[i] materialises [S, Vd] float32 per sample
    prefix = plans[1][:args.dense_batches]
    prefix_bytes = sum(per_sample[i] for batch in prefix for i in batch)
    expand_loader = CacheBatchLoader(path, prefix, max_tokens=max_tokens, num_threads=args.loader_threads[0],
                                     prefetch=args.prefetch, window_bytes=args.window_bytes, pin_memory=False)
    for raw in expand_loader:  # warm-up
        reader.expand_batch(raw)
    raw_s = raw_pair()
    expand_s = timed_pass(lambda: [reader.expand_batch(raw) for raw in expand_loader]) * epoch_bytes[1] / prefix_bytes
    record(f"loader + expand_batch on cpu ({len(prefix)} batches)", expand_s, raw_s)

    def dense() -> None:
        for batch in prefix:
            samples = [reader[i] for i in batch]
            if max_tokens is None:
                collate_padded(samples)
            else:
                pack_samples(samples, max(args.batch_tokens, sum(s["input_ids"].numel() for s in samples)))

    dense()  # warm-up
    raw_s = raw_pair()
    dense_s = timed_pass(dense) * epoch_bytes[1] / prefix_bytes  # scaled to the whole epoch
    record(f"reader[i] + pack/collate (old path, {len(prefix)} batches)", dense_s, raw_s)

    for label, column in (("raw sequential read (whole shards)", 1), ("raw read, 8 MiB chunks (dd bs=8M)", 2)):
        rates = [file_bytes / run[column] for runs in results.values() for run in runs]
        print(line(label, GB_per_s=gb(median(rates)), min=gb(min(rates)), max=gb(max(rates)), cold=args.cold))
    for name, runs in results.items():
        ratios = [(epoch_bytes[1] / s) / (file_bytes / r) for s, r, _ in runs]
        ratios_8 = [(epoch_bytes[1] / s) / (file_bytes / r8) for s, _, r8 in runs]
        rate = median([epoch_bytes[1] / s for s, _, _ in runs])
        extra = {"goal": ">=1.0", "met": median(ratios) >= 1.0} if name.startswith("loader (") else {}
        print(line(f"  {name}", GB_per_s=gb(rate), samples_per_s=n * rate / epoch_bytes[1], ratio=median(ratios),
                   ratio_vs_8MiB=median(ratios_8), per_repeat=" ".join(f"{x:.2f}" for x in ratios), **extra))
    if workers is not None:
        del workers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encodings", default="hidden,topk,probs")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--median-tokens", type=float, default=512)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=2048, help="packed rows (the trainer's default); 0: "
                        "padded batches of --batch-size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-threads", default="1,2", help="comma-separated reader thread counts to compare")
    parser.add_argument("--prefetch", type=int, default=1, help="windows the loader reads ahead")
    parser.add_argument("--io-depths", default=f"1,{IO_DEPTH}",
                        help="comma-separated loader io_depth values to compare (read requests in flight)")
    parser.add_argument("--window-mb", type=float, default=WINDOW_BYTES / 2**20,
                        help="MiB of stored rows the loader reads in one sorted pass (its default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the comparison (0: skip)")
    parser.add_argument("--dense-batches", type=int, default=4, help="batches timed on the old dense path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true",
                        help="evict the shard files from the page cache before every timed pass (posix_fadvise)")
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma-separated storage dtypes, a cache each")
    parser.add_argument("--cache-dir", default=None, help="where to write the caches (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (expand_batch, dense path)")
    args = parser.parse_args(argv)
    args.batch_tokens = args.batch_tokens or None
    args.window_bytes = max(1, int(args.window_mb * 2**20))
    args.loader_threads = [int(t) for t in args.loader_threads.split(",")]
    args.io_depths = [int(d) for d in args.io_depths.split(",")]
    torch.set_num_threads(args.threads)
    lengths = ChatLengths(args.median_tokens, args.sigma, max_tokens=args.seq_length)
    print(f"hidden {args.hidden_size} (aux {3 * args.hidden_size}), {args.dtypes}, chats {lengths} (mean {lengths.mean():.0f}),"
          f" draft vocab {args.draft_vocab_size}, torch threads {args.threads}, "
          f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs")
    if args.cache_dir:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="draftcache-reader-", dir=args.cache_dir) as tmp:
        for encoding in args.encodings.split(","):
            for dtype in args.dtypes.split(","):
                path = Path(tmp) / f"{encoding}-{dtype}"
                start = time.perf_counter()
                write_cache(path, encoding=encoding, num_samples=args.num_samples, hidden=args.hidden_size,
                            vocab=args.vocab_size, draft_vocab=args.draft_vocab_size, topk=args.topk,
                            lengths=lengths, shard_size=args.shard_size, dtype=dtype)
                print(f"-- {encoding} {dtype}: cache written in {time.perf_counter() - start:.1f} s")
                measure_cache(path, f"{encoding} {dtype}", args)
                for f in path.iterdir():
                    f.unlink()


if __name__ == "__main__":
    main()
