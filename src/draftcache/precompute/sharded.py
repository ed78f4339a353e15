"""Writing a cache as a set of shards split between ranks (the ``torchrun`` path, and resuming a
cache such a run left behind).

Who does what:

- rank 0 takes the cache lock, checks a resumed cache (the manifest's shards and those the ranks'
  commit journals recorded, each verified by size and sha256), writes the side files and the
  initial ``manifest.json``; only then do the ranks start, so a crash always leaves a cache that
  ``--resume`` recognises;
- the shards still missing are dealt out in rounds: in round ``r`` rank ``R`` computes the
  ``(r * world_size + R)``-th missing shard (shard ``k`` goes to rank ``k % world_size`` in a
  fresh run), writes it atomically and appends its entry to ``rank-R.commits.jsonl`` (fsynced);
- after each round the ranks exchange their outcomes (``gather_step``): a failure anywhere stops
  every rank with ``rank R failed: ...``, and rank 0 records the round's entries in the manifest;
- at the end rank 0 marks the manifest complete and removes the journals.

Shard ``k`` holds global samples ``[k * shard_size, ...)`` whoever computes it, and the final
manifest lists the shards in index order with the same totals, so the cache is the same as a
one-process run's (byte for byte on the CPU in fp32).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from draftcache.cache_format import MANIFEST_FILE, CacheLock, validate_manifest
from draftcache.cache_format.checksum import atomic_write_json, fsync_dir
from draftcache.cache_format.manifest import Manifest, shard_stats
from draftcache.cache_format.resume import journal_files, read_journals
from draftcache.cache_format.writer import append_commit, write_shard_file, write_side_file
from draftcache.data import ConversationSet, TokenizedSample
from draftcache.precompute.distributed import DistContext, gather_step
from draftcache.precompute.pipeline import (
    PrecomputeSummary,
    _check_contents,
    _forward_shard,
    _pad_id,
    _prepare_resume,
    _Progress,
    _write_side_files,
)
from draftcache.precompute.planning import ShardPlan, plan_shards
from draftcache.precompute.records import SupervisionSpec
from draftcache.target import HFEagle3TargetModel

__all__ = ["write_cache_sharded", "assign_shards"]


def assign_shards(plans: Sequence[ShardPlan], rank: int, world_size: int) -> list[ShardPlan | None]:
    """Rank ``rank``'s shard in each round: the ``(round * world_size + rank)``-th of ``plans`` (the
    shards still to compute, in index order), None in a last round with fewer shards than ranks.
    Over all ranks this covers ``plans`` exactly once."""
    rounds = -(-len(plans) // world_size)
    return [plans[i] if (i := r * world_size + rank) < len(plans) else None for r in range(rounds)]


class _ByteCount:
    """Bytes written by this rank (what ``_forward_shard``'s progress bar shows)."""

    def __init__(self) -> None:
        self.bytes_written = 0

    def count(self, n: int) -> None:
        self.bytes_written += n


class _ManifestOwner:
    """Rank 0's hold on ``manifest.json``: side files, committed shard entries, completion."""

    def __init__(self, out: Path, manifest: dict, counter: _ByteCount):
        self.out = out
        self.manifest = manifest
        self.counter = counter

    def write(self) -> None:
        validate_manifest(self.manifest)
        atomic_write_json(self.out / MANIFEST_FILE, self.manifest)

    def write_side_file(self, name: str, tensors) -> None:  # the CacheWriter method _write_side_files calls
        entry = write_side_file(self.out, Manifest(self.manifest), name, tensors, on_bytes=self.counter.count)
        self.manifest["files"][name] = entry
        self.write()

    def commit(self, entries: list[dict]) -> None:
        if not entries:
            return
        shards = {e["index"]: e for e in self.manifest["shards"]}
        shards.update({e["index"]: e for e in entries})
        self.manifest["shards"] = [shards[k] for k in sorted(shards)]
        self._restat()
        self.write()

    def finish(self) -> None:
        missing = self.manifest["num_shards"] - len(self.manifest["shards"])
        if missing:
            raise RuntimeError(f"{missing} shard(s) of {self.manifest['num_shards']} were not committed; rerun with "
                               "--resume to compute them")
        self._restat()
        self.manifest["complete"] = True
        self.write()
        drop_journals(self.out)

    def _restat(self) -> None:
        self.manifest["stats"] = shard_stats(self.manifest["shards"])


def drop_journals(out: Path) -> None:
    """Remove the commit journals once ``manifest.json`` records everything they hold."""
    paths = journal_files(out)
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_dir(out)


def write_cache_sharded(cfg, ctx: DistContext, out: Path, manifest: dict, spec: SupervisionSpec,
                        target: HFEagle3TargetModel, tokenizer, samples: Sequence[TokenizedSample],
                        conversations: ConversationSet, t0: float, log: Callable[[str], None],
                        probe=None) -> PrecomputeSummary:
    """Write (or complete) the cache at ``out`` with this rank's share of the shards; every rank of
    ``ctx`` calls it with the same arguments (see the module docstring)."""
    counter = _ByteCount()
    owner = _ManifestOwner(out, manifest, counter) if ctx.is_main else None
    lock = CacheLock(out) if ctx.is_main else None
    created = ctx.is_main and not out.exists()
    try:
        def prepare() -> list[int]:
            lock.acquire()
            _check_contents(out, cfg.resume)  # again, now that no other writer can change it
            if (out / MANIFEST_FILE).exists():
                owner.manifest = _prepare_resume(out, owner.manifest, log, journal_entries=read_journals(out))
            owner.write()  # the journals' entries are now in the manifest
            drop_journals(out)
            _write_side_files(owner, owner.manifest, target, spec)
            return [e["index"] for e in owner.manifest["shards"]]

        committed = set(gather_step(ctx, "preparing the cache directory", prepare if ctx.is_main else list)[0])
        todo = [p for p in plan_shards(len(samples), cfg.shard_size) if p.index not in committed]
        meta = Manifest(manifest)
        device = target.model.get_input_embeddings().weight.device
        pad_id = _pad_id(tokenizer)
        # samples already committed (not necessarily a prefix: a crashed distributed run leaves gaps)
        done = sum(p.num_samples for p in plan_shards(len(samples), cfg.shard_size) if p.index in committed)
        progress = _Progress(len(samples), done, cfg.progress and ctx.is_main)
        try:
            for round_plan in assign_shards(todo, ctx.rank, ctx.world_size):
                def work(plan: ShardPlan | None = round_plan) -> dict | None:
                    if plan is None:
                        return None
                    records = _forward_shard(plan, samples, target, spec, pad_id, device, cfg.batch_size,
                                             progress, counter, probe=probe)
                    entry = write_shard_file(out, meta, plan.index, records, on_bytes=counter.count, check=True)
                    append_commit(out, ctx.rank, entry)
                    return entry.to_dict()

                what = f"computing shard {round_plan.index}" if round_plan is not None else "waiting for the others"
                entries = [e for e in gather_step(ctx, what, work) if e is not None]
                if owner is not None:
                    owner.commit(entries)
                    mine = round_plan.index if round_plan is not None else None
                    progress.bar.update(sum(e["num_samples"] for e in entries if e["index"] != mine))
        finally:
            progress.close()
        per_rank = gather_step(ctx, "finishing", lambda: (progress.tokens, progress.slots, counter.bytes_written))

        def finish() -> dict:
            if owner is not None:
                owner.finish()
                return owner.manifest
            return {}

        final = gather_step(ctx, "committing the manifest", finish)[0]
    finally:
        if lock is not None:
            lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # this run created the directory and wrote nothing into it

    tokens, slots, written = (sum(v[i] for v in per_rank) for i in range(3))
    return PrecomputeSummary.from_manifest(
        final, output_dir=out, encoding=spec.encoding, dtype=cfg.dtype, draft_vocab_size=spec.vocab.size,
        computed_samples=len(samples) - done, computed_tokens=tokens, slots=slots, resumed_from_sample=done,
        bytes_written=written, wall_seconds=time.perf_counter() - t0, skipped=conversations.skipped.as_dict(),
    )
