"""The one cache writer of the precompute: a set of shards split between the ranks of a job
(one process is a world of one).

Who does what:

- rank 0 takes the cache lock and, on ``--resume``, checks the old manifest against this run's
  (cheap); the committed shards (the manifest's and those the commit journals recorded) are then
  verified by size and sha256 by ALL ranks, each a share, in a step whose outcome is exchanged on
  the patient (long-timeout) group, so verifying a terabyte cache is neither serial nor bounded
  by the per-shard collective timeout;
- rank 0 records what survived, writes the side files and the initial ``manifest.json``; only
  then do the ranks start, so a crash always leaves a cache that ``--resume`` recognises;
- the shards still missing are dealt out in rounds: in round ``r`` rank ``R`` computes the
  ``(r * world_size + R)``-th missing shard, streams its rows into the pre-sized shard file
  batch by batch (``ShardFileWriter``: host memory is a batch of records, not a shard), commits
  it atomically and appends its entry to ``rank-R.commits.jsonl`` (fsynced);
- after each round the ranks exchange their outcomes (``gather_step``): a failure anywhere stops
  every rank with ``rank R failed: ...``, and rank 0 records the round's entries in memory (the
  journals are the on-disk record until the end, so a commit costs the same after 30,000 shards
  as after 10: ``manifest.json`` is not rewritten per shard);
- at the end rank 0 compacts: it writes the complete manifest (every shard in index order) and
  removes the journals. ``--resume`` compacts the same way before computing anything.

Shard ``k`` holds the samples ``shard_boundaries`` gives it whoever computes it, and the final
manifest lists the shards in index order with the same totals, so the cache is the same for any
number of ranks (byte for byte on the CPU in fp32).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from draftcache.cache_format import (
    MANIFEST_FILE,
    RESUME_KEY_FIELDS,
    CacheLock,
    SampleRecord,
    ShardFileWriter,
    diff_manifest_config,
    read_manifest,
    remove_stale_temporaries,
    validate_manifest,
    verify_shard,
)
from draftcache.cache_format.checksum import atomic_write_json, fsync_dir
from draftcache.cache_format.manifest import Manifest, shard_entry_stats, shard_stats
from draftcache.cache_format.schema import LM_HEAD_ENCODINGS
from draftcache.cache_format.resume import journal_files, read_journals
from draftcache.cache_format.writer import append_commit, check_record, write_side_file
from draftcache.data import TokenizedSample, sample_lengths
from draftcache.precompute.distributed import DistContext, gather_step
from draftcache.precompute.forward import Probe, Progress, shard_records
from draftcache.precompute.output_dir import PrecomputeError, check_cache_contents
from draftcache.precompute.planning import ShardPlan, plan_shards
from draftcache.precompute.records import NON_FINITE_PARTS, SupervisionSpec
from draftcache.precompute.summary import PrecomputeSummary
from draftcache.targets import HFEagle3TargetModel

__all__ = ["CacheJob", "write_cache", "assign_shards", "drop_journals", "ManifestOwner", "ByteCount"]

# The flag behind each manifest field a resumed run must match, named in the refusal.
_FIELD_FLAGS = {
    "target.fingerprint": "--target-model weights",
    "target.engine.name": "--engine",
    "target.config_fingerprint": "--target-model config",
    "tokenizer.fingerprint": "--target-model tokenizer",
    "tokenizer.chat_template_fingerprint": "--chat-template (or the tokenizer's own template)",
    "kind": "--method",
    "capture.layer_ids": "--aux-layer-ids",  # --target-layer-ids for dflash caches
    "seq_length": "--seq-length",
    "dtype": "--dtype",
    "supervision.encoding": "--supervision",
    "supervision.topk": "--target-probs-topk",
    "draft_vocab.selected_token_ids": "--draft-vocab-size",
    "dataset.input_data": "--input-data",
    "dataset.split": "--split",
    "dataset.shuffle_seed": "--shuffle-seed",
    "dataset.num_samples": "--num-samples",
    "dataset.fingerprint": "--input-data contents",
    "shard_size": "--shard-size",
    "max_shard_bytes": "--max-shard-mb",
    "num_samples": "number of usable samples",
    "shard_boundaries": "sample lengths / --shard-size / --max-shard-mb",
}


@dataclass
class CacheJob:
    """What the writer needs besides the target: the planned manifest (``shard_boundaries`` set),
    how rows are encoded, the tokenized samples in global order, and run options."""

    output_dir: Path
    manifest: dict
    spec: SupervisionSpec
    samples: Sequence[TokenizedSample]
    pad_id: int
    batch_size: int
    resume: bool = False
    progress: bool = True
    skipped: dict | None = None        # the data's skip counts, echoed in the summary
    probe: Probe | None = None         # a forward already run, reused by the shard that holds it, then released
    strict: bool = False               # a non-finite sample is an error naming it, not skipped
    max_non_finite: float = 0.01       # abort once more than this share of all samples is non-finite


def assign_shards(plans: Sequence[ShardPlan], rank: int, world_size: int) -> list[ShardPlan | None]:
    """Rank ``rank``'s shard in each round: the ``(round * world_size + rank)``-th of ``plans`` (the
    shards still to compute, in index order), None in a last round with fewer shards than ranks.
    Over all ranks this covers ``plans`` exactly once."""
    rounds = -(-len(plans) // world_size)
    return [plans[i] if (i := r * world_size + rank) < len(plans) else None for r in range(rounds)]


def drop_journals(out: Path) -> None:
    """Remove the commit journals once ``manifest.json`` records everything they hold."""
    paths = journal_files(out)
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_dir(out)


class ByteCount:
    """Bytes of shards and side files this rank wrote (the progress bar's ``written``)."""

    def __init__(self) -> None:
        self.bytes_written = 0

    def count(self, n: int) -> None:
        self.bytes_written += n


class ManifestOwner:
    """Rank 0's hold on ``manifest.json``: side files, committed shard entries, completion.

    ``manifest.json`` is written (and validated) only when the set of trusted shards is decided:
    at start (a fresh plan, or on ``--resume`` the compaction of the journals into it), after each
    side file, and at ``finish``. A shard commit costs O(1) in the number of shards: its entry is
    already fsynced in its rank's commit journal (``append_commit``), which is what a crash leaves
    for ``--resume`` to verify; ``commit`` only records it in memory and updates the totals.
    """

    def __init__(self, out: Path, manifest: dict, counter: ByteCount):
        self.out = out
        self.manifest = manifest
        self.counter = counter
        self.files: list[tuple[str, dict]] = []  # a resumed cache's side-file entries, in written order
        self._shards = {e["index"]: e for e in manifest["shards"]}  # committed, by index
        self.manifest_writes = 0  # times manifest.json was (validated and) written

    def write(self) -> None:
        validate_manifest(self.manifest)
        atomic_write_json(self.out / MANIFEST_FILE, self.manifest)
        self.manifest_writes += 1

    def start(self, kept: list[dict]) -> None:
        """Make ``kept`` (verified entries, by index) the committed shards and write the manifest:
        after this the journals' entries are in ``manifest.json`` and the journals can go."""
        self._shards = {e["index"]: e for e in kept}
        self.manifest["shards"] = sorted(kept, key=lambda e: e["index"])
        self.manifest["stats"] = shard_stats(self.manifest["shards"])
        self.write()

    def write_side_files(self, target: HFEagle3TargetModel, spec: SupervisionSpec) -> None:
        """``target_embeddings`` (storage dtype; the target's for ``argmax``) and, for ``hidden`` and
        ``argmax``, ``lm_head`` (the target's own
        dtype, so read-time logits use exactly its weights); skipped when a resumed cache has them."""
        if "target_embeddings" not in self.manifest["files"]:
            weight = target.get_input_embeddings().weight.detach()  # [V, H]
            # a DFlash draft embeds its blocks with exactly the target's table (vLLM shares it): keep its dtype
            dtype = weight.dtype if spec.label_aligned else spec.dtype
            self._side_file("target_embeddings", {"weight": weight.to("cpu", dtype).contiguous()})
        if spec.encoding in LM_HEAD_ENCODINGS and "lm_head" not in self.manifest["files"]:
            weight, bias = target.output_projection()  # [V, H], [V] | None
            tensors = {"weight": weight.detach().to("cpu").contiguous()}
            if bias is not None:
                tensors["bias"] = bias.detach().to("cpu").contiguous()
            self._side_file("lm_head", tensors)

    def _side_file(self, name: str, tensors) -> None:
        entry = write_side_file(self.out, Manifest(self.manifest), name, tensors, on_bytes=self.counter.count)
        self.manifest["files"][name] = entry
        self.write()

    def commit(self, entries: list[dict]) -> None:
        """Record shard entries already journaled by the ranks that committed them. O(len(entries))."""
        stats = self.manifest["stats"]
        for entry in entries:
            old = self._shards.get(entry["index"])
            if old is not None:
                for key, value in shard_entry_stats(old).items():
                    stats[key] = stats.get(key, 0) - value
            self._shards[entry["index"]] = entry
            for key, value in shard_entry_stats(entry).items():
                stats[key] = stats.get(key, 0) + value

    @property
    def num_committed(self) -> int:
        return len(self._shards)

    def finish(self) -> None:
        """Compact: write the complete manifest (every shard, in index order), then drop the journals."""
        missing = self.manifest["num_shards"] - len(self._shards)
        if missing:
            raise RuntimeError(f"{missing} shard(s) of {self.manifest['num_shards']} were not committed; rerun with "
                               "--resume to compute them")
        self.manifest["shards"] = [self._shards[k] for k in sorted(self._shards)]
        self.manifest["stats"] = shard_stats(self.manifest["shards"])
        self.manifest["complete"] = True
        self.write()
        drop_journals(self.out)


def _resume_candidates(out: Path, manifest: dict, log) -> tuple[list[dict], list[tuple[str, dict]]]:
    """Rank 0, cheap: refuse a changed configuration (naming every field), remove stale
    temporaries, and list the shard entries (the manifest's, then the journals') whose place fits
    this run's layout, and the old side-file entries in the order they were written."""
    old = read_manifest(out)
    differences = []
    for key in RESUME_KEY_FIELDS:
        for line in diff_manifest_config(old, manifest, (key,)):
            flag = "--target-layer-ids" if key == "capture.layer_ids" and manifest["kind"] == "dflash" else \
                _FIELD_FLAGS.get(key)
            differences.append(f"{line}  [{flag}]" if flag else line)
    if differences:
        raise PrecomputeError(
            f"--resume refused: the cache in {out} was made with a different configuration "
            f"({len(differences)} field(s) differ, cache value != this run's):\n  - " + "\n  - ".join(differences)
            + "\nRerun with the original settings, or write a new cache to another --output-dir."
        )
    for name in remove_stale_temporaries(out):
        log(f"resume: removed stale temporary {name}")
    candidates = []
    for entry in [*sorted(old["shards"], key=lambda e: e["index"]), *read_journals(out)]:
        problems = _entry_problems(entry, manifest)
        if problems:
            log(f"resume: {'; '.join(problems)}; the shard will be computed again")
        else:
            candidates.append(entry)
    return candidates, list(old["files"].items())


def _entry_problems(entry: dict, manifest: dict) -> list[str]:
    """Problems with a shard entry's place in this run's layout (not its file; see ``verify_shard``)."""
    index, bounds = entry.get("index"), manifest["shard_boundaries"]
    if not isinstance(index, int) or not 0 <= index < manifest["num_shards"]:
        return [f"shard entry {entry.get('file')!r}: index {index!r} is outside this cache's "
                f"{manifest['num_shards']} shards"]
    expected = (f"shard-{index:06d}.safetensors", bounds[index], bounds[index + 1] - bounds[index])
    found = (entry.get("file"), entry.get("first_sample"), entry.get("num_samples"))
    if found != expected:
        return [f"shard entry {index}: (file, first_sample, num_samples) = {found}, expected {expected}"]
    return []


def write_cache(job: CacheJob, target: HFEagle3TargetModel, *, ctx: DistContext | None = None,
                log: Callable[[str], None] = print) -> PrecomputeSummary:
    """Write (or complete) the cache ``job`` describes with this rank's share of the shards; every
    rank of ``ctx`` (None: one process) calls it with the same arguments (see the module docstring)."""
    ctx = ctx or DistContext()
    t0 = time.perf_counter()
    out = job.output_dir
    counter = ByteCount()
    owner = ManifestOwner(out, job.manifest, counter) if ctx.is_main else None
    lock = CacheLock(out) if ctx.is_main else None
    created = ctx.is_main and not out.exists()
    try:
        def lock_and_list() -> list[dict]:
            lock.acquire()
            check_cache_contents(out, job.resume)  # again, now that no other writer can change it
            if not (out / MANIFEST_FILE).exists():
                return []
            candidates, owner.files = _resume_candidates(out, owner.manifest, log)
            return candidates

        candidates = gather_step(ctx, "checking the cache to resume", lock_and_list if ctx.is_main else list)[0]

        def verify_share() -> list[tuple[int, list[str]]]:
            # every rank hashes every world_size-th candidate; rank 0 also the side files
            found = [(i, verify_shard(out, candidates[i])) for i in range(ctx.rank, len(candidates), ctx.world_size)]
            if owner is not None:
                for name, entry in owner.files:  # in the order they were written
                    problems = verify_shard(out, entry)
                    if problems:
                        # this one and those after it are written again, in the order of a fresh run
                        log(f"resume: {'; '.join(problems)}; side files from {entry['file']} on will be written again")
                        break
                    owner.manifest["files"][name] = entry
            return found

        verified = gather_step(ctx, "verifying the committed shards", verify_share, patient=True)

        def prepare() -> list[int]:
            problems = dict(pair for share in verified for pair in share)
            kept, seen = [], set()
            for i, entry in enumerate(candidates):
                if entry["index"] in seen:
                    continue
                if problems[i]:
                    log(f"resume: {'; '.join(problems[i])}; the shard will be computed again")
                else:
                    kept.append(entry)
                    seen.add(entry["index"])
            owner.start(kept)  # the journals' entries are now in the manifest
            drop_journals(out)
            owner.write_side_files(target, job.spec)
            return [e["index"] for e in kept]

        committed = set(gather_step(ctx, "preparing the cache directory", prepare if ctx.is_main else list)[0])
        plans = plan_shards(job.manifest["shard_boundaries"])
        todo = [p for p in plans if p.index not in committed]
        mine = [p for p in assign_shards(todo, ctx.rank, ctx.world_size) if p is not None]
        if job.probe is not None and not any(p.first_sample <= job.probe.indices[0] < p.stop for p in mine):
            job.probe.take()  # no shard of this rank holds the probe's batch: release it now
        meta = Manifest(job.manifest)
        # samples already committed (not necessarily a prefix: a crashed distributed run leaves gaps)
        done = sum(p.num_samples for p in plans if p.index in committed)
        progress = Progress(len(job.samples), done, job.progress and ctx.is_main, lambda: counter.bytes_written)
        computed: list[dict] = []
        try:
            for round_plan in assign_shards(todo, ctx.rank, ctx.world_size):
                def work(plan: ShardPlan | None = round_plan) -> dict | None:
                    if plan is None:
                        return None
                    entry = _write_shard(plan, job, meta, target, progress, counter)
                    append_commit(out, ctx.rank, entry)
                    return entry

                what = f"computing shard {round_plan.index}" if round_plan is not None else "waiting for the others"
                entries = [e for e in gather_step(ctx, what, work) if e is not None]
                computed += entries  # the same list on every rank, so every rank decides alike
                _check_non_finite_share(job, computed)
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
    spec = job.spec
    return PrecomputeSummary.from_manifest(
        final, output_dir=out, encoding=spec.encoding, dtype=final["dtype"], draft_vocab_size=spec.vocab.size,
        computed_samples=len(job.samples) - done, computed_tokens=tokens, slots=slots, resumed_from_sample=done,
        bytes_written=written, wall_seconds=time.perf_counter() - t0, skipped=dict(job.skipped or {}),
    )


def _write_shard(plan: ShardPlan, job: CacheJob, meta: Manifest, target: HFEagle3TargetModel, progress: Progress,
                 counter: ByteCount) -> dict:
    """Forward shard ``plan`` batch by batch, each sample's rows going straight into the pre-sized
    shard file; commit it and return its manifest entry."""
    tokens, supervised = zip(*sample_lengths(job.samples[plan.first_sample : plan.stop]))
    shard = ShardFileWriter(job.output_dir, meta, plan.index, list(tokens), list(supervised), on_bytes=counter.count)
    try:
        for local, record in shard_records(plan, job.samples, target, job.spec, pad_id=job.pad_id,
                                           batch_size=job.batch_size, progress=progress, probe=job.probe):
            non_finite = [part for part, bad in zip(NON_FINITE_PARTS, record.pop("non_finite").tolist()) if bad]
            if non_finite:
                problem = (f"sample {plan.first_sample + local} (shard {plan.index}): the target produced NaN/Inf "
                           f"in its {' and '.join(non_finite)}")
                if job.strict:
                    raise PrecomputeError(f"{problem} (--strict). Without --strict such samples are left out of "
                                          "the cache and counted as non_finite.")
                tqdm.write(f"{problem}; left out of the cache (counted in stats.non_finite)")
                shard.skip(local)
                continue
            record = SampleRecord(**record)
            check_record(meta, plan.first_sample + local, record)
            shard.write(local, record)
        progress.refresh()
        if job.probe is not None and plan.first_sample <= job.probe.indices[0] < plan.stop:
            job.probe.take()  # its shard is written: release it even if no batch matched exactly
        return shard.commit().to_dict()
    except BaseException:
        shard.abort()
        raise


def _check_non_finite_share(job: CacheJob, entries: Sequence[dict]) -> None:
    """Abort once the samples dropped as non-finite exceed ``job.max_non_finite`` of ALL planned
    samples: the run can no longer end below it, and that many means a broken target (an fp16
    overflow, a bad kernel), not a few bad records. Every rank sees the same entries and raises alike."""
    dropped = sum(len(e.get("non_finite", ())) for e in entries)
    total = len(job.samples)
    if dropped > job.max_non_finite * total:
        first = sorted(i for e in entries for i in e.get("non_finite", ()))[:5]
        raise PrecomputeError(
            f"{dropped} of {total} samples ({dropped / total:.1%}) so far made the target produce NaN/Inf (first: "
            f"samples {first}), more than --max-non-finite {job.max_non_finite:g} of them: the target itself is "
            "broken (e.g. fp16 overflow: load it in bf16 or fp32). The committed shards are kept; fix the target "
            "and precompute again into a new --output-dir.")
